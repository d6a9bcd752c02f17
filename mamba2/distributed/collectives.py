"""The collectives of sharded layers, as autograd functions (docs/distributed.md).

Each forward/backward pair is what the chain rule asks of a collective whose inputs live on different ranks:

- :func:`enter`: identity forward, all-reduce of the gradient backward (a replicated input consumed by
  rank-local shards; Megatron's ``f``).
- :func:`reduce_out`: all-reduce forward, identity backward (partial sums turned into a replicated output that
  every rank then uses identically; Megatron's ``g``).
- :func:`all_reduce`: all-reduce both ways (a sum whose result each rank uses differently).
- :func:`all_gather`: stack of every rank's tensor forward; backward sums the stack's gradient over ranks and
  keeps this rank's slice.

Every function works with gloo (CPU) and NCCL; with ``group`` None they use the default group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _summed(t: Tensor, group) -> Tensor:
    t = t.contiguous().clone()
    dist.all_reduce(t, group=group)
    return t


class _Sum(torch.autograd.Function):
    """Identity or sum over ``group`` forward (``fwd``), identity or sum of the gradient backward (``bwd``)."""

    @staticmethod
    def forward(ctx, x: Tensor, group, fwd: bool, bwd: bool) -> Tensor:
        ctx.group, ctx.bwd = group, bwd
        return _summed(x, group) if fwd else x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (_summed(grad, ctx.group) if ctx.bwd else grad), None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group, ctx.rank = group, dist.get_rank(group)
        return gather_ints(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _summed(grad, ctx.group)[ctx.rank], None


def enter(x: Tensor, group=None) -> Tensor:
    """Identity; the gradient is summed over ``group``."""
    return _Sum.apply(x, group, False, True)


def reduce_out(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ``group``; the gradient passes through unchanged."""
    return _Sum.apply(x, group, True, False)


def all_reduce(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ``group``; the gradient is summed over ``group`` too."""
    return _Sum.apply(x, group, True, True)


def all_gather(x: Tensor, group=None) -> Tensor:
    """(world, *x.shape): every rank's ``x`` (equal shapes), differentiable."""
    return _AllGather.apply(x, group)


def gather_ints(x: Tensor, group=None) -> Tensor:
    """(world, *x.shape): every rank's ``x``, not differentiable (ids, masks; :func:`all_gather`'s forward)."""
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out
