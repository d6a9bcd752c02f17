"""The SSD algorithm family (Dao & Gu 2024, §3–6) behind one signature and one dispatcher.

Backends: ``recurrent`` (sequential scan, the reference), ``quadratic`` (masked-attention dual form),
``chunked`` (the chunked SSD algorithm in PyTorch, the default off CUDA) and ``triton`` (fused kernels, registered
here when Triton imports). :func:`ssd` and the decoding step :func:`ssd_step` dispatch through the same table;
which kernel runs is decided by the one rule of :mod:`mamba2.kernels`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mamba2 import kernels
from mamba2.errors import type_name
from mamba2.ssd.chunked import ssd_chunked
from mamba2.ssd.common import process_dt, run_ids, segsum
from mamba2.ssd.quadratic import ssd_quadratic
from mamba2.ssd.recurrent import ssd_recurrent
from mamba2.ssd.step import ssd_step_torch
from mamba2.ssd.varlen import Documents, check_cu_seqlens, varlen_final_states


@dataclass(frozen=True)
class Backend:
    """One SSD implementation: ``fn`` has the :func:`ssd` signature, ``step`` (or None) the :func:`ssd_step` one.

    ``supports(t)`` says whether it can take tensor ``t`` (device, dtype). ``kernel`` marks a Triton backend: the
    automatic choice takes it only where :func:`mamba2.kernels.use_triton` says so.
    """

    name: str
    fn: Callable
    step: Callable | None
    supports: Callable[[Tensor], bool]
    priority: int
    kernel: bool = False


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, *, step: Callable | None = None,
                     supports: Callable[[Tensor], bool] = lambda t: True, priority: int = 0,
                     kernel: bool = False) -> None:
    """Make ``fn`` (with the :func:`ssd` signature; ``step`` with :func:`ssd_step`'s) selectable; the
    highest-priority backend that supports the input and that the kernel policy allows is chosen automatically."""
    _BACKENDS[name] = Backend(name, fn, step, supports, priority, kernel)


def backends() -> list[str]:
    """Names of the registered backends, best first."""
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)]


def select_backend(t: Tensor, name: str | None = None, *, step: bool = False) -> Backend:
    """The backend ``name`` or, when None, the best registered one for tensor ``t`` (``x`` for :func:`ssd`, the
    state for :func:`ssd_step`): a kernel backend only where :func:`mamba2.kernels.use_triton` allows it.

    Raises:
        ValueError: for an unknown name, a named backend that does not support ``t`` or (``step``) has no
            decode step.
        RuntimeError: ``kernels("on")`` where the kernels cannot run (see :func:`mamba2.kernels.use_triton`).
    """
    what = "decode step" if step else "SSD"
    if name is not None:
        if name not in _BACKENDS:
            raise ValueError(f"unknown SSD backend {name!r}; registered: {', '.join(backends())}")
        be = _BACKENDS[name]
        if step and be.step is None:
            raise ValueError(f"SSD backend {name!r} has no decode step")
        if not be.supports(t):
            raise ValueError(f"SSD backend {name!r} does not support {t.device.type} tensors of dtype {t.dtype}")
        return be
    for be in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if step and be.step is None:
            continue
        if (kernels.use_triton(t) and be.supports(t)) if be.kernel else be.supports(t):
            return be
    raise ValueError(f"no {what} backend supports {t.device.type} tensors of dtype {t.dtype}")


def _check_tensors(required: dict, optional: dict) -> None:
    """Raises ValueError naming the first argument that is not a torch.Tensor (``optional`` ones may be None): a
    numpy array or a list fails deep inside with an AttributeError or a TypeError, which the entry points turn into
    this on their error path (the check costs nothing on every decode step's call)."""
    for name, t in (*required.items(), *optional.items()):
        if not isinstance(t, Tensor) and not (t is None and name in optional):
            raise ValueError(f"{name} must be a torch.Tensor, got {type_name(t)}") from None


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None, z: Tensor | None = None,
        dt_bias: Tensor | None = None, dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
        initial_states: Tensor | None = None, seq_idx: Tensor | None = None,
        cu_seqlens: Tensor | Documents | None = None, chunk_size: int = 256, return_final_states: bool = False,
        backend: str | None = None):
    """Run the selective state space model ``S_t = exp(dt_t·A)·S_{t-1} + dt_t·x_t⊗B_t``, ``y_t = S_t·C_t + D·x_t``.

    Args:
        x: (batch, seqlen, nheads, headdim), fp32/bf16/fp16/fp64.
        dt: (batch, seqlen, nheads) raw step sizes; the step used is ``clamp(softplus(dt + dt_bias), *dt_limit)``
            (softplus only if ``dt_softplus``).
        A: (nheads,) decay rates <= 0 (``-exp(A_log)``). Not checked (a host read, a device wait on a GPU): an
            entry > 0 asks for a growing recurrence, which the chunked backends do not compute (they clamp
            segment-sum exponents to <= 0, docs/design.md §1) and which overflows to inf/NaN at moderate lengths.
        B, C: (batch, seqlen, ngroups, d_state); head h reads group ``h // (nheads // ngroups)``.
        D: optional skip, (nheads,) or (nheads·headdim,).
        z: optional gate (batch, seqlen, nheads, headdim): the output is multiplied by ``silu(z)``.
        dt_bias: optional (nheads,).
        dt_limit: (lo, hi) clamp of the processed dt; (0, inf) means none.
        initial_states: optional (batch, nheads, headdim, d_state), the state before token 0 (first document).
        seq_idx: optional (batch, seqlen) int document index of each token; nothing crosses a change of value.
        cu_seqlens: optional (K + 1,) int cumulative document lengths ``[0, l0, l0+l1, …, seqlen]`` of one packed
            row (batch 1), instead of ``seq_idx``: final states are then returned per document (a serving
            engine's packed prefill, docs/design.md §7). A :class:`mamba2.ssd.varlen.Documents` made once
            serves many calls without re-reading the boundaries.
        chunk_size: tokens per chunk Q of the chunked algorithm (§6); any seqlen is allowed.
        return_final_states: also return the state after the last token, (batch, nheads, headdim, d_state),
            float32 (float64 for float64 inputs); with ``cu_seqlens``, the state after each document's last token,
            (K, nheads, headdim, d_state), computed on a chunk grid per document (:mod:`mamba2.ssd.varlen`).
        backend: a name from :func:`backends` to force one; None picks the best for ``x`` under the kernel policy
            (:mod:`mamba2.kernels`: Triton for CUDA tensors by default, never inside ``kernels("off")``).
    Returns:
        y (batch, seqlen, nheads, headdim) in x's dtype, or ``(y, final_states)``.
    Raises:
        ValueError: an argument that is not a torch.Tensor (a numpy array, naming it), shapes that disagree
            (naming the tensor), ``nheads % ngroups != 0``, ``chunk_size <= 0``, a bad ``dt_limit``, an unknown or
            unsupported backend; ``cu_seqlens`` together with ``seq_idx``, with batch > 1, or not a valid boundary
            list for seqlen.
        RuntimeError: ``kernels("on")`` where the kernels cannot run.
    """
    try:
        fn = select_backend(x, backend).fn
        if cu_seqlens is None:
            return fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                      initial_states=initial_states, seq_idx=seq_idx, chunk_size=chunk_size,
                      return_final_states=return_final_states)
        docs = _check_packed(x, seq_idx, cu_seqlens, initial_states)
        y = fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
               initial_states=initial_states, seq_idx=docs.seq_idx, chunk_size=chunk_size)
        if not return_final_states:
            return y
        kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states)
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                               for t in (x, dt, A, B, dt_bias, initial_states))
        if _varlen_states_triton is not None and not grad and kernels.use_triton(x):   # the kernel has no backward
            return y, _varlen_states_triton(x, dt, A, B, docs.bounds, **kw)
        return y, varlen_final_states(x, dt, A, B, docs, chunk_size=chunk_size, **kw)
    except (AttributeError, TypeError):     # a numpy array or a list fails inside without naming itself
        _check_tensors(dict(x=x, dt=dt, A=A, B=B, C=C),
                       dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx))
        raise


