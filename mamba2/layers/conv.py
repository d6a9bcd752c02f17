"""Causal depthwise 1-D convolution with a decoding state (the short conv of the Mamba block, §7)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.layers import triton as _triton
from mamba2.ssd.common import run_ids

ACTIVATIONS = (None, "silu")


def check_conv_inputs(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, seq_idx: Tensor | None = None,
                      conv_state: Tensor | None = None, activation: str | None = None) -> tuple[int, int, int, int]:
    """Validate the causal conv's arguments; return ``(batch, L, channels, d_conv)``.

    Args:
        x: (batch, L, channels). weight: (channels, d_conv). bias: (channels,) or None.
        seq_idx: (batch, L) integers or None. conv_state: (batch, d_conv - 1, channels) or None.
        activation: None or "silu".
    Raises:
        ValueError: naming the argument, the constraint and the values it got.
    """
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"conv weight must be (channels, d_conv) with both > 0, got shape {tuple(weight.shape)}")
    ch, K = weight.shape
    if x.dim() != 3 or x.shape[2] != ch:
        raise ValueError(f"CausalConv1d expects {ch} channels, got input of shape {tuple(x.shape)} "
                         f"(x must be (batch, L, channels))")
    b, L = x.shape[0], x.shape[1]
    if bias is not None and tuple(bias.shape) != (ch,):
        raise ValueError(f"conv bias must be {(ch,)}, got {tuple(bias.shape)}")
    if conv_state is not None and tuple(conv_state.shape) != (b, K - 1, ch):
        raise ValueError(f"conv_state must be {(b, K - 1, ch)}, got {tuple(conv_state.shape)}")
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (b, L):
            raise ValueError(f"seq_idx must be {(b, L)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got dtype {seq_idx.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return b, L, ch, K


def causal_conv1d_torch(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, seq_idx: Tensor | None = None,
                        conv_state: Tensor | None = None, activation: str | None = None) -> tuple[Tensor, Tensor]:
    """The torch code of :meth:`CausalConv1d.forward` (any dtype, any device; the kernels' reference).

    Same arguments and results as :func:`mamba2.layers.triton.conv.causal_conv1d`; weight (channels, d_conv).
    """
    b, L, ch, K = check_conv_inputs(x, weight, bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)
    if conv_state is None:
        conv_state = x.new_zeros(b, K - 1, ch)
    xp = torch.cat([conv_state.to(x.dtype), x], dim=1)                         # (b, L + K - 1, ch)
    w = weight.to(x.dtype)                                                      # (ch, K)
    if seq_idx is None:  # one fused multiply-add per tap into a single output buffer
        y = (xp[:, :L] * w[:, 0] if bias is None else torch.addcmul(bias.to(x.dtype), xp[:, :L], w[:, 0]))
        for k in range(1, K):
            y.addcmul_(xp[:, k:k + L], w[:, k])
    else:
        cur = run_ids(seq_idx, b, L, x.device)
        runs = torch.cat([cur[:, :1].expand(b, K - 1), cur], dim=1)
        y = None
        for k in range(K):
            tap = xp[:, k:k + L] * w[:, k]
            if k < K - 1:
                tap = tap * (runs[:, k:k + L] == cur).to(x.dtype).unsqueeze(-1)
            y = tap if y is None else y + tap
        if bias is not None:
            y = y + bias.to(x.dtype)
    if activation == "silu":
        y = F.silu(y)
    return y, xp[:, L:]


class CausalConv1d(nn.Module):
    """Depthwise causal conv over the sequence: ``y_t = bias + Σ_k weight[:, 0, k] · x_{t-(d_conv-1)+k}``.

    Parameters are laid out like ``nn.Conv1d(channels, channels, d_conv, groups=channels)``: ``weight`` is
    (channels, 1, d_conv), ``bias`` (channels,), so official checkpoints load unchanged.
    """

    def __init__(self, channels: int, d_conv: int, bias: bool = True):
        super().__init__()
        if not (isinstance(channels, int) and isinstance(d_conv, int) and channels > 0 and d_conv > 0):
            raise ValueError(f"CausalConv1d needs integers channels > 0 and d_conv > 0, got channels={channels!r}, "
                             f"d_conv={d_conv!r}")
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

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, conv_state: Tensor | None = None,
                activation: str | None = None) -> tuple[Tensor, Tensor]:
        """Convolve causally (then apply ``activation``); return exactly L outputs and the state for the next call.

        Runs the Triton kernels (:mod:`mamba2.layers.triton.conv`) when :func:`mamba2.layers.triton.use_kernels`
        says so for ``x`` and every tensor is fp32/bf16/fp16; otherwise the torch code. Same results either way.

        Args:
            x: (batch, L, channels), any L >= 1, contiguous or not.
            seq_idx: optional (batch, L) ints; the window never reaches across a change of value (a document
                boundary): earlier taps read zeros, as at the start of a sequence. ``conv_state`` counts as part
                of the first token's document.
            conv_state: optional (batch, d_conv - 1, channels), the previous d_conv - 1 inputs (zeros if None).
            activation: None or ``"silu"`` (applied to the output, fused into the kernel).
        Returns:
            y: (batch, L, channels) in x's dtype; new_state: (batch, d_conv - 1, channels), the last d_conv - 1
            inputs of ``[conv_state, x]``, in x's dtype.
        Raises:
            ValueError: wrong shapes, a non-integer seq_idx or an unknown activation.
        """
        w = self.weight[:, 0, :]                                                    # (ch, K), a view
        # both paths validate the arguments (check_conv_inputs) before any compute
        if (x.dim() == 3 and x.shape[1] >= 1
                and all(t is None or t.dtype in _triton.KERNEL_DTYPES for t in (x, w, self.bias, conv_state))
                and _triton.use_kernels(x)):
            from mamba2.layers.triton.conv import causal_conv1d

            return causal_conv1d(x, w, self.bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)
        return causal_conv1d_torch(x, w, self.bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)
