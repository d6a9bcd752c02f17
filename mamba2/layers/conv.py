"""Causal depthwise 1-D convolution with a decoding state (the short conv of the Mamba block, §7)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mamba2 import kernels
from mamba2.layers.conv_ref import causal_conv1d_torch, conv_update_torch, varlen_conv_states
from mamba2.ssd.varlen import Documents

if kernels.available():
    from mamba2.layers.triton.conv import causal_conv1d as causal_conv1d_triton
    from mamba2.layers.triton.conv import conv_update as conv_update_triton
else:
    causal_conv1d_triton = conv_update_triton = None


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

    def forward(self, x: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Tensor | Documents | None = None,
                conv_state: Tensor | None = None, activation: str | None = None) -> tuple[Tensor, Tensor]:
        """Convolve causally (then apply ``activation``); return exactly L outputs and the state for the next call.

        Runs the Triton kernels (:mod:`mamba2.layers.triton.conv`) when :func:`mamba2.kernels.use_triton` says so
        for ``x`` and every tensor is fp32/bf16/fp16; otherwise the torch code. Same results either way.

        Args:
            x: (batch, L, channels), any L >= 1, contiguous or not.
            seq_idx: optional (batch, L) ints; the window never reaches across a change of value (a document
                boundary): earlier taps read zeros, as at the start of a sequence. ``conv_state`` counts as part
                of the first token's document.
            cu_seqlens: optional (K + 1,) int document boundaries of one packed row (batch 1), instead of
                ``seq_idx``: new_state is then one window per document (a serving engine's packed prefill).
            conv_state: optional (batch, d_conv - 1, channels), the previous d_conv - 1 inputs (zeros if None).
            activation: None or ``"silu"`` (applied to the output, fused into the kernel).
        Returns:
            y: (batch, L, channels) in x's dtype; new_state: (batch, d_conv - 1, channels), the last d_conv - 1
            inputs of ``[conv_state, x]``, in x's dtype — with ``cu_seqlens``, (K, d_conv - 1, channels), each
            document's last d_conv - 1 inputs (zeros before its start).
        Raises:
            ValueError: wrong shapes, a non-integer seq_idx, an unknown activation; ``cu_seqlens`` with
                ``seq_idx``, ``conv_state`` or batch > 1, or boundaries that do not fit L.
            RuntimeError: ``kernels("on")`` where the kernels cannot run.
        """
        if cu_seqlens is not None:
            if conv_state is not None or x.dim() != 3:
                raise ValueError(f"cu_seqlens describes one packed row, without conv_state: x must be (1, L, "
                                 f"channels), got {tuple(x.shape)}" + (" and a conv_state" if conv_state is not None
                                                                        else ""))
            docs = Documents.packed(cu_seqlens, x.shape[0], x.shape[1], x.device, seq_idx=seq_idx)
            y, _ = self(x, seq_idx=docs.seq_idx, activation=activation)
            return y, varlen_conv_states(x, docs, self.d_conv)
        w = self.weight[:, 0, :]                                                    # (ch, K), a view
        # both paths validate the arguments (check_conv_inputs) before any compute
        fn = causal_conv1d_torch
        if (x.dim() == 3 and x.shape[1] >= 1 and kernels.use_triton(x)
                and all(t is None or t.dtype in kernels.KERNEL_DTYPES for t in (w, self.bias, conv_state))):
            fn = causal_conv1d_triton
        return fn(x, w, self.bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)

    def update(self, x: Tensor, conv_state: Tensor, state_indices: Tensor, *, activation: str | None = None) -> Tensor:
        """One decode token per row through the windows ``conv_state[state_indices]`` of a pool of states, which
        are shifted in place (the serving engine's slots, docs/design.md §7); other rows are not touched.

        Args:
            x: (batch, channels). conv_state: (S, d_conv - 1, channels). state_indices: (batch,) int64, distinct.
            activation: None or "silu".
        Returns:
            y: (batch, channels) in x's dtype, what :meth:`forward` gives for that token.
        Raises:
            ValueError: wrong shapes or dtypes (:func:`mamba2.layers.conv_ref.check_conv_update_inputs`).
        """
        w = self.weight[:, 0, :]
        fn = conv_update_torch
        if kernels.use_triton(x) and all(t is None or t.dtype in kernels.KERNEL_DTYPES
                                         for t in (x, w, self.bias, conv_state)):
            fn = conv_update_triton
        return fn(x, conv_state, w, self.bias, state_indices, activation=activation)
