"""Distributed training on several GPUs (issue 13; docs/distributed.md): correctness on NCCL, FSDP2 throughput, the
tensor-parallel block and context-parallel long sequences. Every rank runs this under torchrun::

    torchrun --nproc_per_node 4 benchmarks/distributed_gpu.py --out benchmarks/results/distributed_4xh200.json
    torchrun --nproc_per_node 2 benchmarks/distributed_gpu.py --device cpu --small     # dry run on gloo

Parts (``--parts``, default all):

- ``correct``: TP = world, CP = world and FSDP2 over the world against the same model on one device (every rank
  computes the reference itself): loss, logits and every gradient, fp32 with TF32 off (budget 1e-3 rel) and bf16
  autocast (2e-2 rel).
- ``fsdp``: training tokens/s per GPU of the 370m and 1.3b shapes, bf16, 4 × 2048 tokens per GPU, AdamW; run with
  1, 2 and 4 processes and divide to get the scaling efficiency.
- ``tp``: forward + backward of one 2.7b-shape Mamba-2 block (8 × 2048 tokens) at TP = world, with the
  collectives of its forward and of its backward from the profiler (count per kind, payload bytes: the tensors
  handed to them) beside docs/distributed.md §5's model of the forward payload, and their share of the time.
- ``cp``: one sequence of 128K / 512K / 1M tokens through a 2-layer 2.7b-shape stack at CP = world: time, peak
  memory per GPU and the collectives' share of the time, or the OOM.

``benchmarks/distributed_report.py`` merges the JSON of runs at several world sizes into tables and a plot.

Timing: medians over ``--reps`` steps after warm-up, CUDA events (``torch.cuda.synchronize`` on CPU dry runs: wall
clock). Rank 0 prints a table and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mamba2.config import Mamba2Config  # noqa: E402
from mamba2.distributed.checkpoint import one_device  # noqa: E402
from mamba2.distributed.parallelize import ParallelDims, build_mesh, parallelize, split_tokens  # noqa: E402
from mamba2.models.lm import Mamba2LM  # noqa: E402

SHAPES = {  # released-model shapes (docs/design.md), byte-free GPT-NeoX vocabulary
    "370m": dict(d_model=1024, n_layer=48), "1.3b": dict(d_model=2048, n_layer=48),
    "2.7b": dict(d_model=2560, n_layer=64), "tiny": dict(d_model=64, n_layer=2),
}


def config(shape: str, small: bool, **over) -> Mamba2Config:
    base = dict(vocab_size=256 if small else 50277, d_state=16 if small else 128, headdim=16 if small else 64,
                chunk_size=32 if small else 256)
    return Mamba2Config(**{**base, **SHAPES["tiny" if small else shape], **over})


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return math.inf if not torch.isfinite(a).all() else ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def timed(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``reps`` calls (all ranks call it together)."""
    from mamba2.experiments.speed import median_ms
    return median_ms(fn, device, warmup, reps) / 1e3


_DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4}


