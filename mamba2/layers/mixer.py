"""What every sequence mixer of the LM provides (:class:`Mixer`), and the table of mixer kinds.

A layer layout (:mod:`mamba2.layout`) names one kind per layer; :data:`MIXERS` maps each kind to its class.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from mamba2.layers.attention import Attention
from mamba2.layers.mamba1 import Mamba1Mixer
from mamba2.layers.mamba2 import Mamba2Mixer
from mamba2.layers.slots import Slots


@runtime_checkable
class Mixer(Protocol):
    """A sequence mixer: built as ``cls(config, layer_idx)``; ``kind`` is its name in layer layouts.

    ``empty_state(batch, device, dtype, ssm_dtype, max_len)`` returns its zero decoding state (a dataclass of
    batch-first tensors: conv window and SSM state, or a KV cache with ``max_len`` preallocated positions).
    ``forward(u, *, seq_idx, cu_seqlens, attention_mask, state)`` maps u (batch, L, d_model) to (batch, L, d_model)
    in u's dtype; with a ``state`` it continues from it and updates it in place (``seq_idx`` is not taken together
    with a state; ``cu_seqlens`` with a fresh state of one row per document fills each row with its document's
    state: a packed prefill). ``decode(u, pool, slots)`` advances by one token (u (batch, d_model)) the rows ``slots`` of a slot
    pool made by ``empty_state(max_slots, …, max_len)``, touching no other row (:mod:`mamba2.layers.slots`).
    """

    kind: ClassVar[str]

    def empty_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    ssm_dtype: torch.dtype = torch.float32, max_len: int = 0) -> Any: ...

    def decode(self, u: Tensor, pool: Any, slots: Slots) -> Tensor: ...

    def forward(self, u: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Any = None,
                attention_mask: Tensor | None = None, state: Any = None) -> Tensor: ...


MIXERS: dict[str, type] = {cls.kind: cls for cls in (Mamba2Mixer, Mamba1Mixer, Attention)}
"""Mixer class of each layout kind (the keys are :data:`mamba2.layout.MIXER_KINDS`)."""
