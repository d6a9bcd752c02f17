"""Decoding state kept in a pool of slots: one row per sequence of a serving engine (docs/design.md §7).

A pool is an ordinary layer state (a dataclass of batch-first tensors) whose rows are slots. A decode step names
the slots it advances with a ``slots`` (batch,) int64 tensor; rows not named are never read or written, so a
paused or free slot keeps its state byte-identical. These helpers give any mixer that slot-indexed step from its
ordinary one (gather the named rows, step them, scatter them back); kernels that index the pool directly
(the Mamba-2 conv update and SSD step) skip the copies.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import torch
from torch import Tensor


Slots = Union[Tensor, slice]
"""Which pool rows a step advances: a (batch,) int64 tensor of distinct rows, or a ``slice`` of consecutive rows
(stepped in place through views: no copies, and no need to build an index tensor)."""


def as_index(slots: Slots, device: torch.device) -> Tensor:
    """The rows as a (batch,) int64 tensor on ``device``.

    Raises:
        ValueError: a slice that is not ``slice(start, stop)`` with integers 0 <= start <= stop (step 1).
    """
    if isinstance(slots, slice):
        start, stop, step = slots.start, slots.stop, slots.step
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop and step in (None, 1)):
            raise ValueError(f"slots as a slice must be slice(start, stop) of consecutive rows with integers "
                             f"0 <= start <= stop, got {slots!r}")
        return torch.arange(start, stop, device=device)
    return slots


def take(t: Tensor, slots: Slots) -> Tensor:
    """Rows ``slots`` of t: a view for a slice, a copy for an index tensor."""
    return t[slots] if isinstance(slots, slice) else t.index_select(0, slots)


def put(t: Tensor, slots: Slots, rows: Tensor) -> None:
    """Write ``rows`` into the rows ``slots`` of t in place."""
    if isinstance(slots, slice):
        t[slots] = rows
    else:
        t.index_copy_(0, slots, rows)


def gather_rows(pool: Any, slots: Slots) -> Any:
    """A state of the same type holding the rows ``slots`` of ``pool`` (views for a slice, else copies)."""
    return type(pool)(**{f.name: (take(v, slots) if isinstance(v := getattr(pool, f.name), Tensor) else v)
                         for f in dataclasses.fields(pool)})


def scatter_rows(pool: Any, slots: Slots, rows: Any) -> None:
    """Write the state ``rows`` (batch = number of slots) into the rows ``slots`` of ``pool``, in place."""
    for f in dataclasses.fields(pool):
        v = getattr(pool, f.name)
        if isinstance(v, Tensor):
            put(v, slots, getattr(rows, f.name))


def step_rows(step: Callable[[Tensor, Any], Tensor], u: Tensor, pool: Any, slots: Slots) -> Tensor:
    """Run ``step(u, state)`` (an ordinary in-place one-token step) on the pool rows ``slots``.

    u: (batch, d_model). Returns what ``step`` returns. A slice is stepped in place through views; index
    tensors are gathered, stepped and scattered back.
    """
    rows = gather_rows(pool, slots)
    y = step(u, rows)
    if not isinstance(slots, slice):
        scatter_rows(pool, slots, rows)
    return y


def write_slots(pool: Any, slots: list[int], state: Any) -> None:
    """Copy every row of an ordinary decoding state (after a prefill) into the pool: row i to slot ``slots[i]``.

    Fields a state class lists in its ``growing`` class attribute (a KV cache's keys, values and mask) hold
    positions ``0 … state.length - 1`` along dim 1: those go to the start of the slot's row and the rest of the row
    is zeroed. Every other tensor is copied whole, one copy per tensor for all rows.
    Raises:
        ValueError: a state of another type, a longer one than the pool holds, or tensors of other shapes.
    """
    if type(state) is not type(pool):
        raise ValueError(f"cannot write a {type(state).__name__} into a pool of {type(pool).__name__}")
    growing = getattr(type(state), "growing", ())
    index = None
    for f in dataclasses.fields(pool):
        dst, src = getattr(pool, f.name), getattr(state, f.name)
        if not isinstance(dst, Tensor):
            continue
        if f.name in growing:
            n = state.length
            if n > dst.shape[1] or src.shape[2:] != dst.shape[2:]:
                raise ValueError(f"{type(pool).__name__}.{f.name}: {n} positions of shape "
                                 f"{tuple(src.shape[2:])} do not fit a pool row of shape {tuple(dst.shape[1:])}")
            for i, slot in enumerate(slots):
                dst[slot].zero_()
                dst[slot, :n].copy_(src[i, :n])
            continue
        if src.shape[1:] != dst.shape[1:]:
            raise ValueError(f"{type(pool).__name__}.{f.name}: state rows of shape {tuple(src.shape[1:])} do "
                             f"not fit pool rows of shape {tuple(dst.shape[1:])}")
        if index is None:
            index = torch.tensor(slots, dtype=torch.int64).to(dst.device)
        dst.index_copy_(0, index, src.to(dst.dtype))
