"""Tensor parallelism of the Mamba-2 mixer as in §8 of the paper (docs/distributed.md §2).

The heads are split over the ``tp`` ranks, and with them every per-head tensor: the z, x and dt rows of
``in_proj`` (column parallel, cut per segment so a shard is a slice of the one-device layout), the conv channels of
x, ``dt_bias``, ``A_log``, ``D``, the norm weight, and the columns of ``out_proj`` (row parallel). B and C are cut by
group when ``ngroups % tp == 0``; with ``ngroups == 1`` (every released checkpoint) they are computed on every rank
and the gated norm, whose one group then spans the ranks, all-reduces its sum of squares. The forward issues one
all-reduce per block (the output of ``out_proj``), two with ``ngroups == 1``.

:func:`shard_mixer` (and :func:`shard_mlp` for a SwiGLU MLP: ``fc1`` column parallel per segment, ``fc2`` row
parallel) turns a one-device layer into rank ``r``'s shard in place (plain local tensors); the layer's ``tp``
records the cut, which :mod:`mamba2.distributed.checkpoint` inverts: the one-device tensors again, bit for bit.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.distributed import collectives


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def shares_groups(ngroups: int, tp: int) -> bool:
    """Whether B and C are computed whole on every rank (ngroups == 1 < tp) instead of cut by group."""
    return tp > 1 and ngroups % tp != 0


def check_mixer(config, tp: int) -> None:
    """Raise ValueError unless a Mamba-2 mixer of ``config`` can be cut over ``tp`` ranks."""
    c = config
    if c.nheads % tp:
        raise ValueError(f"tensor parallelism splits the heads: nheads % tp == 0 required, got nheads={c.nheads}, "
                         f"tp={tp}")
    if c.ngroups % tp and c.ngroups != 1:
        raise ValueError(f"tensor parallelism splits the B/C groups (or replicates a single one): ngroups % tp == 0 "
                         f"or ngroups == 1 required, got ngroups={c.ngroups}, tp={tp}")
    if c.d_mlp % tp:
        raise ValueError(f"tensor parallelism splits the mixer's MLP part: d_mlp % tp == 0 required, got "
                         f"d_mlp={c.d_mlp}, tp={tp}")


def mixer_segments(config, tp: int) -> dict[str, tuple[int, list[tuple[int, bool]]]]:
    """For each parameter that a shard cuts: (dim, [(segment length on one device, cut over ranks?), …])."""
    c = config
    d_ssm, H, GN = c.resolved.d_ssm, c.nheads, c.ngroups * c.d_state
    cut_bc = not shares_groups(c.ngroups, tp)
    rows = [(c.d_mlp, True), (c.d_mlp, True), (d_ssm, True), (d_ssm, True), (GN, cut_bc), (GN, cut_bc), (H, True)]
    conv = [(d_ssm, True), (GN, cut_bc), (GN, cut_bc)]
    out = {"in_proj.weight": (0, rows), "conv1d.weight": (0, conv), "dt_bias": (0, [(H, True)]),
           "A_log": (0, [(H, True)]), "D": (0, [(d_ssm if c.D_has_hdim else H, True)]),
           "out_proj.weight": (1, [(c.d_mlp, True), (d_ssm, True)])}
    if c.bias:
        out["in_proj.bias"] = (0, rows)
    if c.conv_bias:
        out["conv1d.bias"] = (0, conv)
    if c.rmsnorm:
        out["norm.weight"] = (0, [(d_ssm, True)])
    return out


def _local(t: Tensor, dim: int, segments, rank: int, tp: int) -> Tensor:
    parts, at = [], 0
    for n, cut in segments:
        piece = t.narrow(dim, at, n)
        parts.append(piece.narrow(dim, rank * (n // tp), n // tp) if cut else piece)
        at += n
    return torch.cat(parts, dim=dim)


def _whole(pieces: list[Tensor], dim: int, segments, tp: int) -> Tensor:
    parts, at = [], 0
    for n, cut in segments:
        m = n // tp if cut else n
        parts.extend([p.narrow(dim, at, m) for p in pieces] if cut else [pieces[0].narrow(dim, at, m)])
        at += m
    return torch.cat(parts, dim=dim)


class TensorParallel:
    """The collectives a sharded layer calls (``layer.tp``), for one process group (the mesh's ``tp``), and how its
    parameters were cut: ``segments`` maps a parameter name to ``(dim, [(one-device length, cut?), …])``."""

    def __init__(self, group, segments: dict, shared_bc: bool = False, bc_rows: tuple[int, int] = (0, 0)):
        self.group, self.segments, self.shared_bc, self.bc_rows = group, segments, shared_bc, bc_rows
        self.size = dist.get_world_size(group)

    def column_parallel(self, linear: nn.Linear, u: Tensor) -> Tensor:
        """``in_proj`` of the replicated input u on this rank's rows. The B/C rows computed on every rank pass
        1/tp of their input gradient, so summing over ranks counts them once."""
        u = collectives.enter(u, self.group)
        if not self.shared_bc:
            return linear(u)
        i, j = self.bc_rows
        w, b = linear.weight, linear.bias
        u_bc = _ScaleGrad.apply(u, 1.0 / self.size)
        parts = [F.linear(v, w[lo:hi], None if b is None else b[lo:hi])
                 for v, lo, hi in ((u, 0, i), (u_bc, i, j), (u, j, w.shape[0]))]
        return torch.cat(parts, dim=-1)

    def shared_groups(self, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        """B and C after the conv: replicated ones get the gradient of every rank's heads (summed)."""
        if not self.shared_bc:
            return B, C
        n = B.shape[-1]
        BC = collectives.enter(torch.cat([B, C], dim=-1), self.group)
        return BC[..., :n], BC[..., n:]

    def stat_reduce(self, sumsq: Tensor) -> Tensor:
        return collectives.all_reduce(sumsq, self.group)

    def row_parallel(self, linear: nn.Linear, y: Tensor) -> Tensor:
        """``linear`` on this rank's columns, summed over ranks (the block's one all-reduce); bias added once."""
        out = collectives.reduce_out(F.linear(y, linear.weight), self.group)
        return out if linear.bias is None else out + linear.bias


@torch.no_grad()
def shard_mixer(mixer: nn.Module, group, rank: int, tp: int) -> None:
    """Cut ``mixer`` (a one-device :class:`mamba2.layers.mamba2.Mamba2Mixer`) to rank ``rank``'s shard in place.

    Raises:
        ValueError: a configuration :func:`check_mixer` refuses.
    """
    c = mixer.config
    check_mixer(c, tp)
    segments = mixer_segments(c, tp)
    _cut(mixer, segments, rank, tp)
    shared = shares_groups(c.ngroups, tp)
    mixer.d_ssm, mixer.d_mlp, mixer.nheads = c.resolved.d_ssm // tp, c.d_mlp // tp, c.nheads // tp
    mixer.ngroups = c.ngroups if shared else c.ngroups // tp
    mixer.conv_dim = mixer.d_ssm + 2 * mixer.ngroups * c.d_state
    mixer.in_proj.out_features = mixer.in_proj.weight.shape[0]
    mixer.out_proj.in_features = mixer.out_proj.weight.shape[1]
    mixer.conv1d.channels = mixer.conv_dim
    bc_start = 2 * mixer.d_mlp + 2 * mixer.d_ssm
    mixer.tp = TensorParallel(group, segments, shared, (bc_start, bc_start + 2 * mixer.ngroups * c.d_state))
    if mixer.norm is not None:
        norm = mixer.norm
        norm.d = mixer.d_ssm
        if shared:
            # the one group spans the ranks: this rank holds d_ssm / tp of its channels
            norm.group_size, norm.stat_size, norm.stat_reduce = mixer.d_ssm, c.resolved.d_ssm, mixer.tp.stat_reduce


def _cut(module: nn.Module, segments: dict, rank: int, tp: int) -> None:
    params = dict(module.named_parameters())
    for name, (dim, segs) in segments.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, nn.Parameter(_local(params[name].detach(), dim, segs, rank, tp)))


