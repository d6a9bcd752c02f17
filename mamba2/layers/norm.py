"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 block (§7.3: normalisation after the gate, per group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.layers.triton import use_kernels


def _upcast(x: Tensor) -> Tensor:
    """Norm statistics in float32, or float64 for float64 inputs."""
    return x if x.dtype == torch.float64 else x.float()


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _triton_norm(y: Tensor, z: Tensor | None, weight: Tensor, group_size: int):
    """The Triton norm module when the kernels should and can take these inputs (fp32/bf16/fp16), else None.
    Imported here so that mamba2 imports without Triton."""
    if not use_kernels(y):
        return None
    from mamba2.layers.triton import norm as triton_norm

    return triton_norm if triton_norm.supports(y, z, weight, group_size) else None


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim, computed in fp32, returned in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        tn = _triton_norm(x, None, self.weight, x.shape[-1])
        if tn is not None:
            return tn.gated_rms_norm(x, None, self.weight, group_size=x.shape[-1], eps=self.eps)
        x32 = _upcast(x)
        return (_rms_normalize(x32, self.eps) * self.weight.to(x32.dtype)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y · silu(z))`` (or ``RMSNorm(y) · silu(z)`` with ``norm_before_gate``), statistics per group.

    The d channels are split into contiguous groups of ``group_size``; each is normalised on its own, so the
    norm stays local to a tensor-parallel shard (DESIGN §2). ``group_size == d`` is the plain gated norm.
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        if group_size <= 0 or d % group_size != 0:
            raise ValueError(f"GatedRMSNorm: d % group_size == 0 required, got d={d}, group_size={group_size}")
        self.d, self.group_size, self.eps, self.norm_before_gate = d, group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        """y, z: (..., d). Returns (..., d) in y's dtype."""
        tn = _triton_norm(y, z, self.weight, self.group_size)
        if tn is not None:
            return tn.gated_rms_norm(y, z, self.weight, group_size=self.group_size, eps=self.eps,
                                     norm_before_gate=self.norm_before_gate)
        h = _upcast(y)
        if z is not None and not self.norm_before_gate:
            h = h * F.silu(z.to(h.dtype))
        shape = h.shape
        h = _rms_normalize(h.view(*shape[:-1], self.d // self.group_size, self.group_size), self.eps).view(shape)
        h = h * self.weight.to(h.dtype)
        if z is not None and self.norm_before_gate:
            h = h * F.silu(z.to(h.dtype))
        return h.to(y.dtype)
