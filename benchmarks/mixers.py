"""One layer of each mixer — Mamba-2, attention, Mamba-1 — at equal d_model: forward and forward+backward time
and peak memory over sequence length (issue 5; Dao & Gu 2024, §9.3 compares the same three).

Shapes: d_model 512 (``--d-model``), batch 1. Mamba-2: expand 2, headdim 64, d_state 128, chunk 256 (the
paper's). Attention: d_model/64 heads of 64, full rotary, no biases, SDPA. Mamba-1: expand 2, d_state 16,
dt_rank d_model/16, pure-torch chunked selective scan. "fwd" is a forward under ``torch.no_grad`` (prefill);
"fwd+bwd" is a training step's forward and backward (gradients for the input and every parameter).

Each (mixer, L, mode) is timed in a fresh subprocess (median of up to ``--repeats`` calls after a warm-up) and,
on CPU, measured for memory in another: there the peak is the resident-set high-water mark (VmHWM, reset just
before the measured call) above what the process held then — parameters, inputs and the warm-up's leftovers
excluded — with large allocations mmap'ed (MALLOC_MMAP_THRESHOLD_) so that freed buffers leave the RSS (that
slows allocation, hence the separate timing process). On CUDA the peak is ``torch.cuda.max_memory_allocated``
above the allocation before the call. On a shared CPU, ``--threads 1`` avoids OpenMP threads spinning against
other processes (which slows small ops many-fold).

    python benchmarks/mixers.py [--lengths 512 2048 8192] [--device cpu|cuda] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MIXERS = ("mamba2", "attention", "mamba1")
MODES = ("fwd", "fwd+bwd")


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def layer_config(mixer: str, d_model: int):
    from mamba2.config import Mamba2Config

    common = dict(d_model=d_model, n_layer=1, vocab_size=256, layout=[mixer])
    if mixer == "mamba2":
        return Mamba2Config(**common, d_state=128, headdim=64, expand=2, chunk_size=256)
    if mixer == "mamba1":
        return Mamba2Config(**common, d_state=16, expand=2)
    return Mamba2Config(**common, attn_num_heads=d_model // 64, attn_head_dim=64)


def child(what: str, mixer: str, L: int, mode: str, d_model: int, batch: int, device: str, dtype: str,
          repeats: int, budget_s: float) -> dict:
    """``what``: "time" (median ms of the timed calls) or "mem" (peak MB of one call); both after a warm-up."""
    import torch

    from mamba2.layers.mixer import MIXERS as CLASSES

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    torch.manual_seed(0)
    layer = CLASSES[mixer](layer_config(mixer, d_model)).to(device=device, dtype=dt)
    u = torch.randn(batch, L, d_model, device=device, dtype=dt, requires_grad=mode == "fwd+bwd")
    grad = torch.randn(batch, L, d_model, device=device, dtype=dt)
    cuda = device.startswith("cuda")

    def call() -> None:
        if mode == "fwd":
            with torch.no_grad():
                layer(u)
        else:
            layer(u).backward(grad)
            layer.zero_grad(set_to_none=True)
            u.grad = None
        if cuda:
            torch.cuda.synchronize()

    call()                                                             # warm-up
    if what == "mem":
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        else:
            _reset_peak()
            base = _status_mb("VmRSS")
        call()
        return {"peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if cuda else _status_mb("VmHWM")) - base}
    times: list[float] = []
    while len(times) < max(repeats, 1) and sum(times) < budget_s:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "calls": len(times)}


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls (fewer once --budget-s is spent)")
    ap.add_argument("--budget-s", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="default: runs/mixers_<device>.json (the recorded ones: "
                    "benchmarks/results/mixers_<device>.json)")
    ap.add_argument("--child", nargs=10, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, m, L, mode, d, b, dev, dt, rep, budget = args.child
        print(json.dumps(child(what, m, int(L), mode, int(d), int(b), dev, dt, int(rep), float(budget))))
        return
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cuda = args.device.startswith("cuda")
    rows = []
    for L in args.lengths:
        for mixer in args.mixers:
            for mode in MODES:
                row: dict = {"mixer": mixer, "L": L, "mode": mode}
                for what in ("time", "mem"):
                    cmd = [sys.executable, __file__, "--child", what, mixer, str(L), mode, str(args.d_model),
                           str(args.batch), args.device, dtype, str(args.repeats), str(args.budget_s)]
                    mem_env = {} if cuda or what == "time" else {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
                    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **mem_env})
                    if out.returncode != 0:
                        row["note"] = (out.stderr.strip().splitlines() or ["failed"])[-1][:100]
                        break
                    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
                rows.append(row)
                if "note" in row:
                    row.update(ms=None, peak_mb=None)
                    print(f"  {mixer:9s} L={L:6d} {mode:8s} FAILED: {row['note']}", flush=True)
                else:
                    print(f"  {mixer:9s} L={L:6d} {mode:8s} {row['ms']:10.1f} ms {row['peak_mb']:9.1f} MB", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "machine": machine(args.device),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_avg_at_end": os.getloadavg()[0],
            "commit": commit + ("+uncommitted" if dirty else ""), "d_model": args.d_model, "batch": args.batch,
            "dtype": dtype}
    print(f"\nOne mixer layer, d_model {args.d_model}, batch {args.batch}, {dtype}, {meta['machine']} "
          f"({meta['cpus']} cpus, {meta['torch_threads']} torch threads), {meta['date']}, commit {meta['commit']}")
    print("median ms / peak MB above inputs and parameters\n")
    print("| mixer | mode | " + " | ".join(f"L={L}" for L in args.lengths) + " |")
    print("|---|---|" + "---|" * len(args.lengths))
    for mixer in args.mixers:
        for mode in MODES:
            cells = []
            for L in args.lengths:
                r = next(r for r in rows if (r["mixer"], r["L"], r["mode"]) == (mixer, L, mode))
                cells.append(r.get("note", "") if r["ms"] is None else f"{r['ms']:.0f} ms / {r['peak_mb']:.0f} MB")
            print(f"| {mixer} | {mode} | " + " | ".join(cells) + " |")
    path = Path(args.json or f"runs/mixers_{args.device.split(':')[0]}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