def mlp_segments(d_intermediate: int, bias: bool) -> dict[str, tuple[int, list[tuple[int, bool]]]]:
    """The cut of a SwiGLU MLP: ``fc1`` rows per segment [value, gate] (column parallel), ``fc2`` columns."""
    rows = [(d_intermediate, True), (d_intermediate, True)]
    out = {"fc1.weight": (0, rows), "fc2.weight": (1, [(d_intermediate, True)])}
    if bias:
        out["fc1.bias"] = (0, rows)
    return out


@torch.no_grad()
def shard_mlp(mlp: nn.Module, group, rank: int, tp: int) -> None:
    """Cut a :class:`mamba2.layers.mlp.GatedMLP` to rank ``rank``'s shard in place (one all-reduce per forward).

    Raises:
        ValueError: ``d_intermediate % tp != 0``.
    """
    d = mlp.fc2.in_features
    if d % tp:
        raise ValueError(f"tensor parallelism splits the MLP: d_intermediate % tp == 0 required, got "
                         f"d_intermediate={d}, tp={tp}")
    segments = mlp_segments(d, mlp.fc1.bias is not None)
    _cut(mlp, segments, rank, tp)
    mlp.fc1.out_features, mlp.fc2.in_features = 2 * d // tp, d // tp
    mlp.tp = TensorParallel(group, segments)


def check_attention(config, tp: int) -> None:
    """Raise ValueError unless attention layers of ``config`` can be cut by heads over ``tp`` ranks."""
    r = config.resolved
    if r.attn_num_heads % tp or r.attn_num_heads_kv % tp:
        raise ValueError(f"tensor parallelism splits attention by heads: attn_num_heads % tp == 0 and "
                         f"attn_num_heads_kv % tp == 0 required, got {r.attn_num_heads} and {r.attn_num_heads_kv} "
                         f"heads, tp={tp}")


@torch.no_grad()
def shard_attention(attn: nn.Module, group, rank: int, tp: int) -> None:
    """Cut a :class:`mamba2.layers.attention.Attention` by heads in place: ``in_proj`` (and the optional conv)
    per segment [q, k, v], ``out_proj`` by column (one all-reduce per forward).

    Raises:
        ValueError: heads or KV heads not divisible by ``tp`` (:func:`check_attention`).
    """
    c = attn.config
    check_attention(c, tp)
    H, Hkv, d = attn.nheads, attn.nheads_kv, attn.head_dim
    rows = [(H * d, True), (Hkv * d, True), (Hkv * d, True)]
    segments = {"in_proj.weight": (0, rows), "out_proj.weight": (1, [(H * d, True)])}
    if attn.in_proj.bias is not None:
        segments["in_proj.bias"] = (0, rows)
    if attn.conv1d is not None:
        segments["conv1d.weight"] = (0, rows)
        if attn.conv1d.bias is not None:
            segments["conv1d.bias"] = (0, rows)
    _cut(attn, segments, rank, tp)
    attn.nheads, attn.nheads_kv = H // tp, Hkv // tp
    attn.in_proj.out_features = attn.in_proj.weight.shape[0]
    attn.out_proj.in_features = attn.out_proj.weight.shape[1]
    if attn.conv1d is not None:
        attn.conv1d.channels = attn.in_proj.out_features
    attn.tp = TensorParallel(group, segments)

