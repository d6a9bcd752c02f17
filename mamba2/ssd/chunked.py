"""The chunked SSD algorithm in pure PyTorch (Dao & Gu 2024, §6, Fig. 5): the CPU path and the fallback everywhere.

Cut the sequence into chunks of Q tokens; inside a chunk use the quadratic (attention) form, between chunks pass
states with the linear recurrence. Work O(L·Q·(N + P)·H), memory O(batch·L·Q·H): the largest tensors are the
per-chunk decay mask and the per-chunk ``C Bᵀ`` (per group, not per head); none has both the Q×Q dims and d_state.
Cumulative sums, exponentials and states are float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba2.ssd.common import check_inputs, compute_dtype, epilogue, heads_per_group, process_dt, run_ids, segsum


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
                dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                seq_idx: Tensor | None = None, chunk_size: int = 256, return_final_states: bool = False):
    """Chunked SSD (same signature and results as :func:`mamba2.ssd.ssd`).

    Any L: the sequence is padded to a multiple of ``chunk_size`` with dt = 0 after softplus, so padded
    positions neither decay nor add to the state and contribute exactly nothing, forward or backward.
    """
    shape = check_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
                         initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size)
    b, L, h, p, g, n = shape.batch, shape.seqlen, shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    r = heads_per_group(shape)
    ct = compute_dtype(x)
    Q = chunk_size
    pad = (-L) % Q
    nc = (L + pad) // Q

    dtp = F.pad(process_dt(dt, dt_bias, dt_softplus, dt_limit, ct), (0, 0, 0, pad))        # (b, Lp, h)
    X = F.pad(x.to(ct) * dtp[:, :L, :, None], (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, r, p)
    Bc = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    Cc = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    dA = (dtp * A.to(ct)).view(b, nc, Q, h).permute(0, 1, 3, 2)                            # (b, c, h, Q)

    runs = run_ids(seq_idx, b, L, x.device)
    if runs is not None:
        runs = torch.cat([runs, runs[:, -1:].expand(b, pad)], dim=1).view(b, nc, Q)

    # 1. Diagonal blocks: quadratic form inside each chunk.
    Ldiag = torch.exp(segsum(dA))                                                           # (b, c, h, t, s)
    if runs is not None:
        Ldiag = Ldiag * (runs[:, :, None, :, None] == runs[:, :, None, None, :]).to(ct)
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)                                         # (b, c, g, t, s)
    M = CB.unsqueeze(3) * Ldiag.view(b, nc, g, r, Q, Q)
    Y = torch.einsum("bcgrts,bcsgrp->bctgrp", M, X)

    # 2. Chunk states from a zero start: sum_s exp(sum dA over (s, Q-1]) · X_s ⊗ B_s.
    to_end = Ldiag[..., -1, :].reshape(b, nc, g, r, Q)
    states = torch.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", to_end, X, Bc).reshape(b, nc, h, p, n)

    # 3. State passing across chunks (and documents: no decay across a boundary).
    Acs = dA.cumsum(dim=-1)                                                                 # (b, c, h, Q)
    from_start = torch.exp(Acs)                                                             # decay of the entering state
    if runs is not None:
        prev_last = torch.cat([runs[:, :1, 0], runs[:, :-1, -1]], dim=1)                    # (b, c)
        from_start = from_start * (runs == prev_last[:, :, None]).to(ct)[:, :, None, :]
    chunk_decay = from_start[..., -1]                                                       # (b, c, h)
    S0 = (initial_states.to(ct) if initial_states is not None
          else torch.zeros(b, h, p, n, dtype=ct, device=x.device))
    entering, final = _pass_states(states, chunk_decay, S0)

    # 4. Entering state to output.
    Y_off = torch.einsum("bctgn,bcgrpn->bctgrp", Cc, entering.view(b, nc, g, r, p, n))
    Y = Y + Y_off * from_start.view(b, nc, g, r, Q).permute(0, 1, 4, 2, 3).unsqueeze(-1)

    y = epilogue(Y.reshape(b, nc * Q, h, p)[:, :L], x, D, z).to(x.dtype)
    return (y, final) if return_final_states else y


@torch.compiler.disable
def _pass_states(states: Tensor, chunk_decay: Tensor, S0: Tensor) -> tuple[Tensor, Tensor]:
    """``S_{c+1} = chunk_decay_c · S_c + states_c`` from ``S_0``; returns (entering states (b, c, h, p, n), final).

    A short sequential loop over chunks: linear in L. Kept out of torch.compile graphs so a new number of chunks
    does not trigger a recompile.
    """
    S = S0
    entering = []
    for c in range(states.shape[1]):
        entering.append(S)
        S = chunk_decay[:, c, :, None, None] * S + states[:, c]
    return torch.stack(entering, dim=1), S
