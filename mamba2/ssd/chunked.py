"""The chunked SSD algorithm in pure PyTorch (Dao & Gu 2024, §6, Fig. 5): the CPU path and the fallback everywhere.

Cut the sequence into chunks of Q tokens; inside a chunk use the quadratic (attention) form, between chunks pass
states with the linear recurrence. Work O(L·Q·(N + P)·H), memory O(batch·L·Q·H): the largest tensors are the
per-chunk decay mask (one per head, multiplied in place by the per-group ``C Bᵀ``); none has both the Q×Q dims and
d_state. Cumulative sums, exponentials and states are float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba2.ssd.common import check_inputs, compute_dtype, epilogue, heads_per_group, process_dt, run_ids

CPU_CHUNK_SIZE = 64
"""On CPU the chunks hold at most this many tokens, whatever ``chunk_size`` asks (results agree within rounding
for any chunk size): the per-head Q×Q block work grows with Q and the state work with L/Q; 64 was fastest on CPU
for the released sizes (P=64, N=128; docs/benchmarks.md)."""


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
                dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                seq_idx: Tensor | None = None, chunk_size: int = 256, return_final_states: bool = False):
    """Chunked SSD (same signature and results as :func:`mamba2.ssd.ssd`).

    ``chunk_size`` is a hint: on CPU at most :data:`CPU_CHUNK_SIZE` is used. Any L: the sequence is padded to a
    multiple of the chunk length (or is one chunk if shorter) with dt = 0 after softplus, so padded positions
    neither decay nor add to the state and contribute exactly nothing, forward or backward. Segment sums are
    differences of float64 cumulative sums: exact to ~1e-16·|cumsum|, and ≤ 0 by monotonicity. Without autograd, the large temporaries are updated in place (less memory, no page faults).
    """
    shape = check_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit,
                         initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size)
    b, L, h, p, g, n = shape.batch, shape.seqlen, shape.nheads, shape.headdim, shape.ngroups, shape.d_state
    r = heads_per_group(shape)
    ct = compute_dtype(x)
    if x.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK_SIZE)
    Q = min(chunk_size, L)                                                                  # a short input is one chunk
    pad = (-L) % Q
    nc = (L + pad) // Q

    dtp = F.pad(process_dt(dt, dt_bias, dt_softplus, dt_limit, ct), (0, 0, 0, pad))        # (b, Lp, h)
    X = F.pad(x.to(ct) * dtp[:, :L, :, None], (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, r, p)
    Bc = F.pad(B.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    Cc = F.pad(C.to(ct), (0, 0, 0, 0, 0, pad)).view(b, nc, Q, g, n)
    dA = (dtp * A.to(ct)).view(b, nc, Q, h).transpose(2, 3)                                # (b, c, h, Q)
    Acs64 = dA.double().cumsum(dim=-1)                                                      # non-increasing in Q
    Acs = Acs64.to(ct)                                                                      # (b, c, h, Q)

    runs = run_ids(seq_idx, b, L, x.device)
    if runs is not None:
        runs = torch.cat([runs, runs[:, -1:].expand(b, pad)], dim=1).view(b, nc, Q)

    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))

    def mul(a: Tensor, m: Tensor) -> Tensor:  # in place unless autograd needs the operands
        return a * m if grad else a.mul_(m)

    # 1. Diagonal blocks: M[t, s] = C_t·B_s · exp(Acs_t − Acs_s) for s ≤ t (same document), then Y = M · X.
    #    The float64 difference is cast to ct on the fly; above the diagonal it is clamped to 0 (exp = 1) and
    #    then zeroed by the causal mask folded into C·Bᵀ (no inf, so no NaN in any gradient).
    if grad:
        M = torch.exp((Acs64[..., :, None] - Acs64[..., None, :]).to(ct).clamp(max=0.0))     # (b, c, h, t, s)
    else:
        M = torch.empty((b, nc, h, Q, Q), dtype=ct, device=x.device)
        torch.sub(Acs64[..., :, None], Acs64[..., None, :], out=M).clamp_(max=0.0).exp_()
    to_end = (Acs64[..., -1:] - Acs64).to(ct).exp_()                                        # (b, c, h, s)
    CB = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)                                         # (b, c, g, t, s)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril_()
    if runs is not None:
        causal = causal & (runs[:, :, :, None] == runs[:, :, None, :])[:, :, None]         # (b, c, 1, t, s)
        to_end = mul(to_end, (runs == runs[..., -1:]).to(ct)[:, :, None, :])
    CB = CB.masked_fill_(~causal, 0.0)
    M = mul(M.view(b, nc, g, r, Q, Q), CB.unsqueeze(3))
    Y = torch.einsum("bcgrts,bcsgrp->bctgrp", M, X).to(ct)
    del M

    # 2. Chunk states from a zero start: sum_s exp(Acs_last − Acs_s) · X_s ⊗ B_s.
    Xd = X * to_end.view(b, nc, g, r, Q).permute(0, 1, 4, 2, 3).unsqueeze(-1)               # (b, c, s, g, r, p)
    states = torch.einsum("bcsgrp,bcsgn->bcgrpn", Xd, Bc).reshape(b, nc, h, p, n).to(ct)
    del Xd

    # 3. State passing across chunks (and documents: no decay across a boundary).
    from_start = torch.exp(Acs)                                                             # (b, c, h, Q)
    if runs is not None:
        prev_last = torch.cat([runs[:, :1, 0], runs[:, :-1, -1]], dim=1)                    # (b, c)
        from_start = from_start * (runs == prev_last[:, :, None]).to(ct)[:, :, None, :]
    S0 = (initial_states.to(ct) if initial_states is not None
          else torch.zeros(b, h, p, n, dtype=ct, device=x.device))
    entering, final = _pass_states(states, from_start[..., -1], S0, grad)

    # 4. Entering state to output: Y_off[t] = exp(Acs_t) · C_t · S_entering.
    Y_off = torch.einsum("bctgn,bcgrpn->bctgrp", Cc, entering.view(b, nc, g, r, p, n))
    Y.addcmul_(Y_off, from_start.view(b, nc, g, r, Q).permute(0, 1, 4, 2, 3).unsqueeze(-1))

    Y = Y.reshape(b, nc * Q, h, p)[:, :L]
    if grad:
        y = epilogue(Y, x, D, z)
    else:  # the same epilogue, in place on the fresh output
        if D is not None:
            Y.addcmul_(x, D.to(ct).reshape(h, p) if D.numel() == h * p else D.to(ct).reshape(h, 1))
        y = Y.mul_(F.silu(z.to(ct))) if z is not None else Y
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


@torch.compiler.disable
def _pass_states(states: Tensor, chunk_decay: Tensor, S0: Tensor, grad: bool) -> tuple[Tensor, Tensor]:
    """``S_{c+1} = chunk_decay_c · S_c + states_c`` from ``S_0``; returns (entering states (b, c, h, p, n), final).

    A short sequential loop over chunks: linear in L; without autograd, one fused multiply-add per chunk into a
    preallocated buffer. Kept out of torch.compile graphs so a new number of chunks does not trigger a recompile.
    """
    b, nc = states.shape[:2]
    if grad:
        # unbind once: indexing [:, c] in the loop makes each backward step fill a whole-tensor gradient
        S, entering = S0, []
        for decay_c, state_c in zip(chunk_decay.unbind(1), states.unbind(1)):
            entering.append(S)
            S = decay_c[:, :, None, None] * S + state_c
        return torch.stack(entering, dim=1), S
    run = torch.empty((b, nc + 1, *states.shape[2:]), dtype=states.dtype, device=states.device)
    run[:, 0] = S0
    for c in range(nc):
        torch.addcmul(states[:, c], run[:, c], chunk_decay[:, c, :, None, None], out=run[:, c + 1])
    return run[:, :nc], run[:, nc]
