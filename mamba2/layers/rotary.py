"""Rotary position embeddings (Su et al. 2021), on all or the first ``rotary_dim`` channels of each head.

Same convention as flash-attn's ``RotaryEmbedding`` used by mamba_ssm's MHA: frequencies
``base^(-2i/rotary_dim)``; non-interleaved (GPT-NeoX: rotate the two halves) by default, or interleaved
(GPT-J: rotate adjacent pairs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rotary_cos_sin(positions: Tensor, rotary_dim: int, base: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of ``position · base^(-2i/rotary_dim)``, i < rotary_dim / 2.

    Args:
        positions: (batch, L) integer positions (may differ per row: left padding, packed documents).
        dtype: float32 (as flash-attn) or float64.
    Returns:
        cos, sin: (batch, L, rotary_dim // 2) in ``dtype``.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=dtype) / rotary_dim)
    angles = positions.to(dtype).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` channels of every head of x; the rest pass through.

    Args:
        x: (batch, L, heads, head_dim), any float dtype.
        cos, sin: (batch, L, rotary_dim // 2) from :func:`rotary_cos_sin`.
    Returns:
        (batch, L, heads, head_dim) in x's dtype (the rotation is computed in float32, or float64 for float64 x).
    """
    rd = 2 * cos.shape[-1]
    if rd == 0:
        return x
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(ct).unsqueeze(2), sin.to(ct).unsqueeze(2)                     # (b, L, 1, rd/2)
    xr = x[..., :rd].to(ct)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        rot = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], dim=-1)
