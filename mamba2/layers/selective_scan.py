"""The Mamba-1 selective scan (Gu & Dao 2023, Alg. 2; the S6 baseline of Dao & Gu 2024, §9) in pure PyTorch.

Per channel d and state n, with A of shape (d_inner, d_state) (diagonal, per channel — not the scalar-per-head
A of SSD, so the SSD algorithm does not apply):

    h_t = exp(Δ_t[d] · A[d, n]) · h_{t-1} + Δ_t[d] · B_t[n] · u_t[d]        y_t[d] = Σ_n h_t[d, n] · C_t[n] + D[d] · u_t[d]

then ``y · silu(z)`` if a gate is given. :func:`selective_scan` is the training path: chunks of ``chunk_size``
tokens, each scanned in parallel (Hillis–Steele, log2(chunk) steps, every factor in (0, 1] so nothing
overflows), one chunk at a time under activation checkpointing, so only the (batch, d_inner, d_state) state at
each chunk boundary is kept for backward instead of the full (batch, L, d_inner, d_state) state sequence.
:func:`selective_scan_recurrent` is the sequential reference; :func:`selective_scan_step` the decoding step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from mamba2 import kernels
from mamba2.ssd.varlen import Documents

if kernels.available():
    from mamba2.layers.triton.selective_scan import selective_scan_triton
else:
    selective_scan_triton = None


def _compute_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, ct: torch.dtype) -> Tensor:
    delta = delta.to(ct)
    if delta_bias is not None:
        delta = delta + delta_bias.to(ct)
    return F.softplus(delta) if delta_softplus else delta


def _check(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
           delta_bias: Tensor | None, initial_state: Tensor | None, seq_idx: Tensor | None, chunk_size: int) -> None:
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"u must be (batch, L, d_inner) and A (d_inner, d_state), got {tuple(u.shape)}, {tuple(A.shape)}")
    b, L, d = u.shape
    n = A.shape[1]
    expect = {"delta": (delta, (b, L, d)), "A": (A, (d, n)), "B": (B, (b, L, n)), "C": (C, (b, L, n))}
    for name, t, shape in (("D", D, (d,)), ("z", z, (b, L, d)), ("delta_bias", delta_bias, (d,)),
                           ("initial_state", initial_state, (b, d, n)), ("seq_idx", seq_idx, (b, L))):
        if t is not None:
            expect[name] = (t, shape)
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from u {tuple(u.shape)} and A {tuple(A.shape)}), "
                             f"got {tuple(t.shape)}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _doc_starts(seq_idx: Tensor | None, b: int, L: int, device: torch.device) -> Tensor | None:
    """(b, L) bool: True where a new document begins (not at t = 0: the initial state belongs to the first)."""
    if seq_idx is None:
        return None
    starts = torch.zeros(b, L, dtype=torch.bool, device=device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def _scan_chunk(h0: Tensor, delta: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor,
                starts: Tensor | None, keep: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk from state h0 (b, d, n): delta, u (b, Q, d); B, C (b, Q, n); starts (b, Q) or None.
    Returns y (b, Q, d) without the D skip or gate, the state after the chunk (b, d, n), and the states after the
    chunk positions ``keep`` (b, len(keep), d, n) (None without ``keep``)."""
    a = torch.exp(delta.unsqueeze(-1) * A)                                            # (b, Q, d, n)
    if starts is not None:
        a = a.masked_fill(starts[:, :, None, None], 0.0)
    x = (delta * u).unsqueeze(-1) * B.unsqueeze(2)                                    # (b, Q, d, n)
    Q, k = a.shape[1], 1
    while k < Q:                                  # (a1, x1) ∘ (a2, x2) = (a1·a2, a2·x1 + x2), Hillis–Steele
        x = torch.cat([x[:, :k], x[:, k:] + a[:, k:] * x[:, :-k]], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    h = x + a * h0.unsqueeze(1)
    kept = None if keep is None else h[:, keep]
    return torch.einsum("bqdn,bqn->bqd", h, C), h[:, -1].clone(), kept   # a copy: a view would keep all h alive


def _epilogue(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                   cu_seqlens: Tensor | Documents | None = None, return_final_state: bool = False,
                   chunk_size: int = 32):
    """Run the selective SSM over a sequence (chunked parallel scan, memory-lean backward).

    Args:
        u: (batch, L, d_inner) input, any float dtype. delta: (batch, L, d_inner) raw step sizes; the step used
            is ``softplus(delta + delta_bias)`` (softplus only if ``delta_softplus``).
        A: (d_inner, d_state), negative. B, C: (batch, L, d_state). D: optional (d_inner,) skip.
        z: optional (batch, L, d_inner) gate. delta_bias: optional (d_inner,).
        initial_state: optional (batch, d_inner, d_state), the state before token 0.
        seq_idx: optional (batch, L) ints: the state resets to zero where the value changes (packed documents).
        cu_seqlens: optional (K + 1,) int boundaries of K documents packed in one row (batch 1), instead of
            ``seq_idx``: the final state is then one per document, (K, d_inner, d_state) (a packed prefill,
            docs/design.md §7), without gradient.
        return_final_state: also return the state after token L-1 (after each document's last token).
        chunk_size: tokens scanned together; memory for backward ~ (L / chunk_size) boundary states.
    Returns:
        y (batch, L, d_inner) in u's dtype, or ``(y, final_state)`` with the state float32 (float64 for float64 u).
    Raises:
        ValueError: shapes that disagree (naming the tensor), a non-positive chunk_size.

    Where :func:`mamba2.kernels.use_triton` says so (CUDA tensors by default), the recurrence runs in the Triton
    kernels of :mod:`mamba2.layers.triton.selective_scan` (state in registers, sequential in time; ``chunk_size``
    does not apply there), the step processing, D skip and gate in torch.
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, chunk_size)
    b, L, d = u.shape
    docs = None
    if cu_seqlens is not None:
        docs = Documents.packed(cu_seqlens, b, L, u.device, seq_idx=seq_idx, what="u")
        seq_idx = docs.seq_idx
    ct = _compute_dtype(u)
    dt = _delta(delta, delta_bias, delta_softplus, ct)
    starts = _doc_starts(seq_idx, b, L, u.device)
    if kernels.use_triton(u) and all(t.dtype in kernels.KERNEL_DTYPES for t in (delta, A, B, C)):
        y, h, per_doc = selective_scan_triton(dt, u, A, B, C, starts, initial_state,
                                              ends=None if docs is None else docs.ends,
                                              num_docs=0 if docs is None else docs.num_docs)
        y = _epilogue(y, u, D, z).to(u.dtype)
        return (y, h if docs is None else per_doc) if return_final_state else y
    uc, Ac, Bc, Cc = u.to(ct), A.to(ct), B.to(ct), C.to(ct)
    h = initial_state.to(ct) if initial_state is not None else u.new_zeros(b, d, A.shape[1], dtype=ct)
    lean = torch.is_grad_enabled() and L > chunk_size
    # split (one autograd node) rather than slice per chunk: slicing would build a full-size gradient per chunk
    pieces = zip(*(t.split(chunk_size, dim=1) for t in (dt, uc, Bc, Cc)),
                 starts.split(chunk_size, dim=1) if starts is not None else [None] * math.ceil(L / chunk_size))
    ys, per_doc = [], []
    # host values (no device sync): the last token of each non-empty document
    filled = [] if docs is None else [k for k in range(docs.num_docs) if docs.cu[k + 1] > docs.cu[k]]
    ends = [docs.cu[k + 1] - 1 for k in filled]
    for i, (dt_c, u_c, B_c, C_c, s_c) in enumerate(pieces):
        lo = i * chunk_size
        keep = [e - lo for e in ends if lo <= e < lo + chunk_size] or None
        args = (h, dt_c, u_c, Ac, B_c, C_c, s_c, keep)
        y, h, kept = checkpoint(_scan_chunk, *args, use_reentrant=False) if lean else _scan_chunk(*args)
        ys.append(y)
        if kept is not None:
            per_doc.append(kept[0])
    y = _epilogue(torch.cat(ys, dim=1), u, D, z).to(u.dtype)
    if not return_final_state:
        return y
    if docs is None:
        return y, h
    states = h.new_zeros(docs.num_docs, d, A.shape[1])         # an empty document keeps the zero state
    if filled:
        states[filled] = torch.cat(per_doc).detach()
    return y, states


def selective_scan_recurrent(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                             initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
                             return_final_state: bool = False):
    """The same as :func:`selective_scan`, one token at a time (the reference: a Python loop over L)."""
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx, 1)
    b, L, d = u.shape
    ct = _compute_dtype(u)
    dt = _delta(delta, delta_bias, delta_softplus, ct)
    starts = _doc_starts(seq_idx, b, L, u.device)
    h = initial_state.to(ct) if initial_state is not None else u.new_zeros(b, d, A.shape[1], dtype=ct)
    ys = []
    for t in range(L):
        if starts is not None:
            h = h * (~starts[:, t]).to(ct)[:, None, None]
        h = torch.exp(dt[:, t, :, None] * A.to(ct)) * h + (dt[:, t] * u[:, t].to(ct))[:, :, None] * B[:, t, None].to(ct)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t].to(ct)))
    y = _epilogue(torch.stack(ys, dim=1), u, D, z).to(u.dtype)
    return (y, h) if return_final_state else y


def selective_scan_step(state: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                        D: Tensor | None = None, z: Tensor | None = None, delta_bias: Tensor | None = None,
                        delta_softplus: bool = False) -> Tensor:
    """Advance the state by one token, in place: ``h ← exp(Δ·A)·h + Δ·B·u``; return ``y = h·C + D·u`` (·silu(z)).

    Args:
        state: (batch, d_inner, d_state), float32 by default (any float dtype); updated in place.
        u, delta, z: (batch, d_inner); A: (d_inner, d_state); B, C: (batch, d_state); D, delta_bias: (d_inner,).
    Returns:
        y: (batch, d_inner) in u's dtype.
    Raises:
        ValueError: on mismatched shapes.
    """
    b, d = u.shape
    n = A.shape[-1]
    if state.shape != (b, d, n) or delta.shape != (b, d) or A.shape != (d, n) or B.shape != (b, n) \
            or C.shape != (b, n):
        raise ValueError(f"selective_scan_step shapes disagree: state {tuple(state.shape)}, u {tuple(u.shape)}, "
                         f"delta {tuple(delta.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}; "
                         f"expected state (b, d, n), u/delta (b, d), A (d, n), B/C (b, n)")
    ct = torch.float64 if state.dtype == torch.float64 else torch.float32
    dt = _delta(delta, delta_bias, delta_softplus, ct)
    new = torch.exp(dt[:, :, None] * A.to(ct)) * state.to(ct) + (dt * u.to(ct))[:, :, None] * B.to(ct)[:, None]
    state.copy_(new)
    y = torch.einsum("bdn,bn->bd", new, C.to(ct))
    return _epilogue(y, u, D, z).to(u.dtype)
