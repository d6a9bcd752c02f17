"""Causal depthwise 1-D convolution with a decoding state (the short conv of the Mamba block, §7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mamba2.ssd.common import run_ids


class CausalConv1d(nn.Module):
    """Depthwise causal conv over the sequence: ``y_t = bias + Σ_k weight[:, 0, k] · x_{t-(d_conv-1)+k}``.

    Parameters are laid out like ``nn.Conv1d(channels, channels, d_conv, groups=channels)``: ``weight`` is
    (channels, 1, d_conv), ``bias`` (channels,), so official checkpoints load unchanged.
    """

    def __init__(self, channels: int, d_conv: int, bias: bool = True):
        super().__init__()
        if channels <= 0 or d_conv <= 0:
            raise ValueError(f"CausalConv1d needs channels > 0 and d_conv > 0, got channels={channels}, d_conv={d_conv}")
        self.channels, self.d_conv = channels, d_conv
        self.weight = nn.Parameter(torch.empty(channels, 1, d_conv))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default initialisation (fan_in = d_conv for a depthwise conv).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.d_conv)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None,
                conv_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Convolve causally; return exactly L outputs and the state for the next call.

        Args:
            x: (batch, L, channels), any L >= 1, contiguous or not.
            seq_idx: optional (batch, L) ints; the window never reaches across a change of value (a document
                boundary): earlier taps read zeros, as at the start of a sequence.
            conv_state: optional (batch, d_conv - 1, channels), the previous d_conv - 1 inputs (zeros if None).
        Returns:
            y: (batch, L, channels) in x's dtype; new_state: (batch, d_conv - 1, channels), the last d_conv - 1 inputs.
        """
        b, L, ch = x.shape
        K = self.d_conv
        if ch != self.channels:
            raise ValueError(f"CausalConv1d expects {self.channels} channels, got input of shape {tuple(x.shape)}")
        if conv_state is None:
            conv_state = x.new_zeros(b, K - 1, ch)
        elif conv_state.shape != (b, K - 1, ch):
            raise ValueError(f"conv_state must be {(b, K - 1, ch)}, got {tuple(conv_state.shape)}")
        xp = torch.cat([conv_state.to(x.dtype), x], dim=1)                         # (b, L + K - 1, ch)
        w = self.weight[:, 0, :].to(x.dtype)                                        # (ch, K)
        if seq_idx is not None:
            if seq_idx.shape != (b, L):
                raise ValueError(f"seq_idx must be {(b, L)}, got {tuple(seq_idx.shape)}")
            cur = run_ids(seq_idx, b, L, x.device)
            runs = torch.cat([cur[:, :1].expand(b, K - 1), cur], dim=1)
        if seq_idx is None:  # one fused multiply-add per tap into a single output buffer
            y = (xp[:, :L] * w[:, 0] if self.bias is None
                 else torch.addcmul(self.bias.to(x.dtype), xp[:, :L], w[:, 0]))
            for k in range(1, K):
                y.addcmul_(xp[:, k:k + L], w[:, k])
            return y, xp[:, L:]
        y = None
        for k in range(K):
            tap = xp[:, k:k + L] * w[:, k]
            if k < K - 1:
                tap = tap * (runs[:, k:k + L] == cur).to(x.dtype).unsqueeze(-1)
            y = tap if y is None else y + tap
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y, xp[:, L:]
