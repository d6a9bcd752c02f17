"""The kernel policy: whether a call runs a Triton kernel or the torch code. One rule for every kernel in the
package (the SSD and its decode step, the causal conv, both norms); see docs/design.md §6.

Modes, set for a block of code with :func:`kernels` (held in a :class:`contextvars.ContextVar`, so each thread
and each asyncio task sees its own):

* ``"auto"`` (default): Triton for CUDA tensors when Triton imports, the torch code otherwise;
* ``"off"``: always the torch code;
* ``"on"``: Triton for every tensor it can take; a CPU tensor needs ``TRITON_INTERPRET=1`` in the environment
  before Triton is imported (how the tests run the kernels on CPU). Raises where the kernels cannot run.

Kernels take fp32, bf16 and fp16 tensors (:data:`KERNEL_DTYPES`); fp64 always runs the torch code, in every mode.

Launch parameters (block sizes, warps, what the backward keeps) live in one :class:`Tuning` table per kernel
family; they change speed and memory, never results, and are overridden only for a block of code with
:meth:`Tuning.tuned` (tests of other block sizes, benchmarks that price a variant), never process-wide.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from types import MappingProxyType
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the Triton kernels take."""
MODES = ("auto", "off", "on")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
"""Whether Triton runs its kernels in the interpreter (on CPU tensors); read once, at import."""

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("mamba2_kernels", default="auto")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when Triton imports."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def mode() -> str:
    """The mode in force here: ``"auto"``, ``"off"`` or ``"on"``."""
    return _MODE.get()


@contextlib.contextmanager
def kernels(new_mode: str) -> Iterator[None]:
    """Run the block with the kernels ``"auto"``, ``"off"`` or ``"on"``; the previous mode returns after it.

    Raises:
        ValueError: an unknown mode.
    """
    if new_mode not in MODES:
        raise ValueError(f"kernels mode must be one of {MODES}, got {new_mode!r}")
    token = _MODE.set(new_mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def can_run(t: Tensor) -> bool:
    """Whether a Triton kernel can take tensor ``t`` at all, whatever the mode: Triton imports, ``t`` is
    fp32/bf16/fp16, and ``t`` is a CUDA tensor (or any tensor under ``TRITON_INTERPRET=1``)."""
    return t.dtype in KERNEL_DTYPES and (t.is_cuda or INTERPRET) and available()


def use_triton(t: Tensor) -> bool:
    """The rule: should the kernel run on tensor ``t`` (the call's main input) in the current mode?

    Raises:
        RuntimeError: mode ``"on"`` when Triton does not import, or for a non-CUDA tensor without
            ``TRITON_INTERPRET=1`` (``"auto"`` would take the torch code there).
    """
    m = _MODE.get()
    if m == "off" or t.dtype not in KERNEL_DTYPES:
        return False
    if m == "auto":
        return t.is_cuda and available()
    if not available():
        raise RuntimeError('kernels("on") needs Triton, which does not import here (kernels("auto") falls back '
                           'to the torch code)')
    if not (t.is_cuda or INTERPRET):
        raise RuntimeError(f'kernels("on") with a {t.device.type} tensor needs TRITON_INTERPRET=1 in the '
                           f'environment before Triton is imported (the kernels compile for CUDA only)')
    return True


_TABLES: list["Tuning"] = []


def state() -> str:
    """The mode and every tuning override in force here, as one string: what a captured CUDA graph froze (a graph
    replays the kernels chosen when it was captured), so a cache of graphs keys on it."""
    return repr((mode(), [(t.family, sorted(t._overrides.get().items())) for t in _TABLES]))


class Tuning:
    """The launch parameters of one kernel family: entry name → parameters, read-only defaults plus overrides
    that hold inside :meth:`tuned` blocks (per thread / task, like the mode).

    ``table[entry]`` is a fresh dict of the parameters in force (callers may pop from it).
    """

    def __init__(self, family: str, defaults: Mapping[str, Mapping[str, Any]]):
        _TABLES.append(self)
        self.family = family
        self.defaults = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in defaults.items()})
        self._overrides: contextvars.ContextVar[dict[str, dict]] = contextvars.ContextVar(
            f"mamba2_tuning_{family}", default={})

    def __getitem__(self, entry: str) -> dict[str, Any]:
        return {**self.defaults[entry], **self._overrides.get().get(entry, {})}

    def current(self) -> dict[str, dict[str, Any]]:
        """Every entry's parameters in force (e.g. to record with a benchmark's results)."""
        return {k: self[k] for k in self.defaults}

    @contextlib.contextmanager
    def tuned(self, **overrides: Mapping[str, Any]) -> Iterator[None]:
        """Run the block with some parameters changed: ``tuned(scan_fwd=dict(BK=64))``; nested blocks stack.

        Raises:
            ValueError: an entry or a parameter the table does not have (naming it and the known ones).
        """
        for entry, params in overrides.items():
            if entry not in self.defaults:
                raise ValueError(f"{self.family} tuning has no entry {entry!r}; entries: {', '.join(self.defaults)}")
            unknown = sorted(set(params) - set(self.defaults[entry]))
            if unknown:
                raise ValueError(f"{self.family} tuning entry {entry!r} has no parameters {unknown}; it has "
                                 f"{', '.join(self.defaults[entry])}")
        merged = {k: dict(v) for k, v in self._overrides.get().items()}
        for entry, params in overrides.items():
            merged.setdefault(entry, {}).update(params)
        token = self._overrides.set(merged)
        try:
            yield
        finally:
            self._overrides.reset(token)


def keeps_context(cls: type) -> type:
    """Class decorator for a custom ``torch.autograd.Function`` that launches kernels: its backward runs with the
    kernel mode and tuning overrides its forward ran with (a copy of the forward's :mod:`contextvars` context).

    Why: torch runs the backward of CUDA tensors on its own per-device thread, where this module's context
    variables hold their defaults, so a ``kernels(...)`` or ``tuned(...)`` block reached the forward's kernels but
    silently not the backward's (on CPU the backward runs in the caller's thread, which hid it).
    """
    forward, backward = cls.forward, cls.backward

    @functools.wraps(forward)
    def forward_keeping(ctx, *args):
        ctx.kernel_context = contextvars.copy_context()
        return forward(ctx, *args)

    @functools.wraps(backward)
    def backward_in_context(ctx, *grads):
        return ctx.kernel_context.copy().run(backward, ctx, *grads)

    cls.forward, cls.backward = staticmethod(forward_keeping), staticmethod(backward_in_context)
    cls.keeps_kernel_context = True
    return cls


def hooked(*modules: torch.nn.Module) -> bool:
    """Whether a kernel that reads these modules' weights directly would bypass something a call of the modules
    runs: forward (pre-)hooks on any of them (pruning and weight norm recompute the weight in a pre-hook), or
    global forward hooks."""
    from torch.nn.modules import module as M

    if any(getattr(M, name, None) for name in ("_global_forward_pre_hooks", "_global_forward_hooks")):
        return True
    return any(m._forward_pre_hooks or m._forward_hooks for m in modules)
