"""State passing between segments of one sequence (docs/distributed.md §3): the algebra of context parallelism.

Split a sequence into W consecutive segments and run SSD on each from a zero state. Because the recurrence is
linear, the state leaving segment r is affine in the state entering it::

    S_out[r] = a[r] · S_in[r] + S_local[r]          a[r] = exp(Σ_{t in r} dt_t·A)   (per batch row and head)

so the true entering states follow from the W pairs ``(a, S_local)`` by an exclusive scan, and each segment's
outputs are corrected by the contribution of its entering state, ``y_t += exp(Σ_{s ≤ t} dt_s·A) · C_t·S_in``
(§3.3: the state-passing step of the chunked algorithm, with segments in place of chunks). A document boundary
(``seq_idx``) stops the carry: ``a`` is 0 for a segment that holds one, and tokens after it get no correction.

Shapes: b batch, L tokens in the segment, H heads, P headdim, G groups, N d_state; everything in fp32 (fp64 for
fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def carry_mask(seq_idx: Tensor | None, entering: Tensor | None, b: int, L: int, device, dtype) -> Tensor:
    """(b, L) 1.0 for the tokens that still belong to the document entering the segment, else 0.0.

    seq_idx: (b, L) document index per token, or None (one document). entering: (b,) the document index of the
    previous segment's last token (None for the first segment, or without ``seq_idx``).
    """
    if seq_idx is None or entering is None:
        return torch.ones(b, L, device=device, dtype=dtype)
    same = (seq_idx == entering[:, None].to(seq_idx.dtype))
    return same.to(torch.int32).cumprod(dim=1).to(dtype)


def log_decay(dt: Tensor, A: Tensor) -> Tensor:
    """(b, L, H) running sum of ``dt·A`` over the segment: dt (b, L, H) processed step sizes, A (H,)."""
    return torch.cumsum(dt * A, dim=1)


def segment_decay(cum: Tensor, carry: Tensor) -> Tensor:
    """(b, H) factor ``a`` by which the entering state survives the whole segment (0 across a boundary)."""
    return torch.exp(cum[:, -1]) * carry[:, -1:]


def entering_states(a: Tensor, s_local: Tensor) -> Tensor:
    """Exclusive scan over segments: a (W, b, H), s_local (W, b, H, P, N) → S_in (W, b, H, P, N), with S_in[0] = 0
    and ``S_in[r+1] = a[r]·S_in[r] + s_local[r]``."""
    out = [torch.zeros_like(s_local[0])]
    for r in range(s_local.shape[0] - 1):
        out.append(a[r][..., None, None] * out[-1] + s_local[r])
    return torch.stack(out)


def correction(C: Tensor, s_in: Tensor, cum: Tensor, carry: Tensor) -> Tensor:
    """(b, L, H, P) contribution of the entering state to the outputs: ``exp(cum_t)·carry_t · C_t·S_in``.

    C: (b, L, G, N); s_in: (b, H, P, N); cum: (b, L, H) from :func:`log_decay`; carry: (b, L).
    """
    b, L, G, N = C.shape
    H, P = s_in.shape[1], s_in.shape[2]
    cs = torch.einsum("blgn,bgkpn->blgkp", C.to(s_in.dtype), s_in.view(b, G, H // G, P, N)).reshape(b, L, H, P)
    return cs * (torch.exp(cum) * carry[..., None])[..., None]
