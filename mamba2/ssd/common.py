"""Shared pieces of every SSD backend: argument checks, dt processing, document run ids, D and z epilogue."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SSDShape:
    batch: int
    seqlen: int
    nheads: int
    headdim: int
    ngroups: int
    d_state: int


def check_inputs(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
                 z: Tensor | None = None, dt_bias: Tensor | None = None,
                 dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
                 seq_idx: Tensor | None = None, chunk_size: int = 256) -> SSDShape:
    """Validate the SSD signature's shapes; raise ValueError naming the tensor, its shape and the expectation."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, L, h, p = x.shape
    if B.dim() != 4 or C.dim() != 4:
        raise ValueError(f"B and C must be (batch, seqlen, ngroups, d_state), got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    expect = {
        "dt": (dt, (b, L, h)),
        "A": (A, (h,)),
        "B": (B, (b, L, g, n)),
        "C": (C, (b, L, g, n)),
    }
    if dt_bias is not None:
        expect["dt_bias"] = (dt_bias, (h,))
    if z is not None:
        expect["z"] = (z, (b, L, h, p))
    if initial_states is not None:
        expect["initial_states"] = (initial_states, (b, h, p, n))
    if seq_idx is not None:
        expect["seq_idx"] = (seq_idx, (b, L))
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (from x {tuple(x.shape)} and B {tuple(B.shape)}), "
                             f"got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((h,), (h * p,), (h, p)):
        raise ValueError(f"D must have shape ({h},) or ({h * p},) (per head or per channel), got {tuple(D.shape)}")
    if g < 1 or h % g != 0:
        raise ValueError(f"nheads % ngroups == 0 required, got nheads={h}, ngroups={g}")
    if L < 1:
        raise ValueError(f"seqlen must be >= 1, got {L}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    lo, hi = dt_limit
    if not (0.0 <= lo < hi):
        raise ValueError(f"dt_limit must be (lo, hi) with 0 <= lo < hi, got {dt_limit}")
    if seq_idx is not None and (seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool):
        raise ValueError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    _check_floating(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states)
    return SSDShape(b, L, h, p, g, n)


def _check_floating(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 inputs compute in float64; everything else (fp32, bf16, fp16) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def process_dt(dt: Tensor, dt_bias: Tensor | None = None, dt_softplus: bool = True,
               dt_limit: tuple[float, float] = (0.0, math.inf), dtype: torch.dtype | None = None) -> Tensor:
    """The step size actually used: ``clamp(softplus(dt + dt_bias), *dt_limit)`` (docs/design.md §1), in ``dtype``.

    Args:
        dt: (..., nheads) raw step sizes.
        dt_bias: (nheads,) or None.
    Returns:
        (..., nheads) tensor, fp32 unless ``dtype`` (or a float64 ``dt``) says otherwise.
    """
    dtype = dtype or (torch.float64 if dt.dtype == torch.float64 else torch.float32)
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or math.isfinite(hi):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def run_ids(seq_idx: Tensor | None, batch: int, seqlen: int, device: torch.device) -> Tensor | None:
    """Monotone run ids (batch, seqlen) int64: a new id wherever ``seq_idx`` changes from the previous token.

    Two positions share a run exactly when no document boundary lies between them, whatever the values of
    ``seq_idx`` (they need not be sorted). None when there is no ``seq_idx``.
    """
    if seq_idx is None:
        return None
    change = torch.zeros(batch, seqlen, dtype=torch.int64, device=device)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return change.cumsum(dim=1)


def epilogue(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """``y + D·x``, then ``· silu(z)`` if z is given. y, x, z: (batch, seqlen, nheads, headdim); y in compute dtype."""
    if D is not None:
        h, p = x.shape[-2:]
        Dv = D.to(y.dtype).reshape(h, p) if D.numel() == h * p else D.to(y.dtype).reshape(h, 1)
        y = y + x.to(y.dtype) * Dv
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def heads_per_group(shape: SSDShape) -> int:
    return shape.nheads // shape.ngroups


def segsum(dA: Tensor) -> Tensor:
    """Segment sums ``out[..., t, s] = dA[s+1] + … + dA[t]`` for t ≥ s, ``-inf`` above the diagonal (§6, "segsum").

    Summed directly over each masked segment rather than as a difference of cumulative sums, so that with
    ``dA ≤ 0`` every finite entry is ≤ 0 exactly and no cancellation occurs for large |A|·dt.

    Args:
        dA: (..., T). Returns (..., T, T) in dA's dtype.
    """
    T = dA.shape[-1]
    rep = dA.unsqueeze(-1).expand(*dA.shape, T)                                  # rep[..., i, j] = dA[i]
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=dA.device).tril(-1)
    out = rep.masked_fill(~strictly_lower, 0.0).cumsum(dim=-2)
    lower = torch.ones(T, T, dtype=torch.bool, device=dA.device).tril(0)
    return out.masked_fill(~lower, -math.inf)


def step_A(A: Tensor | None, A_log: Tensor | None) -> Tensor:
    """The decode step's A argument: A itself, or A_log when A is None (exactly one must be given).

    Raises:
        ValueError: both or neither given.
    """
    if (A is None) == (A_log is None):
        raise ValueError("ssd_step takes exactly one of A (nheads,) and A_log (nheads,), where A = -exp(A_log)")
    return A if A is not None else A_log


def check_step_inputs(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                      active: Tensor | None = None, state_indices: Tensor | None = None) -> None:
    """Validate the decode-step arguments: state (b, h, p, n) — or (S, h, p, n) with ``state_indices`` (b,)
    integer rows of it —, x (b, h, p), dt (b, h), A (h,), B/C (b, g, n), active (b,) bool."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    rows = state.shape[0] if state_indices is not None else b
    if state.shape != (rows, h, p, n) or dt.shape != (b, h) or B.shape != (b, g, n) or C.shape != (b, g, n) \
            or A.shape != (h,) or h % g != 0:
        raise ValueError(f"ssd_step shapes disagree: state {tuple(state.shape)}, x {tuple(x.shape)}, "
                         f"dt {tuple(dt.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}; "
                         f"expected state (b, h, p, n), x (b, h, p), dt (b, h), A (h,), B/C (b, g, n), h % g == 0")
    if active is not None and (active.dtype != torch.bool or tuple(active.shape) != (b,)):
        raise ValueError(f"active must be a ({b},) bool tensor (one flag per row), got dtype {active.dtype} "
                         f"and shape {tuple(active.shape)}")
    if state_indices is not None and (state_indices.dtype not in (torch.int32, torch.int64)
                                      or tuple(state_indices.shape) != (b,)):
        raise ValueError(f"state_indices must be a ({b},) int32/int64 tensor (the state row of each input row), "
                         f"got dtype {state_indices.dtype} and shape {tuple(state_indices.shape)}")
    _check_floating(state=state, x=x, dt=dt, A=A, B=B, C=C)
