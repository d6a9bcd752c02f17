"""Triton backend of the SSD (chunked forward, backward, decode step). Needs Triton; imported by
:mod:`mamba2.ssd` only when Triton is importable.

:func:`register` adds the ``"triton"`` backend to the SSD dispatcher (chosen automatically for CUDA tensors in
fp32/bf16/fp16, ahead of ``chunked``) and returns a decode-step function that routes CUDA states to the Triton
step kernel and everything else to the given torch step.
"""

from __future__ import annotations

import functools

from mamba2.ssd.triton.backend import ssd_step_triton, ssd_triton, step_supports, supports


def register(torch_step=None):
    """Register the ``triton`` SSD backend (priority 10); return ``torch_step`` wrapped with the CUDA fast path."""
    from mamba2.ssd import register_backend

    register_backend("triton", ssd_triton, supports=supports, priority=10)
    if torch_step is None:
        return None

    @functools.wraps(torch_step)
    def ssd_step(state, x, dt, A, B, C, **kw):
        if step_supports(state) and x.device == state.device:
            return ssd_step_triton(state, x, dt, A, B, C, **kw)
        return torch_step(state, x, dt, A, B, C, **kw)

    return ssd_step


__all__ = ["register", "ssd_triton", "ssd_step_triton"]
