"""SSD in its dual, quadratic form (Dao & Gu 2024, §4–5): masked attention with a 1-semiseparable decay mask.

``Y = (L ∘ C Bᵀ) · (dt·X)`` with ``L[t, s] = exp(dt_{s+1}A + … + dt_t A)`` for t ≥ s. O(L²·N) work and O(L²·H)
memory: fully parallel, for short sequences and for testing the duality.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamba2.ssd.common import check_inputs, compute_dtype, epilogue, heads_per_group, process_dt, run_ids, segsum


def ssd_quadratic(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                  z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
                  dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                  seq_idx: Tensor | None = None, chunk_size: int = 256, return_final_states: bool = False):
    """The whole sequence as one masked "attention" (same signature and results as :func:`mamba2.ssd.ssd`).

    ``initial_states`` enter as ``exp(cumsum(dt·A))_t · C_t · S_0``; documents (``seq_idx``) mask every pair
    (t, s) that straddles a boundary. ``chunk_size`` is accepted and ignored.
    """
    shape = check_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
                         initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size)
    b, L, h, p, g, n = shape.batch, shape.seqlen, shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    rep = heads_per_group(shape)
    ct = compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)                       # (b, L, h)
    dA = (dt * A.to(ct)).permute(0, 2, 1)                                         # (b, h, L)
    decay = torch.exp(segsum(dA))                                                 # (b, h, t, s)
    runs = run_ids(seq_idx, b, L, x.device)
    if runs is not None:
        decay = decay * (runs[:, None, :, None] == runs[:, None, None, :]).to(ct)
    CB = torch.einsum("btgn,bsgn->bgts", C.to(ct), B.to(ct))                     # (b, g, t, s): per group, not per head
    M = CB.unsqueeze(2) * decay.view(b, g, rep, L, L)                            # head h -> group h // rep
    X = (x.to(ct) * dt.unsqueeze(-1)).view(b, L, g, rep, p)                       # dt·x
    y = torch.einsum("bgrts,bsgrp->btgrp", M, X).reshape(b, L, h, p)

    Bd = B.to(ct)
    to_end = decay[:, :, -1, :].view(b, g, rep, L)                                # exp(sum dA over (s, L-1]), masked
    final = torch.einsum("bgrs,bsgrp,bsgn->bgrpn", to_end, X, Bd).reshape(b, h, p, n)
    if initial_states is not None:
        S0 = initial_states.to(ct)
        from_start = torch.exp(dA.cumsum(dim=-1))                                 # (b, h, t): decay of S0 up to t
        if runs is not None:
            from_start = from_start * (runs == runs[:, :1]).to(ct)[:, None, :]
        Ch = C.to(ct).view(b, L, g, 1, n).expand(b, L, g, rep, n).reshape(b, L, h, n)
        y = y + torch.einsum("bht,bthn,bhpn->bthp", from_start, Ch, S0)
        final = final + from_start[:, :, -1, None, None] * S0
    y = epilogue(y, x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y