def comm_profile(fn, device: torch.device) -> dict:
    """One call of ``fn`` under the profiler: the collectives it ran (count per kind), their payload bytes (the
    tensors handed to each), the seconds spent in them (gloo: the calls' wall time; NCCL: its kernels' device
    time, which may overlap compute) and their share of that call's wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    counts, payload, comm_us, estimated = {}, 0, 0.0, False
    # where torch (2.11) records no dtypes, or one this table lacks: the runs' activation element size, and the
    # payload is marked as an estimate (fp32 collectives, e.g. the norm's sums of squares, count at half)
    unknown = 2 if device.type == "cuda" else 4
    for e in prof.events():
        backend, _, op = e.name.partition(":")
        if backend in ("gloo", "nccl") and op and e.input_shapes:
            counts[op] = counts.get(op, 0) + 1
            dtypes = getattr(e, "input_dtypes", None) or [None] * len(e.input_shapes)
            for shape, t in zip(e.input_shapes, dtypes):
                if shape:
                    estimated |= t not in _DTYPE_BYTES
                    payload += math.prod(shape) * _DTYPE_BYTES.get(t, unknown)
            if device.type != "cuda":
                comm_us += e.cpu_time_total
        elif e.device_type == DeviceType.CUDA and "nccl" in e.name.lower():
            comm_us += getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
    return dict(collectives=counts, payload_bytes=payload, payload_estimated=estimated, comm_s=comm_us / 1e6,
                share=comm_us / 1e6 / wall)


def mesh_for(tp: int = 1, cp: int = 1, device: torch.device = torch.device("cpu")):
    dims = ParallelDims.for_world(dist.get_world_size(), tp=tp, cp=cp)
    return dims, build_mesh(dims, device.type)


def part_correct(args, device) -> list[dict]:
    world, out = dist.get_world_size(), []
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    cfg = config("370m", args.small, n_layer=2, ngroups=1 if args.small else 8)
    for name, tp, cp in (("tp", world, 1), ("cp", 1, world), ("fsdp", 1, 1)):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            ref = Mamba2LM(cfg).to(device)
            model = copy.deepcopy(ref)
            dims, mesh = mesh_for(tp, cp, device)
            parallelize(model, dims, mesh)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, cfg.vocab_size, (world, 2 * 1024 + 1 if not args.small else 65), generator=g)
            ids = ids.to(device)
            x, y = ids[:, :-1], ids[:, 1:]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                ref_logits = ref(x, check_ids=False)
                F.cross_entropy(ref_logits.float().flatten(0, 1), y.flatten()).backward()
                rows = slice(None) if dims.dp == 1 else slice(dist.get_rank(), dist.get_rank() + 1)
                cols = split_tokens(dims, mesh, x.shape[1])
                logits = model(x[rows, cols], check_ids=False)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y[rows, cols].flatten(), reduction="sum")
                (loss * dims.dp * dims.cp / y.numel()).backward()
            grads = one_device(model, {k: p.grad for k, p in model.named_parameters()})
            ref_grads = dict(ref.named_parameters())
            out.append(dict(part="correct", mode=name, dtype=str(dtype).split(".")[-1],
                            logits=rel(logits.detach(), ref_logits[rows, cols].detach()),
                            grads=max(rel(grads[k], ref_grads[k].grad) for k in grads),
                            budget=1e-3 if dtype == torch.float32 else 2e-2))
    return out


def part_fsdp(args, device) -> list[dict]:
    out = []
    for shape in ("370m", "1.3b"):
        torch.manual_seed(0)
        cfg = config(shape, args.small)
        model = Mamba2LM(cfg).to(device)
        dims, mesh = mesh_for(1, 1, device)
        parallelize(model, dims, mesh, param_dtype=torch.bfloat16 if device.type == "cuda" else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rows, L = (4, 2048) if not args.small else (2, 64)
        ids = torch.randint(0, cfg.vocab_size, (rows, L + 1), device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(ids[:, :-1], check_ids=False)
            F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()

        s = timed(step, device, args.reps)
        out.append(dict(part="fsdp", shape=shape, world=dist.get_world_size(), step_s=s,
                        tokens_per_s_per_gpu=rows * L / s, peak_gib=_peak(device)))
        del model, opt
    return out


def part_tp(args, device) -> list[dict]:
    world = dist.get_world_size()
    cfg = config("2.7b", args.small, n_layer=1)
    torch.manual_seed(0)
    model = Mamba2LM(cfg).to(device)
    dims, mesh = mesh_for(world, 1, device)
    parallelize(model, dims, mesh)
    block = model.backbone.layers[0]
    rows, L = (8, 2048) if not args.small else (2, 64)
    u = torch.randn(rows, L, cfg.d_model, device=device, requires_grad=True)

    bf16 = device.type == "cuda"

    def fwd(grad: bool = False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(grad):
            return block(u)

    def fwd_bwd():
        fwd(True).float().square().mean().backward()

    step_s = timed(fwd_bwd, device, args.reps)
    forward, both = comm_profile(fwd, device), comm_profile(fwd_bwd, device)
    backward = dict(collectives={k: v - forward["collectives"].get(k, 0) for k, v in both["collectives"].items()},
                    payload_bytes=both["payload_bytes"] - forward["payload_bytes"])
    # docs/distributed.md §5 (ngroups 1): the forward all-reduces out_proj's output and the gated norm's sum of
    # squares, (rows·L, d_model) in the activation dtype and (rows·L, 1) fp32
    model_bytes = rows * L * (cfg.d_model * (2 if bf16 else 4) + 4) if world > 1 else 0
    return [dict(part="tp", tp=world, fwd_bwd_s=step_s, forward=forward, backward=backward,
                 forward_payload_model=model_bytes, comm_share=both["share"], peak_gib=_peak(device))]


def part_cp(args, device) -> list[dict]:
    world, out = dist.get_world_size(), []
    cfg = config("2.7b", args.small, n_layer=2)
    torch.manual_seed(0)
    model = Mamba2LM(cfg).to(device)
    dims, mesh = mesh_for(1, world, device)
    parallelize(model, dims, mesh, fsdp=False)
    for total in ((128 << 10, 512 << 10, 1 << 20) if not args.small else (256, 1024)):
        L = split_tokens(dims, mesh, total)
        ids = torch.randint(0, cfg.vocab_size, (1, L.stop - L.start), device=device)
        row = dict(part="cp", cp=world, tokens=total)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)

            def fwd_bwd():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    model(ids, check_ids=False, logits_to_keep=1).float().sum().backward()

            row.update(fwd_bwd_s=timed(fwd_bwd, device, max(1, args.reps // 2), warmup=1), peak_gib=_peak(device))
            comm = comm_profile(fwd_bwd, device)
            row.update(comm_share=comm["share"], payload_bytes=comm["payload_bytes"])
        except torch.OutOfMemoryError:
            row.update(oom=True)
        ok = torch.tensor([0.0 if row.get("oom") else 1.0], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)       # every rank stops at the first length one cannot hold
        out.append(row)
        if not ok.item():
            break
    return out


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


PARTS = {"correct": part_correct, "fsdp": part_fsdp, "tp": part_tp, "cp": part_cp}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--small", action="store_true", help="tiny shapes (a dry run of the script)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, help="JSON file rank 0 writes")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rows = []
    try:
        for name in args.parts.split(","):
            rows += PARTS[name](args, device)
            dist.barrier()
    finally:
        if dist.get_rank() == 0:
            meta = dict(world=dist.get_world_size(), device=torch.cuda.get_device_name(device)
                        if device.type == "cuda" else "cpu", torch=torch.__version__,
                        date=time.strftime("%Y-%m-%d"), small=args.small)
            for r in rows:
                print(json.dumps(r))
            if args.out:
                args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
