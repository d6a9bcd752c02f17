"""Speed curves (Dao & Gu 2024, Fig. 10): SSD against the Mamba-1 selective scan and causal attention, forward and
forward+backward, time against sequence length at a fixed state size and against state size at a fixed length.

Shapes (FULL, the paper's d_model 2048): SSD with 64 heads × headdim 64 (d_inner 4096), one group, chunk 256;
the selective scan over d_inner 4096 channels (its A is per channel and state: (4096, N)); attention with 32 heads
× 64 (d_model 2048) through ``torch.nn.functional.scaled_dot_product_attention`` (its FlashAttention backend on a
GPU). Batch 1 for every length; N = 64 for the length sweep, L = 4096 for the state sweep. bf16 inputs on a GPU
(float32 on a CPU). Each point is the median of timed calls after warm-up (CUDA events on a GPU), a point that
runs out of memory is recorded as such. The Mamba-1 scan is ours (``mamba2.layers.selective_scan``: Triton on a
GPU, PyTorch on a CPU): mamba_ssm's fused CUDA scan is not part of this environment, so it is not the paper's
Mamba baseline.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mamba2.errors import UserError
from mamba2.experiments import grid

NAME = "speed"
TIMED = True        # its results are timings: one device per folder, no --workers
OPS = ("ssd", "selective_scan", "attention")
PASS_STYLES = {"forward": "--", "forward+backward": "-"}
FIELDS = {"sweep": (str,), "op": (str,), "pass": (str,), "L": (int,), "N": (int,), "ms": grid.OPTIONAL_NUMBER,
          "device": (str,)}     # what the report reads of a record (grid.merged)


@dataclass(frozen=True)
class Setting:
    lengths: tuple[int, ...]
    states: tuple[int, ...]
    length_for_states: int
    state_for_lengths: int
    nheads: int
    headdim: int
    attn_heads: int
    chunk_size: int
    warmup: int
    reps: int


FULL = Setting(lengths=(512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072), states=(16, 32, 64, 128, 256),
               length_for_states=4096, state_for_lengths=64, nheads=64, headdim=64, attn_heads=32, chunk_size=256,
               warmup=3, reps=10)
TINY = Setting(lengths=(64, 128), states=(8, 16), length_for_states=64, state_for_lengths=8, nheads=4, headdim=8,
               attn_heads=2, chunk_size=32, warmup=1, reps=2)


def describe(record: dict[str, Any]) -> str:
    ms = record["ms"]
    return f"{record['key']}: " + ("out of memory" if ms is None else f"{ms:.3f} ms")


def runs(setting: Setting, device: str,
         done: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """One point per (sweep, op, pass, L, N); attention has no state size, so the state sweep has one attention
    point per pass (its line is flat)."""
    points = [("length", L, setting.state_for_lengths) for L in setting.lengths]
    points += [("state", setting.length_for_states, N) for N in setting.states]
    out = []
    for sweep, L, N in points:
        for op in OPS:
            if op == "attention" and sweep == "state" and N != setting.states[0]:
                continue
            for passes in ("forward", "forward+backward"):
                out.append({"key": f"{sweep}/{op}/{passes}/L{L}/N{N}", "sweep": sweep, "op": op, "pass": passes,
                            "L": L, "N": N, "device": device, "setting": dataclasses.asdict(setting)})
    return out, []


def _inputs(op: str, L: int, N: int, s: Setting, device: torch.device, dtype: torch.dtype):
    g = torch.Generator(device).manual_seed(0)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype).requires_grad_()

    H, P = s.nheads, s.headdim
    if op == "ssd":
        A = -torch.rand(H, generator=g, device=device) - 0.5
        return dict(x=r(1, L, H, P), dt=r(1, L, H, scale=0.5), A=A, B=r(1, L, 1, N), C=r(1, L, 1, N))
    if op == "selective_scan":
        d = H * P
        A = -torch.rand(d, N, generator=g, device=device) - 0.5
        return dict(u=r(1, L, d), delta=r(1, L, d, scale=0.5), A=A, B=r(1, L, N), C=r(1, L, N))
    heads, hd = s.attn_heads, H * P // 2 // s.attn_heads        # d_model = d_inner / 2
    return dict(query=r(1, heads, L, hd), key=r(1, heads, L, hd), value=r(1, heads, L, hd))


def _call(op: str, s: Setting) -> Callable[..., torch.Tensor]:
    from mamba2.layers.selective_scan import selective_scan
    from mamba2.ssd import ssd

    if op == "ssd":
        return lambda **kw: ssd(**kw, dt_softplus=True, chunk_size=s.chunk_size)
    if op == "selective_scan":
        return lambda **kw: selective_scan(**kw, delta_softplus=True)
    return lambda **kw: F.scaled_dot_product_attention(**kw, is_causal=True)


def median_ms(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones (CUDA events on a GPU,
    the wall clock elsewhere)."""
    return statistics.median(times_ms(fn, device, warmup, reps))


