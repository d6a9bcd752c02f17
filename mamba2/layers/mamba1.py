"""The Mamba-1 mixer (Gu & Dao 2023, Fig. 3; the Mamba baseline of Dao & Gu 2024, §9), laid out like mamba_ssm's
``Mamba`` so official checkpoints (mamba-130m …) load: ``in_proj`` → [x, z]; causal depthwise ``conv1d`` on x,
SiLU; ``x_proj`` → [dt (dt_rank), B (d_state), C (d_state)]; ``dt_proj`` (dt_rank → d_inner, with bias) gives
Δ = softplus(dt_proj(dt)); selective scan with per-channel ``A = -exp(A_log)`` (d_inner, d_state) and ``D``;
gate ``silu(z)``; ``out_proj``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.config import Mamba2Config
from mamba2.layers.conv import CausalConv1d
from mamba2.layers.slots import Slots, step_rows
from mamba2.layers.selective_scan import selective_scan, selective_scan_step
from mamba2.ssd.varlen import Documents


@dataclass
class Mamba1LayerState:
    """Decoding state of one Mamba-1 mixer. conv: (batch, d_conv - 1, d_inner) in the model dtype;
    ssm: (batch, d_inner, d_state), float32 by default."""

    conv: Tensor
    ssm: Tensor


class Mamba1Mixer(nn.Module):
    """One Mamba-1 mixer (implements :class:`mamba2.layers.mixer.Mixer`).

    Sizes from the config: d_inner = expand·d_model, d_state, d_conv, dt_rank (``config.resolved.dt_rank``).
    """

    kind: ClassVar[str] = "mamba1"

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.d_inner, self.d_state, self.dt_rank = c.d_inner, c.d_state, c.resolved.dt_rank
        self.in_proj = nn.Linear(c.d_model, 2 * self.d_inner, bias=c.bias)
        self.conv1d = CausalConv1d(self.d_inner, c.d_conv, bias=c.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, c.d_model, bias=c.bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Official init: S4D-real A = 1…d_state per channel, dt log-uniform in [dt_min, dt_max] (floored) as the
        inverse-softplus dt_proj bias (kept by the LM's init: ``_no_reinit``), dt_proj weight U(±dt_rank^-½), D = 1."""
        c = self.config
        bound = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def empty_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    ssm_dtype: torch.dtype = torch.float32, max_len: int = 0) -> Mamba1LayerState:
        """A zero state for ``batch`` rows (``max_len`` is unused: the state does not grow with the sequence)."""
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba1LayerState(
            conv=torch.zeros(batch, self.config.d_conv - 1, self.d_inner, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=ssm_dtype))

    def decode(self, u: Tensor, pool: Mamba1LayerState, slots: Slots) -> Tensor:
        """One token per row for the pool rows ``slots``, as :meth:`mamba2.layers.mamba2.Mamba2Mixer.decode`."""
        return step_rows(lambda v, state: self(v[:, None], state=state)[:, 0], u, pool, slots)

    def forward(self, u: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Tensor | Documents | None = None,
                attention_mask: Tensor | None = None, state: Mamba1LayerState | None = None) -> Tensor:
        """Mix along the sequence.

        Args:
            u: (batch, L, d_model).
            seq_idx: optional (batch, L) document index per token (packed sequences): the conv window and the
                state reset at each change. Not with ``state``.
            cu_seqlens: optional (K + 1,) int boundaries of K documents packed in one row (batch 1), instead of
                ``seq_idx``; with ``state`` (K rows), each document's final conv window and SSM state are written
                to its row (a packed prefill, docs/design.md §7): the state's previous content is not read.
            attention_mask: optional (batch, L), 0 at padding: padded positions add nothing to the conv window
                (their input is zeroed) or the state (Δ = 0 there: no decay, no input).
            state: optional decoding state, read before token 0 and updated in place; L == 1 takes the O(1) step.
        Returns:
            (batch, L, d_model) in u's dtype.
        Raises:
            ValueError: ``seq_idx`` together with ``state``; ``cu_seqlens`` with ``seq_idx`` or
                ``attention_mask``, or with a state whose rows are not one per document.
        """
        b, L, _ = u.shape
        if seq_idx is not None and state is not None:
            raise ValueError("seq_idx (packed documents) cannot be combined with a decoding state")
        packed = cu_seqlens is not None
        if packed:
            cu_seqlens = Documents.of_mixer_input(cu_seqlens, u, seq_idx=seq_idx, attention_mask=attention_mask,
                                                  state_rows=None if state is None else state.ssm.shape[0])
        start = None if state is None or packed else state      # packed: the state is write-only
        x, z = self.in_proj(u).chunk(2, dim=-1)
        keep = None if attention_mask is None else attention_mask.to(torch.bool).unsqueeze(-1)
        if keep is not None:
            x = x * keep.to(x.dtype)
        x, conv_state = self.conv1d(x, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                    conv_state=None if start is None else start.conv, activation="silu")
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        ct = torch.float64 if u.dtype == torch.float64 else torch.float32
        delta = F.softplus(F.linear(dt, self.dt_proj.weight).to(ct) + self.dt_proj.bias.to(ct))
        if keep is not None:
            delta = delta * keep
        A = -torch.exp(self.A_log.to(ct))
        if state is not None and L == 1 and not packed:
            y = selective_scan_step(state.ssm, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D=self.D,
                                    z=z[:, 0]).unsqueeze(1)
        else:
            out = selective_scan(x, delta, A, B, C, D=self.D, z=z, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                 initial_state=None if start is None else start.ssm,
                                 return_final_state=state is not None)
            if state is not None:
                y, final = out
                state.ssm.copy_(final)
            else:
                y = out
        if state is not None:
            state.conv.copy_(conv_state)
        return self.out_proj(y.to(u.dtype))
