"""The inference cache: one decoding state per layer — conv window and SSM state for Mamba-2 and Mamba-1 layers
(O(1) in sequence length), keys and values for attention layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _batch_size(state: Any) -> int:
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        if isinstance(v, Tensor):
            return v.shape[0]
    raise ValueError(f"{type(state).__name__} holds no tensor to read a batch size from")


def _select(state: Any, rows: Tensor) -> Any:
    """A copy of a layer state (a dataclass whose tensors are batch-first) holding only ``rows``."""
    return type(state)(**{f.name: (v[rows].clone() if isinstance(v := getattr(state, f.name), Tensor) else v)
                          for f in dataclasses.fields(state)})


@dataclass
class InferenceCache:
    """Decoding state of a whole LM: one layer state per layer (:class:`~mamba2.layers.mamba2.Mamba2LayerState`,
    :class:`~mamba2.layers.mamba1.Mamba1LayerState` or :class:`~mamba2.layers.attention.AttentionLayerState`)
    and the number of tokens seen so far.

    Built by :meth:`mamba2.models.Mamba2LM.empty_cache`; passed to the model's forward, which reads it as the
    state before the new tokens and updates it in place. SSM states are float32 unless asked otherwise; keys and
    values are kept in the model dtype.
    """

    layers: list[Any]
    seqlen_offset: int = 0
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = _batch_size(self.layers[0]) if self.layers else 0

    def select(self, rows: torch.Tensor) -> "InferenceCache":
        """A new cache holding only the given batch rows (e.g. to drop finished sequences)."""
        return InferenceCache([_select(s, rows) for s in self.layers], self.seqlen_offset)
