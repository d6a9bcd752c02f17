"""Optional Triton kernels for the layers around the SSD: the causal conv1d (forward, backward, decode update)
and the grouped gated RMSNorm (forward, backward). Used for CUDA tensors when Triton imports; the library runs
without Triton.

:func:`kernels` switches them: ``"auto"`` (default: CUDA tensors only), ``"off"`` (always the torch code) or
``"on"`` (any device; with ``TRITON_INTERPRET=1`` this runs the kernels on CPU, which is how the tests check them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib

from torch import Tensor

_MODES = ("auto", "off", "on")
_mode = "auto"


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when Triton imports."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_kernels(t: Tensor) -> bool:
    """Whether the layers should run their Triton kernels on tensor ``t``."""
    if _mode == "off" or not available():
        return False
    return _mode == "on" or t.is_cuda


@contextlib.contextmanager
def kernels(mode: str):
    """Context manager: run the layers with the kernels ``"auto"``, ``"off"`` or ``"on"`` inside the block.

    Raises:
        ValueError: an unknown mode.
    """
    global _mode
    if mode not in _MODES:
        raise ValueError(f"kernels mode must be one of {_MODES}, got {mode!r}")
    prev, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = prev
