"""The inference cache: per layer, the conv window and the SSM state (O(1) in sequence length)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mamba2.layers.mamba2 import Mamba2LayerState


@dataclass
class InferenceCache:
    """Decoding state of a whole LM: one :class:`Mamba2LayerState` per layer and the tokens seen so far.

    Built by :meth:`mamba2.models.Mamba2LM.empty_cache`; passed to the model's forward, which reads it as the
    state before the new tokens and updates it in place. SSM states are float32 unless asked otherwise.
    """

    layers: list[Mamba2LayerState]
    seqlen_offset: int = 0
    batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.batch_size = self.layers[0].ssm.shape[0] if self.layers else 0

    def select(self, rows: torch.Tensor) -> "InferenceCache":
        """A new cache holding only the given batch rows (e.g. to drop finished sequences)."""
        return InferenceCache([Mamba2LayerState(s.conv[rows].clone(), s.ssm[rows].clone()) for s in self.layers],
                              self.seqlen_offset)
