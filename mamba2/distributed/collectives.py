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


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceOut(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group), *x.shape))
        dist.all_gather(list(out.unbind(0)), x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def enter(x: Tensor, group=None) -> Tensor:
    """Identity; the gradient is summed over ``group``."""
    return _Enter.apply(x, group)


def reduce_out(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ``group``; the gradient passes through unchanged."""
    return _ReduceOut.apply(x, group)


def all_reduce(x: Tensor, group=None) -> Tensor:
    """Sum of ``x`` over ``group``; the gradient is summed over ``group`` too."""
    return _AllReduce.apply(x, group)


def all_gather(x: Tensor, group=None) -> Tensor:
    """(world, *x.shape): every rank's ``x`` (equal shapes), differentiable."""
    return _AllGather.apply(x, group)


def gather_ints(x: Tensor, group=None) -> Tensor:
    """(world, *x.shape): every rank's ``x`` for tensors without gradients (ids, masks)."""
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    dist.all_gather(list(out.unbind(0)), x.contiguous(), group=group)
    return out
