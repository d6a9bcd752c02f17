"""CPU: our Mamba-2 LM against transformers' ``Mamba2ForCausalLM`` (its PyTorch path), same weights, side by side.

mamba2-130m shape (24 layers, d_model 768, d_state 128, headdim 64, vocab 50277 padded to 50288) with random
weights, written once in the transformers format and loaded by both. Measured:

* forward (every position's logits, as ``model(ids)`` returns): tokens/s and peak memory at L ∈ {512, 2048,
  8192}, batch 1 and 4;
* greedy generation of 256 new tokens from a 32-token prompt: tokens/s at batch 1 and 8 (and whether both
  implementations produce the same tokens).

Speed is tokens per CPU-second of the measuring process (wall-clock figures are in the JSON): with one torch thread
(the default) that equals wall-clock speed on an idle core and stays meaningful on a shared, busy machine.
Each measurement runs in a fresh process (so one's allocations cannot hide another's): load, warm up on a short
input, reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), run, read ``VmHWM``. Peak memory is the
peak resident-set growth above the loaded, warmed-up model; the "net" peak is the same mark read when the
vocabulary projection starts, i.e. the network's working memory before the batch × L × 50288 float32 logits that
both must return (at large batch × L those logits dominate the whole-forward peak of both). Timing is one run
after the warm-up (a few for short inputs): repeats are cut to keep the benchmark to minutes on 2 cores.

    python benchmarks/cpu_vs_hf.py                  # everything (~30 min on a busy 2-core machine), table + JSON
    python benchmarks/cpu_vs_hf.py --quick          # L ∈ {512, 2048}, 64 new tokens (~5 min)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB_ROWS = 50288
TARGETS = {"forward_speedup": 2.0, "memory_ratio": 0.5, "generate_speedup": 1.5}


# ------------------------------------------------------------------------------------------------ child side
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _load(impl: str, model_dir: str):
    import torch

    if impl == "ours":
        from mamba2.interop import load
        return load(model_dir).model
    from transformers import Mamba2ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    return Mamba2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def child(impl: str, kind: str, batch: int, length: int, model_dir: str, threads: int, repeats: int) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    import gc

    import torch

    torch.set_num_threads(threads)
    model = _load(impl, model_dir)
    gen = torch.Generator().manual_seed(batch * 100003 + length)
    if kind == "forward":
        ids = torch.randint(0, 50277, (batch, length), generator=gen)
        if impl == "ours":
            run = lambda x: model(x)  # noqa: E731
        else:
            run = lambda x: model(x, use_cache=False).logits  # noqa: E731
        before_head = []  # peak so far when the vocabulary projection starts: the network's working memory
        model.lm_head.register_forward_pre_hook(lambda mod, inp: before_head.append(_status()["VmHWM"]))
        with torch.inference_mode():
            run(ids[:, :64])
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
            base = _status()["VmRSS"]
            times, cpu = [], []
            for _ in range(repeats):
                t, c = time.perf_counter(), time.process_time()
                out = run(ids)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
                del out
            peak = _status()["VmHWM"] - base
        return {"tokens_per_cpu_s": batch * length / min(cpu), "tokens_per_s": batch * length / min(times),
                "seconds": min(times), "cpu_seconds": min(cpu), "peak_bytes": peak,
                "peak_before_head_bytes": before_head[1] - base, "repeats": repeats}
    prompts = torch.randint(0, 50277, (batch, 32), generator=gen)
    with torch.inference_mode():
        if impl == "ours":
            from mamba2.generation import generate
            run = lambda n: generate(model, prompts.tolist(), n, temperature=0)  # noqa: E731
        else:
            run = lambda n: model.generate(prompts, attention_mask=torch.ones_like(prompts),  # noqa: E731
                                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           pad_token_id=0)[:, 32:].tolist()
        run(4)
        t, c = time.perf_counter(), time.process_time()
        tokens = run(length)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
    return {"tokens_per_cpu_s": batch * length / cpu, "tokens_per_s": batch * length / secs, "seconds": secs,
            "cpu_seconds": cpu, "tokens": tokens}


# ------------------------------------------------------------------------------------------------ parent side
def make_model_dir(path: Path) -> None:
    import torch

    from mamba2 import Mamba2Config, Mamba2LM
    from mamba2.interop import save_pretrained

    torch.manual_seed(0)
    save_pretrained(Mamba2LM(Mamba2Config.preset("130m")), path, format="hf")


def measure(impl: str, kind: str, batch: int, length: int, model_dir: Path, threads: int, repeats: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, kind, str(batch), str(length), str(model_dir), str(threads),
           str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def table(results: dict) -> str:
    """Markdown table. "net" peak = peak resident growth when the vocabulary projection starts (the network's
    working memory, before the batch × L × 50288 logits that both must return)."""
    rows = ["| measurement | ours tok/CPU-s | HF tok/CPU-s | speed-up | peak MB ours / HF | ratio | "
            "net peak MB ours / HF | net ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["forward"]:
        o, h = r["ours"], r["hf"]
        if "error" in o or "error" in h:
            rows.append(f"| forward b={r['batch']} L={r['length']} | {o.get('error', '')} | {h.get('error', '')} |")
            continue
        net = "n/a | n/a"
        if "peak_before_head_bytes" in o and "peak_before_head_bytes" in h:
            net = (f"{_mb(o['peak_before_head_bytes'])} / {_mb(h['peak_before_head_bytes'])} | "
                   f"{o['peak_before_head_bytes'] / h['peak_before_head_bytes']:.2f}")
        rows.append(f"| forward b={r['batch']} L={r['length']} | {o['tokens_per_cpu_s']:,.0f} | "
                    f"{h['tokens_per_cpu_s']:,.0f} | {o['tokens_per_cpu_s'] / h['tokens_per_cpu_s']:.2f}× | "
                    f"{_mb(o['peak_bytes'])} / {_mb(h['peak_bytes'])} | {o['peak_bytes'] / h['peak_bytes']:.2f} | "
                    f"{net} |")
    for r in results["generate"]:
        o, h = r["ours"], r["hf"]
        if "error" in o or "error" in h:
            rows.append(f"| generate b={r['batch']} | {o.get('error', '')} | {h.get('error', '')} |")
            continue
        same = "same tokens" if r["tokens_match"] else "tokens differ"
        rows.append(f"| generate {r['new_tokens']} new, b={r['batch']} | {o['tokens_per_cpu_s']:,.1f} | "
                    f"{h['tokens_per_cpu_s']:,.1f} | {o['tokens_per_cpu_s'] / h['tokens_per_cpu_s']:.2f}× | "
                    f"{same} | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gen-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: CPU-time figures stay meaningful on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="L ∈ {512, 2048} and 64 new tokens")
    ap.add_argument("--json", default="runs/cpu_vs_hf.json",
                    help="where to write the results (the recorded ones: benchmarks/results/cpu_vs_hf.json)")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier results file")
    args = ap.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    if args.quick:
        args.lengths, args.new_tokens = [512, 2048], 64
    import torch
    import transformers

    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": args.threads, "torch": torch.__version__,
                           "transformers": transformers.__version__, "load_avg_start": os.getloadavg()},
               "model": "mamba2-130m shape, random weights, float32", "forward": [], "generate": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "m130"
        make_model_dir(model_dir)
        for length in args.lengths:
            for batch in args.batches:
                reps = max(1, min(3, 2048 // (batch * length)))
                entry = {"batch": batch, "length": length}
                for impl in ("ours", "hf"):
                    entry[impl] = measure(impl, "forward", batch, length, model_dir, args.threads, reps)
                results["forward"].append(entry)
                print(f"forward b={batch} L={length}: {entry}", file=sys.stderr)
        for batch in args.gen_batches:
            entry = {"batch": batch, "new_tokens": args.new_tokens}
            for impl in ("ours", "hf"):
                entry[impl] = measure(impl, "generate", batch, args.new_tokens, model_dir, args.threads, 1)
            entry["tokens_match"] = entry["ours"].pop("tokens", 0) == entry["hf"].pop("tokens", 1)
            results["generate"].append(entry)
            print(f"generate b={batch}: {entry}", file=sys.stderr)
    results["machine"]["load_avg_end"] = os.getloadavg()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nresults: {out}; targets: forward ≥ {TARGETS['forward_speedup']}×, peak memory ≤ "
          f"{TARGETS['memory_ratio']}×, generation ≥ {TARGETS['generate_speedup']}×")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        impl, kind, b, n, d, th, rep = sys.argv[2:9]
        print(json.dumps(child(impl, kind, int(b), int(n), d, int(th), int(rep))))
    else:
        sys.exit(main())
