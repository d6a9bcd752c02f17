"""The Mamba-2 mixer (Dao & Gu 2024, §7.1, Fig. 6): parallel projections, short conv, SSD, gated grouped norm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2 import kernels
from mamba2.layers.conv import CausalConv1d
from mamba2.layers.norm import GatedRMSNorm
from mamba2.layers.slots import Slots, as_index
from mamba2.config import Mamba2Config
from mamba2.ssd import process_dt, ssd, ssd_step
from mamba2.ssd.varlen import Documents

if kernels.available():
    from mamba2.layers.triton import mixer as fused
else:
    fused = None

CPU_SEGMENT_TOKENS = 1024
"""Inference on CPU runs long inputs through the mixer in segments of about this many tokens (batch × length, at
least ``CPU_SEGMENT_MIN`` per row), carrying the decoding state between them (chunked prefill): the same result,
with every temporary sized by one segment instead of the whole input — far less memory, and no page faults from
fresh multi-MB allocations."""
CPU_SEGMENT_MIN = 64


@dataclass
class Mamba2LayerState:
    """Decoding state of one mixer: the last d_conv - 1 conv inputs and the SSM state.

    conv: (batch, d_conv - 1, conv_dim) in the model dtype; ssm: (batch, nheads, headdim, d_state), fp32 by default.
    """

    conv: Tensor
    ssm: Tensor


class Mamba2Mixer(nn.Module):
    """One Mamba-2 mixer, parameter names and shapes as in the official checkpoints (docs/design.md §2).

    ``in_proj`` output, in order: [z0 (d_mlp), x0 (d_mlp), z (d_ssm), xBC (d_ssm + 2·G·N), dt (H)].
    Implements :class:`mamba2.layers.mixer.Mixer`.
    """

    kind: ClassVar[str] = "mamba2"

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        # sizes of this rank's shard (the whole layer unless tensor-parallel sharding changed them)
        self.d_ssm, self.d_mlp, self.nheads = c.resolved.d_ssm, c.d_mlp, c.nheads
        self.ngroups, self.conv_dim = c.ngroups, c.conv_dim
        # hooks of tensor / context parallelism (mamba2.distributed), set by its parallelize(); None on one device
        self.tp = None
        self.cp = None
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=c.bias)
        self.conv1d = CausalConv1d(c.conv_dim, c.d_conv, bias=c.conv_bias)
        h = c.nheads
        self.dt_bias = nn.Parameter(torch.empty(h))
        self.A_log = nn.Parameter(torch.empty(h))
        self.D = nn.Parameter(torch.empty(self.d_ssm if c.D_has_hdim else h))
        self.norm = (GatedRMSNorm(self.d_ssm, self.d_ssm // c.ngroups, eps=c.norm_eps,
                                  norm_before_gate=c.norm_before_gate) if c.rmsnorm else None)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Paper/official init: A = U(A_init_range), dt log-uniform in [dt_min, dt_max] floored, D = 1."""
        c = self.config
        dt = torch.exp(torch.rand(self.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))                      # inverse of softplus
        self.A_log.copy_(torch.log(torch.empty(self.nheads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def empty_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    ssm_dtype: torch.dtype = torch.float32, max_len: int = 0) -> Mamba2LayerState:
        """A zero state for ``batch`` rows (``max_len`` is unused: the state does not grow with the sequence)."""
        c = self.config
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2LayerState(
            conv=torch.zeros(batch, c.d_conv - 1, self.conv_dim, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, c.headdim, c.d_state, device=device, dtype=ssm_dtype))

    def decode(self, u: Tensor, pool: Mamba2LayerState, slots: Slots) -> Tensor:
        """One token per row for the pool rows ``slots`` (docs/design.md §7): u (batch, d_model) → (batch,
        d_model); the other rows of ``pool`` are not touched. Static shapes, no host reads (CUDA-graph capturable)."""
        if self.tp is not None or self.cp is not None:
            raise ValueError("decoding runs on one device: this mixer is sharded (tensor or context parallel)")
        if kernels.use_triton(u) and u.dtype in kernels.KERNEL_DTYPES and pool.ssm.dtype in kernels.KERNEL_DTYPES:
            return self._decode_pool(u, pool, as_index(slots, u.device))
        return self._decode_pool(u, pool, slots)

    def _decode_pool(self, u: Tensor, pool: Mamba2LayerState, slots: Slots) -> Tensor:
        """:meth:`decode` by steps that index the pool rows directly: in_proj, the conv update, the SSD step,
        the gated norm, out_proj (docs/design.md §7.1). A slice of rows (the torch code) is stepped in place
        through a view of the SSM state (no copies of the largest tensor of the step)."""
        c = self.config
        b = u.shape[0]
        G, N, H, P = self.ngroups, c.d_state, self.nheads, c.headdim
        z0, x0, z, xBC, dt = torch.split(self.in_proj(u),
                                         [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, H], dim=-1)
        xBC = self.conv1d.update(xBC, pool.conv, as_index(slots, u.device), activation="silu")
        x, B, C = torch.split(xBC, [self.d_ssm, G * N, G * N], dim=-1)
        gate = None if self.norm is not None else z.reshape(b, H, P)
        ssm, rows = (pool.ssm[slots], None) if isinstance(slots, slice) else (pool.ssm, slots)
        y = ssd_step(ssm, x.view(b, H, P), dt, None, B.view(b, G, N), C.view(b, G, N), D=self.D, z=gate,
                     dt_bias=self.dt_bias, dt_softplus=True, dt_limit=c.dt_limit, state_indices=rows,
                     A_log=self.A_log)
        y = y.view(b, self.d_ssm)
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y.to(u.dtype))

    def forward(self, u: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Tensor | Documents | None = None,
                attention_mask: Tensor | None = None, state: Mamba2LayerState | None = None) -> Tensor:
        """Mix along the sequence.

        Args:
            u: (batch, L, d_model).
            seq_idx: optional (batch, L) document index per token (packed sequences); not with ``state``.
            cu_seqlens: optional (K + 1,) int boundaries of K documents packed in one row (batch 1), instead of
                ``seq_idx``; with ``state`` (K rows), each document's final conv window and SSM state are written
                to its row (packed prefill, docs/design.md §7): the state's previous content is not read.
            attention_mask: optional (batch, L), 1 for real tokens, 0 for padding: padded positions add nothing
                to the conv window or the SSM state.
            state: optional decoding state, read as the state before token 0 and updated in place to the state
                after token L-1. With L == 1 the O(1) recurrent step runs.
        Returns:
            (batch, L, d_model) in u's dtype.
        Raises:
            ValueError: ``seq_idx`` together with ``state``; ``cu_seqlens`` with ``seq_idx`` or
                ``attention_mask``, or with a state whose rows are not one per document; a context-parallel mixer
                (``cp`` set, docs/distributed.md §3: ``u`` is this rank's piece of each row) given a state,
                ``cu_seqlens`` or ``attention_mask``.
        """
        c = self.config
        b, L, _ = u.shape
        if seq_idx is not None and state is not None:
            raise ValueError("seq_idx (packed documents) cannot be combined with a decoding state")
        packed = cu_seqlens is not None
        if packed:
            cu_seqlens = Documents.of_mixer_input(cu_seqlens, u, seq_idx=seq_idx, attention_mask=attention_mask,
                                                  state_rows=None if state is None else state.ssm.shape[0])
        if self.cp is not None and (state is not None or packed or attention_mask is not None):
            raise ValueError("a context-parallel mixer takes whole sequences (seq_idx allowed): no decoding state, "
                             "cu_seqlens or attention_mask")
        seg = max(CPU_SEGMENT_MIN, CPU_SEGMENT_TOKENS // b // CPU_SEGMENT_MIN * CPU_SEGMENT_MIN)
        if (u.device.type == "cpu" and seq_idx is None and not packed and L > seg and not torch.is_grad_enabled()
                and self.cp is None):
            return self._forward_in_segments(u, attention_mask, seg, state)
        G, N, H, P = self.ngroups, c.d_state, self.nheads, c.headdim
        zxbcdt = self.in_proj(u) if self.tp is None else self.tp.column_parallel(self.in_proj, u)
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, H], dim=-1)
        A = -torch.exp(self.A_log if self.A_log.dtype == torch.float64 else self.A_log.float())
        if (fused is not None and state is None and not packed and attention_mask is None
                and fused.applies(self, zxbcdt)):
            return fused.mixer_core(self, zxbcdt, A, seq_idx, u.dtype)
        dt_kw = dict(dt_bias=self.dt_bias, dt_softplus=True, dt_limit=c.dt_limit)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool).unsqueeze(-1)
            xBC = xBC * keep.to(xBC.dtype)
            # dt = 0 at padding: the state neither decays nor grows there.
            dt = process_dt(dt, **dt_kw) * keep
            dt_kw = dict(dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf))

        # packed: the state is write-only (each document starts from zero)
        start = None if state is None or packed else state
        if self.cp is not None:
            width = c.d_conv - 1
            xBC, conv_seq, entering = self.cp.halo(xBC, seq_idx, width)
            xBC = self.conv1d(xBC, seq_idx=conv_seq, activation="silu")[0][:, width:]
        else:
            xBC, conv_state = self.conv1d(xBC, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                          conv_state=None if start is None else start.conv, activation="silu")
        x, B, C = torch.split(xBC, [self.d_ssm, G * N, G * N], dim=-1)
        if self.tp is not None:
            B, C = self.tp.shared_groups(B, C)
        gate = None if self.norm is not None else z
        if self.cp is not None:
            y = self.cp.ssd(x.view(b, L, H, P), dt, A, B.view(b, L, G, N), C.view(b, L, G, N), D=self.D,
                            seq_idx=seq_idx, entering=entering, chunk_size=c.chunk_size, **dt_kw)
            y = y.reshape(b, L, self.d_ssm) if gate is None else (y * F.silu(gate.view(b, L, H, P))).reshape(
                b, L, self.d_ssm)
        elif state is not None and L == 1 and not packed:
            y = ssd_step(state.ssm, x.view(b, H, P), dt.view(b, H), A, B.view(b, G, N), C.view(b, G, N), D=self.D,
                         z=None if gate is None else gate.view(b, H, P), **dt_kw).view(b, 1, self.d_ssm)
        else:
            out = ssd(x.view(b, L, H, P), dt, A, B.view(b, L, G, N), C.view(b, L, G, N), D=self.D,
                      z=None if gate is None else gate.view(b, L, H, P), initial_states=None if start is None
                      else start.ssm, seq_idx=seq_idx, cu_seqlens=cu_seqlens, chunk_size=c.chunk_size,
                      return_final_states=state is not None, **dt_kw)
            if state is not None:
                y, final = out
                state.ssm.copy_(final)
            else:
                y = out
            y = y.reshape(b, L, self.d_ssm)
        if state is not None:
            state.conv.copy_(conv_state)
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        if self.tp is not None:
            return self.tp.row_parallel(self.out_proj, y.to(u.dtype))
        return self.out_proj(y.to(u.dtype))

    def _forward_in_segments(self, u: Tensor, attention_mask: Tensor | None, seg: int,
                             state: Mamba2LayerState | None) -> Tensor:
        """:meth:`forward` of a long input, ``seg`` tokens at a time through ``state`` (a zero one if None)."""
        b, L, _ = u.shape
        if state is None:
            ssm_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
            state = self.empty_state(b, u.device, ssm_dtype=ssm_dtype)
        out = u.new_empty(b, L, self.out_proj.out_features)
        for i in range(0, L, seg):
            mask = None if attention_mask is None else attention_mask[:, i:i + seg]
            out[:, i:i + seg] = self(u[:, i:i + seg], attention_mask=mask, state=state)
        return out
