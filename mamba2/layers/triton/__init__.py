"""Optional Triton kernels for the layers around the SSD: the causal conv1d (forward, backward, decode update)
and the grouped gated RMSNorm (forward, backward). Used for CUDA tensors when Triton imports; the library runs
without Triton.

:func:`kernels` switches them: ``"auto"`` (default: CUDA tensors only), ``"off"`` (always the torch code) or
``"on"`` (the kernels for every fp32/bf16/fp16 input: on CPU this needs ``TRITON_INTERPRET=1``, which is how the
tests check them, and raises a RuntimeError without it or without Triton). The mode is process-wide.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the layer kernels take; float64 always runs the torch code."""
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
    """Whether the layers should run their Triton kernels on tensor ``t``.

    Raises:
        RuntimeError: mode ``"on"`` when Triton does not import, or for a non-CUDA tensor without
            ``TRITON_INTERPRET=1`` (the kernels cannot run there; ``"auto"`` would take the torch code).
    """
    if _mode == "off":
        return False
    if _mode == "auto":
        return t.is_cuda and available()
    if not available():
        raise RuntimeError('kernels("on") needs Triton, which does not import here (kernels("auto") falls back '
                           'to the torch code)')
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f'kernels("on") with a {t.device.type} tensor needs TRITON_INTERPRET=1 in the '
                           f'environment before Triton is imported (the kernels compile for CUDA only)')
    return True


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
