"""CUDA graphs of the decode step: one per batch-size bucket and sampling mode, captured on first use and
replayed after (docs/design.md §7.1). A replay costs the host a few microseconds whatever the number of kernels,
which is what makes small-batch decoding GPU-bound instead of launch-bound."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mamba2 import kernels


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below ``max_batch``, and ``max_batch`` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class DecodeGraphs:
    """Replays ``step(slots, greedy_only=…, penalty=…) -> tokens`` from CUDA graphs.

    ``step`` must have static shapes and issue no host sync (:meth:`mamba2.serving.engine.Engine._decode`). A batch
    of n slots runs in the smallest bucket >= n, its extra rows pointing at ``pad_slot`` (a scratch row of every
    state, whose contents do not matter). All graphs share one memory pool.
    """

    def __init__(self, step: Callable[..., Tensor], max_batch: int, pad_slot: int, device: torch.device):
        self.step, self.pad_slot, self.device = step, pad_slot, device
        self.buckets = buckets(max_batch)
        self.slots = torch.full((max_batch,), pad_slot, dtype=torch.int64, device=device)
        # pinned staging buffers in a ring: one is rewritten only after its last copy to the device has run
        self._host = [torch.empty(max_batch, dtype=torch.int64, pin_memory=True) for _ in range(4)]
        self._copied: list[torch.cuda.Event | None] = [None] * 4
        self._turn = 0
        self._graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._kernels = kernels.state()          # the kernel mode and tunings the graphs were captured under

    def run(self, slots: Tensor, *, greedy_only: bool, penalty: bool) -> Tensor:
        """slots: (n,) int64 on the host. Returns the n new tokens (a fresh device tensor). Graphs captured under
        another kernel mode or tuning (:func:`mamba2.kernels.state`) are dropped and captured again."""
        now = kernels.state()
        if now != self._kernels:
            self._graphs.clear()
            self._pool = torch.cuda.graph_pool_handle()     # the old pool went with its last graph
            self._kernels = now
        n = slots.shape[0]
        size = next(b for b in self.buckets if b >= n)
        graph, out = self.prepare(size, greedy_only=greedy_only, penalty=penalty)
        i = self._turn = (self._turn + 1) % len(self._host)
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        host = self._host[i]
        host[:n] = slots
        host[n:size] = self.pad_slot
        self.slots[:size].copy_(host[:size], non_blocking=True)
        self._copied[i] = torch.cuda.Event()
        self._copied[i].record()
        graph.replay()
        return out[:n].clone()

    def prepare(self, size: int, *, greedy_only: bool, penalty: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """The graph of bucket ``size`` and that sampling mode, captured now if it is not yet."""
        key = (size, greedy_only, penalty)
        if key not in self._graphs:
            self._graphs[key] = self._capture(size, greedy_only, penalty)
        return self._graphs[key]

    def _capture(self, size: int, greedy_only: bool, penalty: bool) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        # Warm-up on a side stream compiles every kernel and settles the allocator; it and the capture step
        # only the scratch row.
        self.slots[:size].fill_(self.pad_slot)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(self.slots[:size], greedy_only=greedy_only, penalty=penalty)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.step(self.slots[:size], greedy_only=greedy_only, penalty=penalty)
        return graph, out
