"""The projections of a decode step (in_proj, out_proj, the LM head; docs/design.md §7.1): ``nn.Linear``, or the
few-rows GEMV kernel (:mod:`mamba2.layers.triton.gemv`) where the kernel policy and its tuning say so."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mamba2 import kernels

if kernels.available():
    from mamba2.layers.triton import gemv
else:
    gemv = None


def decode_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for x (rows, in_features); the GEMV kernel when :func:`mamba2.kernels.use_triton` takes x,
    ``layer`` is a plain ``nn.Linear``, :func:`mamba2.layers.triton.gemv.takes` the shape (few rows), and neither
    autograd nor autocast is on (the kernel has no backward and keeps x's dtype). Same results up to the order of
    the fp32 sums."""
    if (gemv is not None and type(layer) is nn.Linear and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type) and kernels.use_triton(x)
            and gemv.takes(x, layer.weight)):
        return gemv.linear_rows(x, layer.weight, layer.bias)
    return layer(x)
