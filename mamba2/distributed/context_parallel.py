"""Context parallelism by state passing (docs/distributed.md §3): one long sequence split over ranks.

Rank r holds tokens ``[start_r, start_r + L_r)`` of every row. A Mamba-2 mixer with ``mixer.cp`` set to a
:class:`ContextParallel` then

1. prepends to its conv input the last ``d_conv - 1`` inputs of rank r-1 (a halo, all-gathered), so the short
   conv sees exactly what it sees on one device (a document boundary inside the halo is honoured through
   ``seq_idx``);
2. runs SSD on its tokens from a zero state, all-gathers the fp32 pair (final state, total decay) of every rank
   in one collective, scans them to its true entering state and adds that state's contribution to its outputs
   (:mod:`mamba2.ssd.state_passing`).

Forward cost per layer: two all-gathers, of ``b·(d_conv-1)·conv_dim`` activations and ``b·H·(P·N + 1)`` fp32
values; the backward sends the same back. Gradients equal one device's (tests/test_distributed.py).

Attention layers of hybrids use :meth:`lengths` and :meth:`gather_tokens`: each rank's queries attend over the
keys and values of the whole row, all-gathered (``2·b·T·Hkv·head_dim`` values per layer on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mamba2.distributed import collectives
from mamba2.ssd import process_dt, ssd
from mamba2.ssd import state_passing as sp


def _attached_zeros(t: Tensor) -> Tensor:
    """Zeros of t's shape that stay in t's autograd graph (without NaN from inf·0): rank 0 does not use what it
    gathered, but its backward must run the same collectives as the other ranks'."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=t.device), t, 0)


class ContextParallel:
    """The state-passing hooks of one process group (the mesh's ``cp`` dimension)."""

    def __init__(self, group=None):
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def halo(self, xBC: Tensor, seq_idx: Tensor | None, width: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Prepend rank r-1's last ``width`` conv inputs (zeros on rank 0).

        xBC: (b, L, channels), L >= width. seq_idx: (b, L) or None. Returns (b, width + L, channels), the matching
        (b, width + L) seq_idx (or None), and ``entering`` (b,): the document of rank r-1's last token (None on
        rank 0 or without seq_idx).

        Raises:
            ValueError: fewer than ``width`` tokens on this rank.
        """
        b, L, _ = xBC.shape
        if L < width:
            raise ValueError(f"context parallelism needs at least d_conv - 1 = {width} tokens per rank, this rank "
                             f"holds {L}")
        tails = collectives.all_gather(xBC[:, L - width:], self.group)
        halo = tails[self.rank - 1] if self.rank > 0 else _attached_zeros(tails[0])
        if seq_idx is None:
            return torch.cat([halo, xBC], dim=1), None, None
        seq_tails = collectives.gather_ints(seq_idx[:, L - width:], self.group)
        seq_halo = seq_tails[self.rank - 1] if self.rank > 0 else seq_idx[:, :1].expand(b, width)
        entering = seq_tails[self.rank - 1][:, -1] if self.rank > 0 else None
        return torch.cat([halo, xBC], dim=1), torch.cat([seq_halo, seq_idx], dim=1), entering

    def lengths(self, L: int, device) -> list[int]:
        """Every rank's piece length, from this rank's ``L`` (one small all-gather and a host read)."""
        return collectives.gather_ints(torch.tensor([L], device=device), self.group).flatten().tolist()

    def gather_tokens(self, t: Tensor, lengths: list[int]) -> Tensor:
        """(b, T, …): the whole row's ``t`` from every rank's piece (b, lengths[r], …), differentiable for float
        tensors."""
        L = t.shape[1]
        width = max(lengths)
        padded = torch.cat([t, t.new_zeros(t.shape[0], width - L, *t.shape[2:])], dim=1) if L < width else t
        gather = collectives.all_gather if t.is_floating_point() else collectives.gather_ints
        pieces = gather(padded, self.group)
        return torch.cat([pieces[r][:, :n] for r, n in enumerate(lengths)], dim=1)

    def ssd(self, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None,
            seq_idx: Tensor | None, entering: Tensor | None, chunk_size: int, dt_bias: Tensor | None,
            dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
        """:func:`mamba2.ssd.ssd` of this rank's segment as part of the whole sequence (shapes as there; no z,
        no initial or final states). ``entering`` comes from :meth:`halo`."""
        dt_kw = dict(dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
        y, s_local = ssd(x, dt, A, B, C, D=D, seq_idx=seq_idx, chunk_size=chunk_size, return_final_states=True,
                         **dt_kw)
        b, L, H, _ = x.shape
        f = s_local.dtype
        cum = sp.log_decay(process_dt(dt, **dt_kw).to(f), A.to(f))
        carry = sp.carry_mask(seq_idx, entering, b, L, x.device, f)
        a = sp.segment_decay(cum, carry)
        pairs = collectives.all_gather(torch.cat([s_local.flatten(1), a], dim=1), self.group)   # one collective
        s_all, a_all = pairs[..., :-H].view(self.size, *s_local.shape), pairs[..., -H:]
        if self.rank == 0:
            return y + _attached_zeros(pairs).sum()
        s_in = sp.entering_states(a_all[:self.rank + 1], s_all[:self.rank + 1])[self.rank]
        return y + sp.correction(C, s_in, cum, carry).to(y.dtype)
