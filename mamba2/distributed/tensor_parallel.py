"""Tensor parallelism of the Mamba-2 mixer as in §8 of the paper (docs/distributed.md §2).

The heads are split over the ``tp`` ranks, and with them every per-head tensor: the z, x and dt rows of
``in_proj`` (column parallel, cut per segment so a shard is a slice of the one-device layout), the conv channels of
x, ``dt_bias``, ``A_log``, ``D``, the norm weight, and the columns of ``out_proj`` (row parallel). B and C are cut by
group when ``ngroups % tp == 0``; with ``ngroups == 1`` (every released checkpoint) they are computed on every rank
and the gated norm, whose one group then spans the ranks, all-reduces its sum of squares. The forward issues one
all-reduce per block (the output of ``out_proj``), two with ``ngroups == 1``.

:func:`shard_mixer` turns a one-device mixer into rank ``r``'s shard in place (plain local tensors);
:func:`gather_mixer_state` is its inverse for checkpoints: the one-device tensors again, bit for bit.
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
    """The collectives a sharded mixer calls (``mixer.tp``), for one process group (the mesh's ``tp``)."""

    def __init__(self, group, shared_bc: bool, bc_rows: tuple[int, int]):
        self.group, self.shared_bc, self.bc_rows = group, shared_bc, bc_rows
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
        """``out_proj`` on this rank's columns, summed over ranks (the block's one all-reduce); bias added once."""
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
    params = dict(mixer.named_parameters())
    for name, (dim, segments) in mixer_segments(c, tp).items():
        module, leaf = mixer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else mixer, name.rsplit(".", 1)[-1]
        setattr(module, leaf, nn.Parameter(_local(params[name].detach(), dim, segments, rank, tp).clone()))
    shared = shares_groups(c.ngroups, tp)
    mixer.d_ssm, mixer.d_mlp, mixer.nheads = c.resolved.d_ssm // tp, c.d_mlp // tp, c.nheads // tp
    mixer.ngroups = c.ngroups if shared else c.ngroups // tp
    mixer.conv_dim = mixer.d_ssm + 2 * mixer.ngroups * c.d_state
    mixer.in_proj.out_features = mixer.in_proj.weight.shape[0]
    mixer.out_proj.in_features = mixer.out_proj.weight.shape[1]
    mixer.conv1d.channels = mixer.conv_dim
    bc_start = 2 * mixer.d_mlp + 2 * mixer.d_ssm
    mixer.tp = TensorParallel(group, shared, (bc_start, bc_start + 2 * mixer.ngroups * c.d_state))
    if mixer.norm is not None:
        norm = mixer.norm
        norm.d = mixer.d_ssm
        if shared:
            # the one group spans the ranks: this rank holds d_ssm / tp of its channels
            norm.group_size, norm.stat_size, norm.stat_reduce = mixer.d_ssm, c.resolved.d_ssm, mixer.tp.stat_reduce


def gather_mixer_state(mixer: nn.Module, local: dict[str, Tensor], group, tp: int) -> dict[str, Tensor]:
    """The one-device tensors of a sharded mixer: ``local`` maps its parameter names to this rank's tensors
    (every rank calls this; collective). Names the shard does not cut are returned as they are."""
    out = dict(local)
    for name, (dim, segments) in mixer_segments(mixer.config, tp).items():
        t = local[name].contiguous()
        pieces = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(pieces, t, group=group)
        out[name] = _whole(pieces, dim, segments, tp)
    return out
