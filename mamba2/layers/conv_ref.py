"""The torch code of the causal depthwise conv1d: argument checks and the reference computation that the Triton
kernels (:mod:`mamba2.layers.triton.conv`) are tested against. :class:`mamba2.layers.conv.CausalConv1d` picks one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mamba2.ssd.common import run_ids
from mamba2.ssd.varlen import Documents

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
    """The torch code of :meth:`mamba2.layers.conv.CausalConv1d.forward` (any dtype, any device).

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


def varlen_conv_states(x: Tensor, docs: Documents, d_conv: int) -> Tensor:
    """The conv window each document of a packed row leaves: its last d_conv - 1 inputs, zeros before its start.

    Args:
        x: (1, T, channels), the conv's input. docs: the row's documents (:class:`mamba2.ssd.varlen.Documents`).
    Returns:
        (K, d_conv - 1, channels) in x's dtype: what :func:`causal_conv1d_torch` returns as the new state for each
        document run alone.
    """
    pos, inside = docs.windows(d_conv - 1)
    return x[0][pos] * inside[..., None].to(x.dtype)


def check_conv_update_inputs(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                             state_indices: Tensor, *, activation: str | None = None) -> tuple[int, int, int]:
    """Validate the arguments of the slot-indexed decode update; return ``(batch, channels, d_conv)``.

    Raises:
        ValueError: naming the argument, the constraint and the values it got.
    """
    if weight.dim() != 2:
        raise ValueError(f"conv weight must be (channels, d_conv), got shape {tuple(weight.shape)}")
    ch, K = weight.shape
    if x.dim() != 2 or x.shape[1] != ch:
        raise ValueError(f"conv update: x must be (batch, {ch}), got shape {tuple(x.shape)}")
    b = x.shape[0]
    if conv_state.dim() != 3 or tuple(conv_state.shape[1:]) != (K - 1, ch):
        raise ValueError(f"conv update: conv_state must be (slots, {K - 1}, {ch}), got {tuple(conv_state.shape)}")
    if bias is not None and tuple(bias.shape) != (ch,):
        raise ValueError(f"conv bias must be {(ch,)}, got {tuple(bias.shape)}")
    if state_indices.dtype not in (torch.int32, torch.int64) or tuple(state_indices.shape) != (b,):
        raise ValueError(f"state_indices must be a ({b},) int32/int64 tensor, got dtype {state_indices.dtype} "
                         f"and shape {tuple(state_indices.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return b, ch, K


def conv_update_torch(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, state_indices: Tensor, *,
                      activation: str | None = None) -> Tensor:
    """The torch code of :func:`mamba2.layers.triton.conv.conv_update`: one token per row, x (batch, channels),
    through the windows ``conv_state[state_indices]`` of a pool (S, d_conv - 1, channels), shifted in place.
    Returns y (batch, channels) in x's dtype."""
    check_conv_update_inputs(x, conv_state, weight, bias, state_indices, activation=activation)
    window = conv_state.index_select(0, state_indices)
    y, new = causal_conv1d_torch(x[:, None], weight, bias, conv_state=window, activation=activation)
    conv_state.index_copy_(0, state_indices, new.to(conv_state.dtype))
    return y[:, 0]
