"""The Mamba-1 selective scan's Triton kernels on one GPU (docs/triton_notes.md): checked compiled against the float64
recurrence, timed at the shapes the experiments use, and their launch parameters swept.

    python benchmarks/scan_gpu.py --check                 # compiled kernels vs the float64 recurrence (+ gradients)
    python benchmarks/scan_gpu.py --bench --out DIR       # table + JSON: forward, forward+backward, floors
    python benchmarks/scan_gpu.py --variants --out DIR    # BT / ELEMS / num_warps of each kernel, swept
    python benchmarks/scan_gpu.py --variants --shapes mqar,lm40m --entries bwd --out DIR   # a part of that sweep

Shapes: ``speed`` (batch 1, d_inner 4096, N 64, L 32,768: the Fig. 10 curve's), ``mqar`` (64 × 1024, d_inner 512,
N 16: the widest MQAR model), ``lm40m`` (32 × 512, d_inner 1024, N 16). Inputs bf16 (dt fp32), as the Mamba-1
mixer hands them over. Times are medians of ``triton.testing.do_bench`` (CUDA events, after warm-up); the
forward floor is the larger of its exponentials (one per token, channel and state, at 16 per SM per clock: the
special-function units' rate) and its bytes over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from itertools import product
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_util import bench, copy_tbs, rel  # noqa: E402
from mamba2.layers.selective_scan import selective_scan_recurrent  # noqa: E402
from mamba2.layers.triton import selective_scan as TS  # noqa: E402

SHAPES = {"speed": (1, 32768, 4096, 64), "mqar": (64, 1024, 512, 16), "lm40m": (32, 512, 1024, 16)}


def inputs(b: int, L: int, d: int, n: int, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator("cuda").manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(b, L, d, device="cuda", generator=g) * 0.5 - 2)
    u = torch.randn(b, L, d, device="cuda", generator=g).to(dtype)
    A = -(torch.rand(d, n, device="cuda", generator=g) * 2 + 0.2)
    B, C = (torch.randn(b, L, n, device="cuda", generator=g).to(dtype) for _ in range(2))
    h0 = torch.randn(b, d, n, device="cuda", generator=g) * 0.5
    return dt, u, A, B, C, h0


def check() -> None:
    """fp32 inputs at 2 × 300 × 96 × 16 and 1 × 200 × 40 × 64 (several blocks, chunks and channel programs, ragged
    ends), a document reset inside: y, the final state and every gradient against the float64 recurrence."""
    for b, L, d, n in ((2, 300, 96, 16), (1, 200, 40, 64)):
        dt, u, A, B, C, h0 = inputs(b, L, d, n, dtype=torch.float32)
        reset = torch.zeros(b, L, dtype=torch.bool, device="cuda")
        reset[:, L // 3] = True
        leaves = [t.clone().requires_grad_() for t in (dt, u, A, B, C, h0)]
        y, h, _ = TS.selective_scan_triton(*leaves[:5], reset, leaves[5])
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        ((y * gy).sum() + (h * gh).sum()).backward()
        ref = [t.double().clone().requires_grad_() for t in (dt, u, A, B, C, h0)]
        seq_idx = torch.cumsum(reset.long(), 1)
        y_r, h_r = selective_scan_recurrent(ref[1], ref[0], ref[2], ref[3], ref[4], initial_state=ref[5],
                                            seq_idx=seq_idx, return_final_state=True)
        ((y_r * gy.double()).sum() + (h_r * gh.double()).sum()).backward()
        errs = {"y": rel(y, y_r), "h": rel(h, h_r)}
        errs.update({f"d{k}": rel(a.grad, r.grad) for k, a, r in zip(("dt", "u", "A", "B", "C", "h0"), leaves, ref)})
        worst = max(errs.values())
        print(f"check {b}x{L}x{d}x{n}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()),
              "OK" if worst <= 1e-4 else "OVER the 1e-4 fp32 budget")


def calls(shape: str):
    b, L, d, n = SHAPES[shape]
    dt, u, A, B, C, h0 = inputs(b, L, d, n)
    leaves = [t.requires_grad_() for t in (dt, u, A, B, C)]
    gy = torch.randn(b, L, d, device="cuda")

    def fwd():
        with torch.no_grad():
            TS.selective_scan_triton(*leaves, None, h0)

    def fwd_bwd():
        y, _, _ = TS.selective_scan_triton(*leaves, None, h0)
        y.backward(gy)
    return fwd, fwd_bwd


def floor_ms(shape: str, tbs: float) -> float:
    b, L, d, n = SHAPES[shape]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clock_hz = 1.98e9                       # H100/H200 SXM boost clock
    exp_s = b * L * d * n / (sms * 16 * clock_hz)
    ch = TS.TUNING["fwd"]["CH"]
    # u bf16, dt and y fp32, B and C bf16, and the fp32 checkpoint every CH tokens the forward always writes
    bytes_ = b * L * d * (2 + 4 + 4) + 2 * b * L * n * 2 + b * math.ceil(L / ch) * d * n * 4
    return max(exp_s, bytes_ / (tbs * 1e12)) * 1e3


def run_bench(outdir: Path) -> list[dict]:
    tbs = copy_tbs()
    rows = []
    for shape in SHAPES:
        fwd, fwd_bwd = calls(shape)
        rows.append({"shape": shape, "dims": SHAPES[shape], "fwd_ms": bench(fwd), "fwd_bwd_ms": bench(fwd_bwd),
                     "fwd_floor_ms": floor_ms(shape, tbs)})
        r = rows[-1]
        print(f"{shape:6s} {str(r['dims']):24s} forward {r['fwd_ms']:8.3f} ms (floor {r['fwd_floor_ms']:.3f}, "
              f"{r['fwd_ms'] / r['fwd_floor_ms']:.1f}x)   forward+backward {r['fwd_bwd_ms']:8.3f} ms", flush=True)
    write(outdir, "scan_bench.json", {"copy_tbs": tbs, "tuning": TS.TUNING.current(), "rows": rows})
    return rows


def run_variants(outdir: Path, shapes: list[str], entries: list[str]) -> list[dict]:
    variants = [{}]
    variants += [{"fwd": dict(BT=bt, ELEMS=e, num_warps=w)} for bt, e, w in product((8, 16, 32), (2048, 4096, 8192),
                                                                                   (4, 8))]
    variants += [{"bwd": dict(BT=bt, ELEMS=e, num_warps=w)} for bt, e, w in product((8, 16), (1024, 2048, 4096),
                                                                                   (4, 8))]
    variants += [{"bwd": dict(PART_BYTES=0)}]        # dB/dC by atomic adds instead of the partial-sum buffer
    variants = [v for v in variants if not v or next(iter(v)) in entries]
    rows = []
    for shape in shapes:
        fwd, fwd_bwd = calls(shape)
        for over in variants:
            fn = fwd if "fwd" in over else fwd_bwd
            try:
                with TS.TUNING.tuned(**over):
                    ms = bench(fn, rep=40)
            except Exception as e:  # noqa: BLE001  (a launch that does not fit: recorded, not fatal)
                ms, over = math.nan, {**over, "error": repr(e)[:120]}
            rows.append({"shape": shape, "over": over, "timed": "forward" if "fwd" in over else "forward+backward",
                         "ms": ms})
            print(json.dumps(rows[-1]), flush=True)
            write(outdir, "scan_variants.json", {"tuning": TS.TUNING.current(), "rows": rows})  # kept if cut off
        base_f, base_fb = bench(fwd, rep=40), rows[[r["shape"] for r in rows].index(shape)]["ms"]
        for timed, base in (("forward", base_f), ("forward+backward", base_fb)):
            mine = [r for r in rows if r["shape"] == shape and r["timed"] == timed and r["ms"] == r["ms"]]
            print(f"\n{shape}: {timed}, default {base:.3f} ms; the five fastest:")
            for r in sorted(mine, key=lambda r: r["ms"])[:5]:
                print(f"  {r['ms']:.3f} ms ({r['ms'] / base:.2f}x)  {r['over'] or 'default'}")
    return rows


def write(outdir: Path, name: str, payload: dict) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    payload = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "torch": torch.__version__, **payload}
    (outdir / name).write_text(json.dumps(payload, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--shapes", default="speed,mqar", help=f"--variants: comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--entries", default="fwd,bwd", help="--variants: the tuning entries swept (fwd, bwd)")
    ap.add_argument("--out", type=Path, default=Path("runs/scan_gpu"))
    args = ap.parse_args()
    shapes, entries = (list(dict.fromkeys(x.strip() for x in a.split(","))) for a in (args.shapes, args.entries))
    if not set(shapes) <= set(SHAPES) or not set(entries) <= {"fwd", "bwd"}:
        ap.error(f"--shapes takes {', '.join(SHAPES)} and --entries fwd, bwd; got {args.shapes!r}, {args.entries!r}")
    if not args.variants and (args.shapes, args.entries) != (ap.get_default("shapes"), ap.get_default("entries")):
        ap.error("--shapes and --entries choose what --variants sweeps: add --variants")
    if not torch.cuda.is_available():
        sys.exit("scan_gpu.py needs a CUDA GPU (the kernels' CPU tests: tests/test_triton_selective_scan.py)")
    if not (args.check or args.bench or args.variants):
        ap.error("say what to run: --check, --bench and/or --variants")
    if args.check:
        check()
    if args.bench:
        run_bench(args.out)
    if args.variants:
        run_variants(args.out, shapes, entries)


if __name__ == "__main__":
    main()
