"""Issue 13's tables and plot from the JSON that ``benchmarks/distributed_gpu.py`` writes at several world sizes.

    python benchmarks/distributed_report.py benchmarks/results/distributed_{1,2,4}xh200.json --out docs/img

Prints markdown (correctness per layout; FSDP2 tokens/s per GPU and scaling efficiency against world 1; the
tensor-parallel block: time, speed-up, its collectives from the profiler beside the cost model's forward payload;
context parallel: time and memory per length, the collectives' share of the time, and the issue's targets: FSDP2
efficiency >= 90%, CP over W GPUs running a sequence W times longer than one GPU holds at >= 80% of its speed per
token), writes it to ``OUT/distributed.md`` and the plot (FSDP2 scaling, TP block time, CP time per token) to
``OUT/distributed.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FSDP_TARGET, CP_TARGET = 0.90, 0.80


def load(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """(metas, rows) of every file; each row gains its file's ``world``."""
    metas, rows = [], []
    for path in paths:
        data = json.loads(path.read_text())
        metas.append({**data["meta"], "file": path.name})
        rows += [{**r, "world": data["meta"]["world"]} for r in data["rows"]]
    return metas, rows


def table(header: list[str], body: list[list]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in body])


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} MB"


def _gib(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def report(metas: list[dict], rows: list[dict]) -> str:
    parts = ["Runs: " + "; ".join(f"{m['file']}: world {m['world']}, {m['device']}, torch {m['torch']}, {m['date']}"
                                  + (" (--small dry run)" if m.get("small") else "") for m in metas)]
    correct = [r for r in rows if r["part"] == "correct" and r["world"] > 1]
    if correct:
        parts.append("**Parallel = one device** (relative error; budget 1e-3 fp32, TF32 off; 2e-2 bf16)\n\n" + table(
            ["world", "layout", "dtype", "logits", "worst gradient", "within budget"],
            [[r["world"], r["mode"], r["dtype"], f"{r['logits']:.1e}", f"{r['grads']:.1e}",
              "yes" if max(r["logits"], r["grads"]) <= r["budget"] else "**no**"] for r in correct]))
    fsdp = [r for r in rows if r["part"] == "fsdp"]
    if fsdp:
        base = {r["shape"]: r["tokens_per_s_per_gpu"] for r in fsdp if r["world"] == 1}
        body = []
        for r in sorted(fsdp, key=lambda r: (r["shape"], r["world"])):
            eff = r["tokens_per_s_per_gpu"] / base[r["shape"]] if r["shape"] in base else None
            mark = "" if eff is None or r["world"] == 1 else " (met)" if eff >= FSDP_TARGET else " (**missed**)"
            body.append([r["shape"], r["world"], f"{r['tokens_per_s_per_gpu']:,.0f}", f"{r['step_s'] * 1e3:.1f}",
                         "–" if eff is None else f"{eff:.0%}{mark}", _gib(r.get("peak_gib"))])
        parts.append(f"**FSDP2 scaling** (tokens/s per GPU over world 1's; target ≥ {FSDP_TARGET:.0%})\n\n"
                     + table(["shape", "GPUs", "tokens/s per GPU", "ms/step", "efficiency", "peak GiB"], body))
    tp = sorted((r for r in rows if r["part"] == "tp"), key=lambda r: r["tp"])
    if tp:
        one = next((r["fwd_bwd_s"] for r in tp if r["tp"] == 1), None)
        body = [[r["tp"], f"{r['fwd_bwd_s'] * 1e3:.2f}", "–" if one is None else f"{one / r['fwd_bwd_s']:.2f}×",
                 _collectives(r["forward"]), _mb(r["forward_payload_model"]), _collectives(r["backward"]),
                 f"{r['comm_share']:.0%}", _gib(r.get("peak_gib"))] for r in tp]
        parts.append("**Tensor parallel**: one 2.7b-shape Mamba-2 block, forward + backward (collectives from the "
                     "profiler: count × kind, payload; the model: docs/distributed.md §5)\n\n" + table(
                         ["TP", "ms", "speed-up", "forward collectives", "forward payload (model)",
                          "backward collectives", "comm share", "peak GiB"], body))
    cp = sorted((r for r in rows if r["part"] == "cp"), key=lambda r: (r["cp"], r["tokens"]))
    if cp:
        body = [[r["cp"], f"{r['tokens']:,}", "out of memory" if r.get("oom") else f"{r['fwd_bwd_s']:.3f}",
                 "–" if r.get("oom") else f"{r['fwd_bwd_s'] / r['tokens'] * 1e6:.2f}",
                 _gib(r.get("peak_gib")), "–" if r.get("oom") else f"{r.get('comm_share', 0):.0%}"] for r in cp]
        parts.append("**Context parallel**: one sequence through a 2-layer 2.7b-shape stack, forward + backward\n\n"
                     + table(["CP", "tokens", "s", "µs per token", "peak GiB per GPU", "comm share"], body))
        parts.append(_cp_target(cp))
    return "\n\n".join(parts) + "\n"


def _collectives(c: dict) -> str:
    kinds = ", ".join(f"{n} × {k}" for k, n in sorted(c["collectives"].items()) if n)
    size = _mb(c["payload_bytes"])
    if c.get("payload_estimated"):
        size = f"≈ {size} (element sizes not recorded)"
    return f"{kinds or 'none'}; {size}"


def _cp_target(cp: list[dict]) -> str:
    """The issue's CP target, from the longest sequence each CP size ran and whether CP 1 ran out of memory."""
    longest: dict[int, dict] = {}
    for r in cp:
        if not r.get("oom") and r["tokens"] > longest.get(r["cp"], {"tokens": 0})["tokens"]:
            longest[r["cp"]] = r
    if 1 not in longest or len(longest) < 2:
        return "CP target: needs runs at CP 1 and at a larger CP size."
    one = longest[1]
    if not any(r.get("oom") for r in cp if r["cp"] == 1):
        return (f"CP target: not judged, CP 1 held every length tried (up to {one['tokens']:,} tokens); it needs a "
                f"length one GPU cannot hold.")
    lines = []
    for w, r in sorted(longest.items()):
        if w > 1:
            speed = (r["tokens"] / r["fwd_bwd_s"]) / (one["tokens"] / one["fwd_bwd_s"])
            ok = r["tokens"] >= w * one["tokens"] and speed >= CP_TARGET
            lines.append(f"CP {w}: longest {r['tokens']:,} tokens = {r['tokens'] / one['tokens']:.1f}× the longest "
                         f"one GPU holds ({one['tokens']:,}), at {speed:.0%} of its tokens/s (target ≥ {w}× at ≥ "
                         f"{CP_TARGET:.0%}: {'met' if ok else '**missed**'})")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    ax = axes[0]
    for shape in sorted({r["shape"] for r in rows if r["part"] == "fsdp"}):
        pts = sorted((r["world"], r["tokens_per_s_per_gpu"]) for r in rows
                     if r["part"] == "fsdp" and r["shape"] == shape)
        ax.plot(*zip(*pts), "o-", label=shape)
        if pts[0][0] == 1:
            ax.plot([w for w, _ in pts], [pts[0][1] * FSDP_TARGET] * len(pts), ":", color="grey")
    ax.set(title=f"FSDP2: tokens/s per GPU (dotted: {FSDP_TARGET:.0%} of 1 GPU)", xlabel="GPUs",
           xticks=sorted({r["world"] for r in rows}))
    ax = axes[1]
    tp = sorted((r["tp"], r["fwd_bwd_s"] * 1e3) for r in rows if r["part"] == "tp")
    if tp:
        ax.plot(*zip(*tp), "o-")
    ax.set(title="TP: 2.7b block forward + backward", xlabel="TP ranks", ylabel="ms", xticks=[t for t, _ in tp])
    ax = axes[2]
    for w in sorted({r["cp"] for r in rows if r["part"] == "cp"}):
        pts = [(r["tokens"], r["fwd_bwd_s"] / r["tokens"] * 1e6) for r in rows
               if r["part"] == "cp" and r["cp"] == w and not r.get("oom")]
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", label=f"CP {w}")
        for r in rows:
            if r["part"] == "cp" and r["cp"] == w and r.get("oom"):
                ax.axvline(r["tokens"], color="firebrick", alpha=0.3)
    ax.set(title="CP: µs per token (red: out of memory)", xlabel="tokens in the sequence", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", type=Path, help="distributed_gpu.py results, one per world size")
    ap.add_argument("--out", type=Path, help="folder for distributed.md and distributed.png")
    a = ap.parse_args()
    metas, rows = load(a.json)
    text = report(metas, rows)
    print(text)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "distributed.md").write_text(text)
        plot(rows, a.out / "distributed.png")
        print(f"wrote {a.out / 'distributed.md'} and {a.out / 'distributed.png'}")


if __name__ == "__main__":
    main()