def times_ms(fn: Callable[[], None], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones (as :func:`median_ms`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def train_one(run: dict[str, Any]) -> dict[str, Any]:
    """Time one point (the grid's ``fn``): the median ms and the min and max of the timed calls, or ms None (with
    the reason) when it ran out of memory."""
    s = grid.setting_of(Setting, run)
    device = torch.device(run["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    call = _call(run["op"], s)
    try:
        kw = _inputs(run["op"], run["L"], run["N"], s, device, dtype)
        if run["pass"] == "forward":
            def fn():
                with torch.no_grad():
                    call(**kw)
        else:
            def fn():
                out = call(**kw)
                out.backward(torch.ones_like(out))
        times = times_ms(fn, device, s.warmup, s.reps)
        error = None
    except torch.OutOfMemoryError as e:
        times, error = [], f"out of memory: {str(e).splitlines()[0]}"
    finally:
        kw = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    spread = {k: round(v, 4) for k, v in (("ms", statistics.median(times)), ("ms_min", min(times)),
                                          ("ms_max", max(times)))} if times else {"ms": None}
    return {**spread, "error": error, "dtype": str(dtype).replace("torch.", "")}


def report(out: Path) -> str:
    """Merge the points in ``out`` into ``speed.json``, ``speed.md`` (ms per op and pass, one table per sweep) and
    ``speed.png`` (time against length, and against state size); return the markdown.
    While runs of the grid are missing, the markdown opens with how many are there (:func:`grid.on_plan`).

    Raises:
        UserError: no results in ``out``, results of different settings, or of different devices.
    """
    records = grid.merged(out, NAME, FIELDS)
    if not records:
        raise UserError(f"no speed results in {out} (files {NAME}.part*.jsonl)")
    grid.one_device(out, NAME, records)
    records, note = grid.on_plan(out, records, runs(grid.setting_of(Setting, records[0]), records[0]["device"]))
    if not records:
        raise UserError(f"no results of this grid's points in {out} (files {NAME}.part*.jsonl)")

    def value(sweep: str, op: str, passes: str, axis: str, x: int):
        for r in records:       # attention has no state: its one point stands for every N
            if (r["sweep"], r["op"], r["pass"]) == (sweep, op, passes) and (r[axis] == x or op == "attention"
                                                                            and axis == "N"):
                return "OOM" if r["ms"] is None else r["ms"]
        return None

    parts = []
    for sweep, axis, other in (("length", "L", "N"), ("state", "N", "L")):
        mine = [r for r in records if r["sweep"] == sweep]
        if not mine:
            continue
        xs = sorted({r[axis] for r in mine})
        rows = [[op, passes] + [value(sweep, op, passes, axis, x) for x in xs]
                for op in OPS for passes in ("forward", "forward+backward")]
        title = (f"time (ms) against sequence length, N = {mine[0][other]}" if axis == "L"
                 else f"time (ms) against state size N, L = {mine[0][other]}")
        parts.append(f"**{title}**\n\n" + grid.markdown_table(["op", "pass"] + [f"{axis} {x}" for x in xs], rows))
    return grid.write_report(out, NAME, note + "\n\n".join(parts) + "\n" + _spread(records), records,
                             _plot(records))


def _spread(records: list[dict[str, Any]]) -> str:
    """The line under the tables saying how much the timed calls of a point varied: the largest max/min ratio."""
    ratios = [(r["ms_max"] / r["ms_min"], r["key"]) for r in records
              if isinstance(r.get("ms_min"), grid.NUMBER) and isinstance(r.get("ms_max"), grid.NUMBER) and r["ms_min"]]
    if not ratios:
        return ""
    worst, key = max(ratios)
    reps = records[0]["setting"]["reps"]
    tiny = ("\n--tiny checks that the pipeline runs end to end (tiny shapes, launch-bound, two timed calls a "
            "point): its figures are not measurements; run the full grid on a GPU for those.\n"
            if grid.setting_of(Setting, records[0]) == TINY else "")
    return (f"\nEach point is the median of {reps} timed calls; the calls of a point differ by at most "
            f"{worst:.2f}× (max/min, at {key}; every point's min and max are in speed.json).\n" + tiny)


def _plot(records):
    """Time against length and against state size: a colour per op, a line style per pass (the legend names both)."""
    from matplotlib.lines import Line2D

    fig, axes = grid.figure(1, 2, figsize=(11, 4), dpi=110)
    for ax, (sweep, axis, label) in zip(axes, (("length", "L", "sequence length"), ("state", "N", "state size N"))):
        for op in OPS:
            for passes, style in PASS_STYLES.items():
                pts = sorted((r[axis], r["ms"]) for r in records
                             if r["sweep"] == sweep and r["op"] == op and r["pass"] == passes and r["ms"] is not None)
                if op == "attention" and sweep == "state" and pts:
                    xs = sorted({r["N"] for r in records if r["sweep"] == "state"})
                    pts = [(x, pts[0][1]) for x in xs]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", markersize=3, color=f"C{OPS.index(op)}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("time (ms)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("against sequence length")
    axes[1].set_title("against state size")
    ops, passes = {r["op"] for r in records}, {r["pass"] for r in records}
    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="none", label=op)
               for i, op in enumerate(OPS) if op in ops]
    handles += [Line2D([], [], color="0.3", linestyle=style, label=p)
                for p, style in PASS_STYLES.items() if p in passes]
    # beside the panels, not over them: at some points every corner of the axes has a line
    axes[1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    return fig