def _check_packed(x: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor | Documents,
                  initial_states: Tensor | None) -> Documents:
    if x.dim() != 4:
        raise ValueError(f"x must be (1, seqlen, nheads, headdim) with cu_seqlens, got shape {tuple(x.shape)}")
    docs = Documents.packed(cu_seqlens, x.shape[0], x.shape[1], x.device, seq_idx=seq_idx)
    if initial_states is not None and docs.cu[1] == 0:
        raise ValueError("initial_states belong to the first document, which is empty here (cu_seqlens[1] == 0)")
    return docs


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor | None, B: Tensor, C: Tensor, *, D: Tensor | None = None,
             z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
             dt_limit: tuple[float, float] = (0.0, math.inf), active: Tensor | None = None,
             state_indices: Tensor | None = None, A_log: Tensor | None = None,
             backend: str | None = None) -> Tensor:
    """Advance a decoding state by one token, in place; return ``y`` (§6, recurrent mode).

    Arguments and results as :func:`mamba2.ssd.step.ssd_step_torch` (state (batch, nheads, headdim, d_state),
    float32 by default; x (batch, nheads, headdim); dt (batch, nheads) raw; B, C (batch, ngroups, d_state);
    ``active`` (batch,) bool keeps the state of False rows byte-identical; ``state_indices`` (batch,) picks the
    rows of a larger state pool that the batch advances; ``A=None`` with ``A_log`` computes A = -exp(A_log) inside
    the step). The backend is chosen for the state
    tensor like :func:`ssd` chooses it for x; ``backend`` forces one.

    Raises:
        ValueError: an argument that is not a torch.Tensor (naming it), mismatched shapes, non-float tensors, an
            unknown backend or one without a decode step.
        RuntimeError: ``kernels("on")`` where the kernels cannot run.
    """
    try:
        return select_backend(state, backend, step=True).step(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
            active=active, state_indices=state_indices, A_log=A_log)
    except (AttributeError, TypeError):     # as in ssd: the argument types are checked on the error path only
        _check_tensors(dict(state=state, x=x, dt=dt, B=B, C=C),
                       dict(A=A, D=D, z=z, dt_bias=dt_bias, active=active, state_indices=state_indices,
                            A_log=A_log))
        raise


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, seqlen: int | None = None) -> Tensor:
    """Convert cumulative document lengths ``[0, l0, l0+l1, …, total]`` of one packed row to ``seq_idx`` (1, total)
    int32 (its first ``seqlen`` positions when given), on ``cu_seqlens``' device.

    Raises:
        ValueError: as :func:`mamba2.ssd.varlen.check_cu_seqlens` (not 1-D integers, not starting at 0,
            decreasing somewhere).
    """
    whole = isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() > 0
    total = int(cu_seqlens[-1]) if whole else -1
    seq_idx = Documents.of(cu_seqlens, total, getattr(cu_seqlens, "device", "cpu")).seq_idx
    return seq_idx if seqlen is None else seq_idx[:, :seqlen]


