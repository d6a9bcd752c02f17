"""Find the Triton kernel behind an asynchronous CUDA fault ("an illegal memory access was encountered").

A fault in a kernel surfaces at some later CUDA call, often in another kernel's launch or load (docs/experiments.md
§1: the MQAR cell mamba2-N64 at width 32 surfaced at ``bwd_dx_kernel``'s load). This script synchronises the
device before and after every Triton launch, so the first launch whose own run fails is named, with its grid,
constexprs and every tensor argument's shape, strides, dtype, storage offset and storage size; a fault that
appears before a launch is said to come from a torch op (or the launch before it).

Workloads:
    mixer B L                         one Mamba-2 mixer (headdim 32, d_state 64, one group, chunk 64: the MQAR cell's
                                      shape, d_model 32) forward + backward under bf16 autocast, fused and per-op,
                                      three times each
    mqar MODEL WIDTH LENGTH LR STEPS  one MQAR grid run (mamba2.experiments.mqar.train_one) cut to STEPS steps

    python benchmarks/locate_fault.py mixer 64 128
    python benchmarks/locate_fault.py mqar mamba2-N64 32 256 1e-3 20
    python benchmarks/locate_fault.py --tune '{"ssd": {"state_bwd": {"num_stages": 1}}}' mqar mamba2-N64 32 256 1e-3 20

``--tune`` runs under tuning overrides (family → entry → parameters, as ``Tuning.tuned``). Exit status 3 when a
fault was found, 0 when the workload ran through. Under ``TRITON_INTERPRET=1`` on a CPU it only counts the
launches (a check that the workloads still run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAULT_EXIT = 3


def describe(a) -> str:
    if torch.is_tensor(a):
        return (f"{tuple(a.shape)} strides {tuple(a.stride())} {str(a.dtype).removeprefix('torch.')} "
                f"offset {a.storage_offset()} storage {a.untyped_storage().nbytes()} B")
    return repr(a)


def sync_every_launch(device_sync=None) -> dict:
    """Wrap Triton's launch so that the device is synchronised (``device_sync``, default
    ``torch.cuda.synchronize`` where CUDA is, else nothing) before and after every kernel; returns the launch
    counter."""
    from mamba2.kernels import INTERPRET

    if INTERPRET:
        from triton.runtime.interpreter import InterpretedFunction as Kernel
    else:
        from triton.runtime.jit import JITFunction as Kernel
    launch = Kernel.run
    count = {"launches": 0}
    if device_sync is None:
        device_sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def sync(where: str) -> None:
        try:
            device_sync()
        except Exception as e:  # noqa: BLE001  (any CUDA error: this is what we are looking for)
            print(f"FAULT {where}: {e}", flush=True)
            os._exit(FAULT_EXIT)

    def run(self, *args, grid, warmup, **kwargs):
        name = getattr(self, "fn", self).__name__
        if not warmup:
            sync(f"before launch #{count['launches'] + 1} ({name}): in a torch op or the launch before")
        out = launch(self, *args, grid=grid, warmup=warmup, **kwargs)
        if not warmup:
            count["launches"] += 1
            try:
                device_sync()
            except Exception as e:  # noqa: BLE001
                g = grid(kwargs) if callable(grid) else grid
                print(f"FAULT in launch #{count['launches']}: {name}, grid {g}: {e}", flush=True)
                for i, a in enumerate(args):
                    print(f"  arg {i}: {describe(a)}", flush=True)
                print(f"  keywords: {kwargs}", flush=True)
                os._exit(FAULT_EXIT)
        return out

    Kernel.run = run
    return count


def tuned(overrides: dict) -> contextlib.ExitStack:
    """Enter every family's ``tuned`` block (families: ssd, conv, norm, mixer, selective_scan)."""
    import mamba2.layers.triton.mixer  # noqa: F401  (registers every kernel family's table)
    from mamba2.kernels import _TABLES

    stack = contextlib.ExitStack()
    for family, entries in overrides.items():
        table = next((t for t in _TABLES if t.family == family), None)
        if table is None:
            raise SystemExit(f"no tuning family {family!r}; families: {', '.join(t.family for t in _TABLES)}")
        stack.enter_context(table.tuned(**entries))
    return stack


def mixer(batch: int, length: int, device: str) -> None:
    from mamba2.config import Mamba2Config
    from mamba2.kernels import kernels
    from mamba2.layers.mamba2 import Mamba2Mixer
    from mamba2.layers.triton import mixer as fused

    torch.manual_seed(0)
    m = Mamba2Mixer(Mamba2Config(d_model=32, n_layer=1, vocab_size=64, headdim=32, d_state=64, ngroups=1,
                                 chunk_size=64)).to(device)
    u = torch.randn(batch, length, 32, device=device, requires_grad=True)
    for fused_on in (True, False):
        for _ in range(3):
            with kernels("on"), fused.TUNING.tuned(keep=dict(FUSED=fused_on)), \
                    torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                out = m(u)
            out.float().square().mean().backward()


def mqar(model: str, width: int, length: int, lr: float, steps: int, device: str) -> None:
    from mamba2.experiments import mqar as M

    setting = dataclasses.replace(M.FULL, steps=steps, test_examples=64)
    record = M.train_one({"key": "locate", "model": model, "width": width, "length": length, "lr": lr,
                          "device": device, "setting": dataclasses.asdict(setting)})
    print(f"final loss {record['final_loss']}, accuracy {record['accuracy']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", default=None, help="tuning overrides as JSON: family -> entry -> parameters")
    ap.add_argument("workload", choices=("mixer", "mqar"))
    ap.add_argument("args", nargs="+")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    count = sync_every_launch()
    with tuned(json.loads(a.tune)) if a.tune else contextlib.nullcontext():
        t0 = time.perf_counter()
        if a.workload == "mixer":
            mixer(int(a.args[0]), int(a.args[1]), device)
        else:
            m, w, length, lr, steps = a.args
            mqar(m, int(w), int(length), float(lr), int(steps), device)
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"no fault: {a.workload} {' '.join(a.args)} ({count['launches']} launches, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
