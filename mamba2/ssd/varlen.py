"""Packed variable-length sequences described by ``cu_seqlens``: checks, and the state each document leaves.

A packed row holds documents back to back; ``cu_seqlens = [0, l_0, l_0 + l_1, …, T]`` gives their boundaries.
A serving engine prefills several prompts in one such row and needs each prompt's own final SSM state
(docs/design.md §7). Those states are computed here on a chunk grid per document (each document is cut into
pieces of Q tokens starting at its own first token), never on the row's grid: a grid shared across documents
would mix a piece of one document into the state of the next.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

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


def _on(values: list[int], device: torch.device) -> Tensor:
    """An int64 tensor of ``values`` on ``device`` without a device sync (pinned, asynchronous copy on a GPU)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


@dataclass
class Documents:
    """K documents packed back to back in one row of T tokens: the boundaries, checked once (one host read of
    ``cu_seqlens``), and the index tensors a packed forward needs in every layer, made once on the device without
    a sync (so a packed prefill of n layers does not stall the GPU n times).

    Build with :meth:`of`; every function that takes ``cu_seqlens`` also takes a Documents.
    """

    cu: list[int]
    device: torch.device
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cu_seqlens: "Tensor | Documents", total: int, device: torch.device | str) -> "Documents":
        """Check ``cu_seqlens`` against a row of ``total`` tokens (:func:`check_cu_seqlens`); a Documents is
        returned as it is once its total is checked. Raises ValueError as :func:`check_cu_seqlens`."""
        if isinstance(cu_seqlens, Documents):
            if cu_seqlens.cu[-1] != total:
                raise ValueError(f"cu_seqlens must end at the packed length {total}, got {cu_seqlens.cu}")
            return cu_seqlens
        return cls(check_cu_seqlens(cu_seqlens, total), torch.device(device))

    @classmethod
    def packed(cls, cu_seqlens: "Tensor | Documents", batch: int, total: int, device: torch.device | str, *,
               seq_idx: Tensor | None = None, what: str = "x") -> "Documents":
        """The documents of a function's input ``what`` of ``batch`` rows × ``total`` tokens given with
        ``cu_seqlens``: the one check every packed entry point (ssd, the conv, the mixer, the LM) makes.

        Raises:
            ValueError: ``seq_idx`` given as well, ``batch`` != 1, or boundaries as :func:`check_cu_seqlens`.
        """
        if seq_idx is not None:
            raise ValueError("give seq_idx or cu_seqlens, not both (cu_seqlens describes the same documents)")
        if batch != 1:
            raise ValueError(f"cu_seqlens describes one packed row: {what} must have batch 1, got {batch}")
        return cls.of(cu_seqlens, total, device)

    @classmethod
    def of_mixer_input(cls, cu_seqlens: "Tensor | Documents", u: Tensor, *, seq_idx: Tensor | None,
                       attention_mask: Tensor | None, state_rows: int | None) -> "Documents":
        """The documents of a sequence mixer's input ``u`` (1, T, ·) given with ``cu_seqlens``, the one check of
        every mixer: no ``attention_mask`` (packed rows have no padding) and, for a state, one row per document.

        Raises:
            ValueError: as :meth:`packed`, an attention_mask, or ``state_rows`` other than the number of documents.
        """
        if attention_mask is not None:
            raise ValueError("cu_seqlens cannot be combined with attention_mask (packed rows have no padding)")
        docs = cls.packed(cu_seqlens, u.shape[0], u.shape[1], u.device, seq_idx=seq_idx, what="u")
        if state_rows is not None and state_rows != docs.num_docs:
            raise ValueError(f"cu_seqlens gives {docs.num_docs} documents but the state holds {state_rows} rows "
                             f"(one per document)")
        return docs

    @property
    def num_docs(self) -> int:
        return len(self.cu) - 1

    @property
    def bounds(self) -> Tensor:
        """(K + 1,) int64 on the device: ``cu_seqlens``."""
        if "bounds" not in self._cache:
            self._cache["bounds"] = _on(self.cu, self.device)
        return self._cache["bounds"]

    @property
    def seq_idx(self) -> Tensor:
        """(1, T) int32: the document of each token."""
        if "seq_idx" not in self._cache:
            owner = [k for k in range(self.num_docs) for _ in range(self.cu[k + 1] - self.cu[k])]
            self._cache["seq_idx"] = _on(owner, self.device).to(torch.int32).view(1, -1)
        return self._cache["seq_idx"]

    @property
    def ends(self) -> Tensor:
        """(1, T) int32: document k at its last token, −1 elsewhere (an empty document has none)."""
        if "ends" not in self._cache:
            marks = [-1] * self.cu[-1]
            for k, (start, end) in enumerate(zip(self.cu, self.cu[1:])):
                if end > start:
                    marks[end - 1] = k
            self._cache["ends"] = _on(marks, self.device).to(torch.int32).view(1, -1)
        return self._cache["ends"]

    def pieces(self, Q: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Each document cut into pieces of at most Q tokens from its own first token: ``idx`` (M, Q) token
        positions (clamped into the row), ``valid`` (M, Q) bool, ``first`` (K,) each document's first piece,
        ``count`` (K,) its number of pieces, and the largest count."""
        if ("pieces", Q) not in self._cache:
            starts, ends, first, count = [], [], [], []
            for a, e in zip(self.cu, self.cu[1:]):
                first.append(len(starts))
                count.append(len(range(a, e, Q)))
                starts += list(range(a, e, Q))
                ends += [min(s + Q, e) for s in range(a, e, Q)]
            if not starts:
                idx = torch.zeros(0, Q, dtype=torch.int64, device=self.device)
                valid = torch.zeros(0, Q, dtype=torch.bool, device=self.device)
            else:
                ar = torch.arange(Q, device=self.device)
                idx = _on(starts, self.device)[:, None] + ar
                valid = idx < _on(ends, self.device)[:, None]
                idx = idx.clamp(max=max(self.cu[-1] - 1, 0))
            self._cache[("pieces", Q)] = (idx, valid, _on(first, self.device), _on(count, self.device),
                                          max(count, default=0))
        return self._cache[("pieces", Q)]

    def windows(self, width: int) -> tuple[Tensor, Tensor]:
        """The last ``width`` positions of each document: ``pos`` (K, width) clamped into the row and ``inside``
        (K, width) bool, False before the document's start."""
        if ("windows", width) not in self._cache:
            ends, starts = _on(self.cu[1:], self.device), _on(self.cu[:-1], self.device)
            pos = ends[:, None] - width + torch.arange(width, device=self.device)
            self._cache[("windows", width)] = (pos.clamp(min=0), pos >= starts[:, None])
        return self._cache[("windows", width)]


def varlen_final_states(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, docs: Documents, *,
                        dt_bias: Tensor | None = None, dt_softplus: bool = True,
                        dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                        chunk_size: int = 64) -> Tensor:
    """The SSM state after the last token of each document of one packed row (§6 steps 2–3, per document).

    Args:
        x: (1, T, nheads, headdim). dt: (1, T, nheads) raw. A: (nheads,). B: (1, T, ngroups, d_state).
        docs: the K documents of the row (:class:`Documents`).
        initial_states: optional (1, nheads, headdim, d_state), the state before the first document's first token.
        chunk_size: piece length Q (results agree within rounding for any Q).
    Returns:
        (K, nheads, headdim, d_state) float32 (float64 for float64 x); an empty document leaves a zero state (the
        initial state for the first one). Differentiable. Issues no device sync.
    """
    _, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    ct = compute_dtype(x)
    K = docs.num_docs
    Q = max(1, min(chunk_size, T))
    S = (initial_states.to(ct).expand(1, h, p, n) if initial_states is not None
         else x.new_zeros(1, h, p, n, dtype=ct))
    S = torch.cat([S, S.new_zeros(K - 1, h, p, n)]) if K > 1 else S.clone()
    idx, valid, first, count, steps = docs.pieces(Q)
    if steps == 0:
        return S
    dtp = process_dt(dt[0], dt_bias, dt_softplus, dt_limit, ct)[idx] * valid[..., None]   # (M, Q, h): 0 past the end
    cs = (dtp * A.to(ct)).double().cumsum(dim=1)
    to_end = torch.exp((cs[:, -1:] - cs).to(ct))                                     # exponent <= 0
    Xw = x[0].to(ct)[idx] * (dtp * to_end)[..., None]                                # (M, Q, h, p)
    M = idx.shape[0]
    pieces = torch.einsum("mqgrp,mqgn->mgrpn", Xw.view(M, Q, g, h // g, p), B[0].to(ct)[idx]).reshape(M, h, p, n)
    decay = torch.exp(cs[:, -1].to(ct))                                              # (M, h)
    # The pieces of a document follow each other: pass the state through them, all documents at once.
    for j in range(steps):
        live = count > j
        i = torch.where(live, first + j, 0)
        S = torch.where(live[:, None], decay[i], 1.0)[:, :, None, None] * S + pieces[i] * live[:, None, None, None]
    return S
