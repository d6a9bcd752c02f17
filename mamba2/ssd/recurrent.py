"""SSD as a linear recurrence (Dao & Gu 2024, §3, eq. 2): the sequential scan, the reference for every backend.

O(L·H·P·N) work, one token at a time; readable and exact in float64. Use it to test, not to train.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamba2.ssd.common import check_inputs, compute_dtype, epilogue, heads_per_group, process_dt, run_ids


def ssd_recurrent(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                  z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
                  dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                  seq_idx: Tensor | None = None, chunk_size: int = 256, return_final_states: bool = False):
    """Sequential scan ``S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t⊗B_t``, ``y_t = S_t·C_t (+ D·x_t)``.

    Same signature and results as :func:`mamba2.ssd.ssd` (``chunk_size`` is accepted and ignored). At a
    document boundary (``seq_idx`` changes) the state restarts from zero; ``initial_states`` belong to the first
    document of each row.
    """
    shape = check_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
                         initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size)
    b, L, h, p, n = shape.batch, shape.seqlen, shape.nheads, shape.headdim, shape.d_state
    ct = compute_dtype(x)
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, ct)                       # (b, L, h)
    decay = torch.exp(dt * A.to(ct))                                             # (b, L, h)
    rep = heads_per_group(shape)
    Bh = B.to(ct).repeat_interleave(rep, dim=2)                                  # (b, L, h, n): head h -> group h // rep
    Ch = C.to(ct).repeat_interleave(rep, dim=2)
    xc = x.to(ct)
    runs = run_ids(seq_idx, b, L, x.device)
    state = (initial_states.to(ct) if initial_states is not None
             else torch.zeros(b, h, p, n, dtype=ct, device=x.device))
    ys = []
    for t in range(L):
        if runs is not None and t > 0:
            state = state * (runs[:, t] == runs[:, t - 1]).to(ct)[:, None, None, None]
        state = decay[:, t, :, None, None] * state + (dt[:, t, :, None, None] * xc[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    y = epilogue(torch.stack(ys, dim=1), x, D, z).to(x.dtype)
    return (y, state) if return_final_states else y
