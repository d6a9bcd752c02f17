"""Shared pieces of the GPU benchmarks: relative error, CUDA-event timing, the measured copy ceiling, a per-kernel
profile table, and mamba_ssm (official, 2.3.2) as a benchmark oracle only (docs/benchmarks.md): a pure-Python wheel
unpacked in ``.oracle/pkg`` (build: ``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps
--no-build-isolation mamba-ssm==2.3.2.post1``, then unzip), imported with its package ``__init__`` stubbed (that
``__init__`` loads a CUDA extension we do not build). Only its Triton code paths run.
"""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64; inf if a has a NaN or inf."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn, rep=60):
    """Median ms of fn over ``rep`` ms of calls after a warm-up (triton.testing.do_bench: CUDA events)."""
    import triton
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def copy_tbs(device="cuda"):
    """The measured device-to-device copy bandwidth (TB/s, read + write) of a 1 GiB buffer."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / (bench(lambda: b.copy_(a)) * 1e-3) / 1e12


def profile(fn, title, rows=18, calls=5):
    """Print the CUDA-time table of ``calls`` calls of fn (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    print(f"--- profile {title} ({calls} calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def import_oracle(module: str, attr: str | None = None):
    """``mamba_ssm.<module>`` (or its attribute ``attr``), or None (with the reason printed) when unavailable."""
    root = ROOT / ".oracle" / "pkg"
    if not (root / "mamba_ssm").exists():
        print(f"oracle unavailable: {root / 'mamba_ssm'} does not exist")
        return None
    try:
        # the models module imports the compiled Mamba-1 scan at import time; the Mamba-2 paths compared never
        # call it, and it is not in the prebuilt oracle
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        if "mamba_ssm" not in sys.modules:
            sys.path.insert(0, str(root))
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = [str(root / "mamba_ssm")]
            sys.modules["mamba_ssm"] = pkg
        mod = importlib.import_module(f"mamba_ssm.{module}")
        return getattr(mod, attr) if attr else mod
    except Exception as e:  # noqa: BLE001
        print(f"oracle mamba_ssm.{module} unavailable: {e!r}")
        return None
