"""RMSNorm and the grouped, gated RMSNorm of the Mamba-2 block (§7.3: normalisation after the gate, per group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2 import kernels

if kernels.available():
    from mamba2.layers.triton import norm as triton_norm
else:
    triton_norm = None


def _upcast(x: Tensor) -> Tensor:
    """Norm statistics in float32, or float64 for float64 inputs."""
    return x if x.dtype == torch.float64 else x.float()


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def _check_inputs(name: str, d: int, y: Tensor, z: Tensor | None) -> None:
    if y.dim() < 1 or y.shape[-1] != d:
        raise ValueError(f"{name} normalises {d} channels: the input must be (..., {d}), got shape {tuple(y.shape)}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"{name}: z must have the input's shape {tuple(y.shape)}, got {tuple(z.shape)}")


def _check_args(name: str, d: int, eps: float) -> None:
    if not isinstance(d, int) or d <= 0:
        raise ValueError(f"{name}: d must be a positive integer, got {d!r}")
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0, got {eps!r}")


def _use_triton(y: Tensor, z: Tensor | None, weight: Tensor, group_size: int) -> bool:
    """Whether the kernel policy picks the Triton norm for ``y`` and the kernels take these inputs."""
    return kernels.use_triton(y) and triton_norm.supports(y, z, weight, group_size)


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dim, computed in fp32, returned in x's dtype."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        _check_args("RMSNorm", d, eps)
        self.d, self.eps = d, eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d). Returns (..., d) in x's dtype. Raises ValueError for another last dimension."""
        _check_inputs("RMSNorm", self.d, x, None)
        if _use_triton(x, None, self.weight, x.shape[-1]):
            return triton_norm.gated_rms_norm(x, None, self.weight, group_size=x.shape[-1], eps=self.eps)
        x32 = _upcast(x)
        return (_rms_normalize(x32, self.eps) * self.weight.to(x32.dtype)).to(x.dtype)


    def add_forward(self, x: Tensor | None, residual: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The pre-norm residual step: ``residual' = residual + x.to(residual.dtype)`` (x None: no add), then
        ``(self(residual').to(out_dtype), residual')`` — one kernel on the Triton path (decode steps).

        x, residual: (rows, d). Returns (normalised (rows, d) in out_dtype, residual' in residual's dtype).
        """
        _check_inputs("RMSNorm", self.d, residual, x)
        if (x is None or x.dim() == 2) and residual.dim() == 2 and residual.stride(-1) == 1 \
                and (x is None or x.stride(-1) == 1) and not torch.is_grad_enabled() \
                and _use_triton(residual, x, self.weight, self.d) and out_dtype in kernels.KERNEL_DTYPES:
            return triton_norm.add_rms_norm(x, residual, self.weight, eps=self.eps, out_dtype=out_dtype)
        if x is not None:
            residual = residual + x.to(residual.dtype)
        return self(residual).to(out_dtype), residual


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y · silu(z))`` (or ``RMSNorm(y) · silu(z)`` with ``norm_before_gate``), statistics per group.

    The d channels are split into contiguous groups of ``group_size``; each is normalised on its own, so the
    norm stays local to a tensor-parallel shard (docs/design.md §2). ``group_size == d`` is the plain gated norm.

    A tensor-parallel shard of a group that spans ranks (ngroups = 1 under TP, docs/distributed.md §2) sets
    ``stat_reduce`` (sums the per-group sum of squares over the ranks) and ``stat_size`` (the whole group's size).
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False):
        super().__init__()
        _check_args("GatedRMSNorm", d, eps)
        if not isinstance(group_size, int) or group_size <= 0 or d % group_size != 0:
            raise ValueError(f"GatedRMSNorm: d % group_size == 0 required, got d={d}, group_size={group_size}")
        self.d, self.group_size, self.eps, self.norm_before_gate = d, group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(d))
        self.stat_reduce, self.stat_size = None, group_size

    def forward(self, y: Tensor, z: Tensor | None = None) -> Tensor:
        """y, z: (..., d), z of y's shape (no broadcasting). Returns (..., d) in y's dtype.

        Raises:
            ValueError: another last dimension, or z of another shape.
        """
        _check_inputs("GatedRMSNorm", self.d, y, z)
        if self.stat_reduce is None and _use_triton(y, z, self.weight, self.group_size):
            return triton_norm.gated_rms_norm(y, z, self.weight, group_size=self.group_size, eps=self.eps,
                                     norm_before_gate=self.norm_before_gate)
        h = _upcast(y)
        if z is not None and not self.norm_before_gate:
            h = h * F.silu(z.to(h.dtype))
        shape = h.shape
        h = h.view(*shape[:-1], self.d // self.group_size, self.group_size)
        if self.stat_reduce is None:
            h = _rms_normalize(h, self.eps).view(shape)
        else:
            sumsq = self.stat_reduce(h.pow(2).sum(dim=-1, keepdim=True))
            h = (h * torch.rsqrt(sumsq / self.stat_size + self.eps)).view(shape)
        h = h * self.weight.to(h.dtype)
        if z is not None and self.norm_before_gate:
            h = h * F.silu(z.to(h.dtype))
        return h.to(y.dtype)
