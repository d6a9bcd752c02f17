"""One process's place in a distributed training run: the process group, the mesh, its share of each batch, and
the reductions the trainer needs (docs/distributed.md §4). Launch with ``torchrun``; every rank runs the same
program."""

from __future__ import annotations

import math
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from mamba2.data import IGNORE_INDEX, Batch, TokenStream, eval_batches
from mamba2.distributed.parallelize import (ParallelDims, build_mesh, fsdp_mesh, parallelize, split_rows,
                                            split_tokens)
from mamba2.evaluation import EvalResult, autocast_to


def _exit_with_launcher(poll_s: float = 1.0) -> None:
    """End this process when the launcher that started it dies (torchrun SIGKILLed: its workers live in sessions
    of their own and would otherwise go on training and writing the checkpoint that a resumed run then uses)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="mamba2-launcher-watch", daemon=True).start()


_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone (killed, crashed, stopped), as gloo and
    NCCL word it; not this rank's own failure (out of memory, invalid usage, a DataLoader worker's socket)."""
    text = str(e)
    return (isinstance(e, RuntimeError) and any(words in text for words in _PEER_GONE)
            and "DataLoader worker" not in text)


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


class Parallel:
    """The distributed side of a run on ``dims`` (made by :meth:`start`).

    ``main`` is True on the rank that logs and writes files (global rank 0).
    """

    def __init__(self, dims: ParallelDims, mesh, device: torch.device):
        self.dims, self.mesh, self.device = dims, mesh, device
        self.rank = dist.get_rank()
        self.main = self.rank == 0
        self.data_group = fsdp_mesh(mesh).get_group()       # dp × cp: ranks that see different tokens
        self.tp_group = mesh["tp"].get_group()

    @classmethod
    def start(cls, device: torch.device, *, tp: int = 1, cp: int = 1, timeout_s: float = 600.0) -> "Parallel":
        """Join the process group of a ``torchrun`` launch (gloo on CPU, NCCL on CUDA; ``device`` "cuda" becomes
        ``cuda:LOCAL_RANK``) and build the mesh.

        Raises:
            ValueError: a world size that ``tp * cp`` does not divide (on every rank, before any compute).
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        dims = ParallelDims.for_world(world, tp=tp, cp=cp)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=timeout_s))
        _exit_with_launcher()
        return cls(dims, build_mesh(dims, device.type), device)

    def close(self, together: bool) -> None:
        """Leave the process group. ``together``: every rank reached this point (the run ended, or stopped where
        they agreed), so they first wait for each other — a rank that tore its group down while another was still
        in its last collective, or the store's host (rank 0) exiting first, aborted the other with gloo
        ("terminate called without an active exception"). After an error on some ranks only, no waiting (it
        could hang)."""
        if dist.is_initialized():
            if together:
                dist.barrier()
            dist.destroy_process_group()

    def parallelize(self, model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
        """TP, CP and FSDP2 (parameters gathered in ``param_dtype``, None: their own; fp32 reductions) applied to
        ``model`` (on ``device``)."""
        return parallelize(model, self.dims, self.mesh, param_dtype=param_dtype)

    # ------------------------------------------------------------------ data
    def local_batch(self, batch: Batch) -> Batch:
        """This rank's rows (dp) and tokens (cp) of a global batch."""
        rows = split_rows(self.dims, self.mesh, batch.input_ids.shape[0])
        cols = split_tokens(self.dims, self.mesh, batch.input_ids.shape[1])
        return Batch(*(t[rows, cols] for t in batch))

    def loss(self, model: nn.Module, batch: Batch, global_targets: int) -> Tensor:
        """This rank's share of the global batch's mean loss, scaled so that FSDP2's average of the gradients over
        the ``dp × cp`` ranks is the gradient of that mean."""
        total = model.loss(batch.input_ids, batch.targets, seq_idx=batch.seq_idx, check_ids=False, reduction="sum")
        return total * (self.dims.dp * self.dims.cp / max(global_targets, 1))

    def sum(self, value: float, group=None) -> float:
        """``value`` summed over the ``dp × cp`` ranks (or ``group``)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.data_group if group is None else group)
        return float(t)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any rank (every rank gets the same answer)."""
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def broadcast(self, obj=None):
        """Rank 0's ``obj`` on every rank (a picklable value)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    # ------------------------------------------------------------------ gradients
    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the gradients of the whole (sharded) model to ``max_norm`` (0 or inf: only measure); returns the
        norm before clipping, the same on every rank. TP shards count once, replicated tensors once."""
        cut = {id(p) for m in model.modules() if getattr(m, "tp", None) is not None
               for name, p in m.named_parameters() if name in m.tp.segments}
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        params = [p for p in model.parameters() if p.grad is not None]
        for p in params:
            n = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            if isinstance(n, DTensor):
                n = n.full_tensor()
            sums[int(id(p) in cut)] += n.double() ** 2
        if self.dims.tp > 1:
            part = sums[1:].clone()
            dist.all_reduce(part, group=self.tp_group)
            sums[1:] = part
        norm = float(sums.sum().sqrt())
        if max_norm and math.isfinite(max_norm) and math.isfinite(norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm))
        return norm

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, stream: TokenStream, *, batch_size: int, seq_len: int,
                 max_tokens: int | None, autocast: torch.dtype | None = None) -> EvalResult:
        """:func:`mamba2.evaluation.evaluate` on the mesh: every rank reads the same rows, CP ranks split their
        tokens (a row too short to split is padded at its end with ignored targets)."""
        was_training = model.training
        model.eval()
        total = count = 0.0
        cp = self.dims.cp
        need = cp * max(model.config.d_conv - 1, 1)
        try:
            for batch in eval_batches(stream, batch_size, seq_len, max_tokens):
                L = batch.input_ids.shape[1]
                if cp > 1 and L < need:
                    pad = need - L
                    batch = Batch(F.pad(batch.input_ids, (0, pad)), F.pad(batch.targets, (0, pad), value=IGNORE_INDEX),
                                  F.pad(batch.seq_idx, (0, pad), value=int(batch.seq_idx.max()) + 1))
                n = int((batch.targets != IGNORE_INDEX).sum())
                cols = split_tokens(self.dims, self.mesh, batch.input_ids.shape[1])
                local = Batch(*(t[:, cols].to(self.device) for t in batch))
                with autocast_to(self.device, autocast):
                    part = model.loss(local.input_ids, local.targets, seq_idx=local.seq_idx, check_ids=False,
                                      reduction="sum")
                total += self.sum(float(part), group=self.mesh["cp"].get_group()) if cp > 1 else float(part)
                count += n
        finally:
            model.train(was_training)
        loss = total / count if count else float("nan")
        return EvalResult(loss, math.exp(min(loss, 700.0)), loss / math.log(2) * stream.tokens_per_byte, int(count))
