"""Checkpoints of a distributed run through ``torch.distributed.checkpoint`` (DCP), readable at another world size
(docs/distributed.md §4).

The state handed to DCP is *portable*: keyed by the one-device parameter names (``torch.distributed.checkpoint.
state_dict.get_state_dict``), every FSDP2-sharded tensor a DTensor (saved in shards, resharded by DCP on load),
and every tensor that tensor parallelism cut per segment gathered to its one-device shape first (DCP cannot
express a per-segment cut). So a run saved on 2 ranks resumes on 4, on 1, or with another ``tp``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor, distribute_tensor

from mamba2.distributed.tensor_parallel import _local, _whole


def _cuts(model: nn.Module) -> dict[str, tuple[Any, int, list, int]]:
    """fqn → (tp group, dim, segments, tp) of every parameter that tensor parallelism cut."""
    out = {}
    for prefix, module in model.named_modules():
        tp = getattr(module, "tp", None)
        if tp is not None:
            for name, (dim, segments) in tp.segments.items():
                out[f"{prefix}.{name}" if prefix else name] = (tp.group, dim, segments, tp.size)
    return out


def _whole_of(t: Tensor, cut) -> Tensor:
    if isinstance(t, DTensor):
        t = t.full_tensor()
    if cut is None or t.dim() == 0:
        return t
    group, dim, segments, tp = cut
    pieces = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(pieces, t.contiguous(), group=group)
    return _whole(pieces, dim, segments, tp)


def _like(whole: Tensor, template: Tensor, cut) -> Tensor:
    if cut is not None and whole.dim() > 0:
        group, dim, segments, tp = cut
        whole = _local(whole, dim, segments, dist.get_rank(group), tp)
    if isinstance(template, DTensor):
        return distribute_tensor(whole.to(template.device, template.dtype), template.device_mesh,
                                 template.placements)
    return whole.to(template.device, template.dtype)


def _map(state: dict, cuts: dict, fn) -> dict:
    """Apply ``fn(tensor, cut_or_None, fqn, key)`` to the model tensors and the per-parameter optimizer tensors."""
    out = {"model": {k: fn(v, cuts.get(k), k, None) for k, v in state["model"].items()}}
    if "optimizer" in state:
        optim = dict(state["optimizer"])
        optim["state"] = {fqn: {k: fn(v, cuts.get(fqn), fqn, k) if isinstance(v, Tensor) else v
                                for k, v in entry.items()} for fqn, entry in state["optimizer"]["state"].items()}
        out["optimizer"] = optim
    return out


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optimizer": osd}


def portable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """{"model": …, "optimizer": …} as described in the module docstring (collective on a distributed model).

    An optimizer that has not stepped yet is given zero moments at step 1 (what DCP needs to describe it): pass
    None for such an optimizer unless that is intended.
    """
    return _map(_state(model, optimizer), _cuts(model), lambda t, cut, *_: _whole_of(t, cut))


def load_portable(model: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Put a portable state (from :func:`portable_state` of any mesh, or a one-device run) into ``model`` and
    ``optimizer`` as this rank's shards; without ``"optimizer"`` in it the optimizer is left fresh."""
    optimizer = optimizer if "optimizer" in state else None
    templates = _state(model, optimizer)

    def shard(t, cut, fqn, key):
        template = templates["model"][fqn] if key is None else templates["optimizer"]["state"][fqn][key]
        return _like(t, template, cut)

    state = _map(state, _cuts(model), shard)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write model and optimizer with DCP to the directory ``path`` (every rank calls this with the same path);
    an optimizer that has not stepped yet is not written."""
    dcp.save(portable_state(model, optimizer if optimizer.state else None), checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read what :func:`save_sharded` wrote, on any mesh (or in one process without a process group)."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    with_optimizer = any(k.startswith("optimizer.") for k in saved)
    state = portable_state(model, optimizer if with_optimizer else None)
    with warnings.catch_warnings():       # one process reading shards is intended, not a fallback to warn about
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(path))
    load_portable(model, optimizer, state)


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The one-device state dict of ``model`` (every tensor whole, on the CPU), on every rank (collective)."""
    return {k: v.detach().cpu() for k, v in portable_state(model)["model"].items()}


def one_device(model: nn.Module, named: dict[str, Tensor]) -> dict[str, Tensor]:
    """The one-device form of per-parameter tensors of a parallelized ``model`` keyed by parameter name (its
    gradients, say): FSDP2 shards gathered, TP cuts reassembled (collective: every rank passes the same names)."""
    cuts = _cuts(model)
    return {k: _whole_of(v, cuts.get(k)) for k, v in named.items()}
