"""One decoding step of the SSM (Dao & Gu 2024, §6, recurrent mode): O(1) in the sequence length."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamba2.ssd.common import check_step_inputs, epilogue, process_dt, step_A


def ssd_step_torch(state: Tensor, x: Tensor, dt: Tensor, A: Tensor | None, B: Tensor, C: Tensor, *,
                   D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                   dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                   active: Tensor | None = None, state_indices: Tensor | None = None,
                   A_log: Tensor | None = None) -> Tensor:
    """The torch decode step (any float dtype and device): advance the state by one token in place,
    ``S ← exp(dt·A)·S + dt·x⊗B``; return ``y = S·C (+ D·x)(·silu(z))``.

    Args:
        state: (batch, nheads, headdim, d_state), float32 by default (any float dtype); updated in place.
        x: (batch, nheads, headdim); dt: (batch, nheads) raw; A: (nheads,), or None with ``A_log`` (nheads,)
            given instead (A = -exp(A_log), computed inside the step); B, C: (batch, ngroups, d_state).
        D: (nheads,) or (nheads·headdim,); z: (batch, nheads, headdim); dt_bias: (nheads,).
        active: optional (batch,) bool; rows that are False keep their state byte-identical.
        state_indices: optional (batch,) int64: row i advances ``state[state_indices[i]]`` of a larger state pool
            (S, nheads, headdim, d_state) (a serving engine's slots, docs/design.md §7); distinct, in [0, S).
            Other rows of the pool are not touched.
    Returns:
        y: (batch, nheads, headdim) in x's dtype.
    Raises:
        ValueError: on mismatched shapes, non-float tensors, a non-bool or misshaped ``active``, misshaped
            ``state_indices``.
    """
    step_A(A, A_log)
    if A is None:
        A = -torch.exp(A_log.to(torch.float64 if state.dtype == torch.float64 else torch.float32))
    check_step_inputs(state, x, dt, A, B, C, active=active, state_indices=state_indices)
    if state_indices is not None:
        rows = state.index_select(0, state_indices)
        y = ssd_step_torch(rows, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                           dt_limit=dt_limit, active=active)
        state.index_copy_(0, state_indices, rows)
        return y
    b, h, p = x.shape
    g = B.shape[1]
    ct = torch.float64 if state.dtype == torch.float64 else torch.float32
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)                         # (b, h)
    rep = h // g
    Bh = B.to(ct).repeat_interleave(rep, dim=1)                                     # (b, h, n)
    Ch = C.to(ct).repeat_interleave(rep, dim=1)
    decay = torch.exp(dt * A.to(ct))[:, :, None, None]
    dtx = (dt[:, :, None] * x.to(ct))[..., None]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (state, x, dt, A, B, C, dt_bias))
    if active is None and state.dtype == ct and not needs_grad:
        new = state.mul_(decay).addcmul_(dtx, Bh[:, :, None, :])   # in place: no (b, h, p, n) temporaries
    else:
        new = decay * state.to(ct) + dtx * Bh[:, :, None, :]
        if active is not None:
            new = torch.where(active.view(b, 1, 1, 1), new, state.to(ct))
        state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    y = epilogue(y.unsqueeze(1), x.unsqueeze(1), D, None if z is None else z.unsqueeze(1)).squeeze(1)
    return y.to(x.dtype)
