"""SSD on CPU: recurrent vs quadratic vs chunked, time and peak memory over sequence length.

Shape of one mamba2-130m layer (nheads 24, headdim 64, d_state 128, ngroups 1), fp32, batch 1, forward only.
Each (method, L) runs in a fresh subprocess so its peak resident memory (VmHWM) is its own; the reported
memory is the peak above what the process held once its inputs existed.

    python benchmarks/ssd_cpu.py [--lengths 256 1024 4096 16384] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

H, P, N, G = 24, 64, 128, 1
METHODS = {"recurrent": ("recurrent", None), "quadratic": ("quadratic", None),
           "chunked Q=64": ("chunked", 64), "chunked Q=256": ("chunked", 256)}


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(backend: str, chunk: int | None, L: int, repeats: int) -> dict:
    import torch

    from mamba2.ssd import ssd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, L, H, P, generator=g)
    dt = torch.randn(1, L, H, generator=g) - 2
    A = -torch.rand(H, generator=g) * 15 - 1
    B = torch.randn(1, L, G, N, generator=g)
    C = torch.randn(1, L, G, N, generator=g)
    D = torch.randn(H, generator=g)
    base = _vmhwm_mb()
    times = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            ssd(x, dt, A, B, C, D=D, chunk_size=chunk or 256, backend=backend)
            if i:                                   # the first call is the warm-up
                times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "peak_mb": _vmhwm_mb() - base}


def quadratic_bytes(L: int) -> float:
    return 6 * 4 * H * L * L                       # ~six (h, L, L) fp32 temporaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-quadratic-gb", type=float, default=8.0, help="skip the quadratic form above this")
    ap.add_argument("--json", default="runs/ssd_cpu.json",
                    help="where to write the results (the recorded ones: benchmarks/results/ssd_cpu.json)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        backend, chunk, L, rep = args.child
        print(json.dumps(child(backend, int(chunk) or None, int(L), int(rep))))
        return

    rows = []
    for L in args.lengths:
        for name, (backend, chunk) in METHODS.items():
            if backend == "quadratic" and quadratic_bytes(L) > args.max_quadratic_gb * 2**30:
                rows.append({"method": name, "L": L, "ms": None, "peak_mb": None,
                             "note": f"skipped: needs ~{quadratic_bytes(L) / 2**30:.0f} GB"})
                continue
            rep = 1 if backend == "recurrent" and L > 4096 else args.repeats
            out = subprocess.run([sys.executable, __file__, "--child", backend, str(chunk or 0), str(L), str(rep)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                rows.append({"method": name, "L": L, "ms": None, "peak_mb": None,
                             "note": out.stderr.strip().splitlines()[-1][:80]})
                continue
            rows.append({"method": name, "L": L, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(f"  {name:14s} L={L:6d}  {rows[-1]['ms']:10.1f} ms  {rows[-1]['peak_mb']:8.0f} MB", flush=True)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(), "commit": commit, "shape": dict(nheads=H, headdim=P, d_state=N,
                                                                              ngroups=G, batch=1, dtype="fp32")}
    print(f"\nSSD forward on CPU ({meta['cpus']} cores), {meta['date']}, commit {commit}; "
          "median ms / peak MB above inputs")
    header = "| L | " + " | ".join(METHODS) + " |"
    print(header)
    print("|" + "---|" * (len(METHODS) + 1))
    for L in args.lengths:
        cells = []
        for name in METHODS:
            r = next(r for r in rows if r["L"] == L and r["method"] == name)
            cells.append(r.get("note", "") if r["ms"] is None else f"{r['ms']:.1f} ms / {r['peak_mb']:.0f} MB")
        print(f"| {L} | " + " | ".join(cells) + " |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