register_backend("recurrent", ssd_recurrent, step=ssd_step_torch, priority=-20)
register_backend("quadratic", ssd_quadratic, step=ssd_step_torch, priority=-10)
register_backend("chunked", ssd_chunked, step=ssd_step_torch, priority=0)

# The Triton backend (CUDA, or CPU under TRITON_INTERPRET=1), only when Triton imports: the library runs without.
_varlen_states_triton = None
if kernels.available():
    try:
        from mamba2.ssd.triton.backend import ssd_step_triton, ssd_triton
        from mamba2.ssd.triton.backend import varlen_states_triton as _varlen_states_triton
    except Exception as _e:  # a broken Triton install must not break the library
        import warnings
        warnings.warn(f"mamba2: Triton SSD backend not available: {_e!r}")
    else:
        register_backend("triton", ssd_triton, step=ssd_step_triton, supports=kernels.can_run, priority=10,
                         kernel=True)

__all__ = ["Backend", "ssd", "ssd_step", "ssd_step_torch", "ssd_recurrent", "ssd_quadratic", "ssd_chunked",
           "register_backend", "backends", "select_backend", "process_dt", "run_ids", "segsum",
           "seq_idx_from_cu_seqlens", "check_cu_seqlens", "varlen_final_states", "Documents"]
