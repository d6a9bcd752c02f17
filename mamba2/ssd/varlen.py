"""Packed variable-length sequences described by ``cu_seqlens``: checks, and the state each document leaves.

A packed row holds documents back to back; ``cu_seqlens = [0, l_0, l_0 + l_1, …, T]`` gives their boundaries.
A serving engine prefills several prompts in one such row and needs each prompt's own final SSM state
(docs/design.md §7). Those states are computed here on a chunk grid per document (each document is cut into
pieces of Q tokens starting at its own first token), never on the row's grid: a grid shared across documents
would mix a piece of one document into the state of the next.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mamba2.ssd.common import compute_dtype, process_dt


def check_cu_seqlens(cu_seqlens: Tensor, total: int) -> list[int]:
    """Validate cumulative document lengths of one packed row of ``total`` tokens; return them as a list.

    Reads ``cu_seqlens`` on the host (one sync): prefill-time only.
    Raises:
        ValueError: not a 1-D integer tensor of at least two entries, not starting at 0, decreasing somewhere,
            or not ending at ``total``.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, l0, l0+l1, …, total], got "
                         f"{type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point \
            or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, l0, l0+l1, …, total], got dtype "
                         f"{cu_seqlens.dtype} and shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])) or cu[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at the packed length {total}, "
                         f"got {cu}")
    return cu


def varlen_final_states(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, cu_seqlens: list[int], *,
                        dt_bias: Tensor | None = None, dt_softplus: bool = True,
                        dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                        chunk_size: int = 64) -> Tensor:
    """The SSM state after the last token of each document of one packed row (§6 steps 2–3, per document).

    Args:
        x: (1, T, nheads, headdim). dt: (1, T, nheads) raw. A: (nheads,). B: (1, T, ngroups, d_state).
        cu_seqlens: checked boundaries (:func:`check_cu_seqlens`), K + 1 of them.
        initial_states: optional (1, nheads, headdim, d_state), the state before the first document's first token.
        chunk_size: piece length Q (results agree within rounding for any Q).
    Returns:
        (K, nheads, headdim, d_state) float32 (float64 for float64 x); an empty document leaves a zero state (the
        initial state for the first one). Differentiable.
    """
    _, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    ct = compute_dtype(x)
    K = len(cu_seqlens) - 1
    Q = max(1, min(chunk_size, T))
    starts, ends, owner = [], [], []
    for k in range(K):
        for s in range(cu_seqlens[k], cu_seqlens[k + 1], Q):
            starts.append(s)
            ends.append(min(s + Q, cu_seqlens[k + 1]))
            owner.append(k)
    S = (initial_states.to(ct).expand(1, h, p, n) if initial_states is not None
         else x.new_zeros(1, h, p, n, dtype=ct))
    S = torch.cat([S, S.new_zeros(K - 1, h, p, n)]) if K > 1 else S
    if not starts:
        return S.clone()
    dev = x.device
    start_t = torch.tensor(starts, device=dev)
    idx = start_t[:, None] + torch.arange(Q, device=dev)                             # (M, Q)
    valid = idx < torch.tensor(ends, device=dev)[:, None]
    idx = idx.clamp(max=T - 1)
    dtp = process_dt(dt[0], dt_bias, dt_softplus, dt_limit, ct)[idx] * valid[..., None]   # (M, Q, h): 0 past the end
    dA = dtp * A.to(ct)
    cs = dA.double().cumsum(dim=1)
    to_end = torch.exp((cs[:, -1:] - cs).to(ct))                                     # exponent <= 0
    Xw = x[0].to(ct)[idx] * (dtp * to_end)[..., None]                                # (M, Q, h, p)
    Bp = B[0].to(ct)[idx]                                                            # (M, Q, g, n)
    M = idx.shape[0]
    pieces = torch.einsum("mqgrp,mqgn->mgrpn", Xw.view(M, Q, g, h // g, p), Bp).reshape(M, h, p, n)
    decay = torch.exp(cs[:, -1].to(ct))                                              # (M, h)

    # Pieces of a document follow each other; pass the state through them, all documents at once.
    first = [0] * K
    count = [0] * K
    for i, k in enumerate(owner):
        if count[k] == 0:
            first[k] = i
        count[k] += 1
    first_t, count_t = torch.tensor(first, device=dev), torch.tensor(count, device=dev)
    for j in range(max(count)):
        live = (count_t > j)
        i = torch.where(live, first_t + j, 0)
        d = torch.where(live[:, None], decay[i], 1.0)
        add = pieces[i] * live[:, None, None, None].to(ct)
        S = d[:, :, None, None] * S + add
    return S
