"""Generation speed on a GPU, ours beside the official mamba_ssm in one run, on the same random weights.

For each model shape and batch size: a prompt of ``--prompt`` random tokens per row, greedy, ``--new`` new tokens.
Both sides are timed the same way (wall clock around a whole generate call, synchronised, median of ``--reps``
after a warm-up call that also captures the CUDA graphs): ``total(N)`` for N new tokens and ``total(1)``; then
time to first token (TTFT) = total(1) and time per output token (TPOT) = (total(N) − total(1)) / (N − 1);
tokens/s = batch / TPOT. Ours: :func:`mamba2.generation.generate` (the serving engine, CUDA graphs). Official:
``MambaLMHeadModel.generate(cg=True, top_k=1)`` (its CUDA-graph decode). ``match`` is the mean length of the
common prefix of the two sides' greedy tokens over the rows (bf16 near-ties make them part eventually).

Also the prefill alone (one forward over 1 × ``--prefill`` tokens, logits of the last position), and, with
``--profile``, the CUDA kernel table of our decode step.

    python benchmarks/generation_gpu.py --shapes 130m 2.7b --batch 1 16 64 256 --out $OUT/generation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_util import import_oracle, profile  # noqa: E402

import mamba2  # noqa: E402
from mamba2 import Mamba2Config, Mamba2LM  # noqa: E402
from mamba2.generation import generate  # noqa: E402
from mamba2.interop.official import config_to_mamba_ssm  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median wall seconds of fn() over reps calls (synchronised), after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(shape: str, official_cls, config_cls):
    """Our model and (if available) the official one with the same bf16 weights."""
    torch.manual_seed(0)
    cfg = Mamba2Config.preset(shape)
    ours = Mamba2LM(cfg).to("cuda", torch.bfloat16).eval()
    off = None
    if official_cls is not None:
        off = official_cls(config_cls(**config_to_mamba_ssm(cfg)), device="cuda", dtype=torch.bfloat16).eval()
        missing = off.load_state_dict(ours.state_dict(), strict=True)
        assert not missing.missing_keys and not missing.unexpected_keys, missing
    return cfg, ours, off


def side(gen, batch: int, new: int, reps: int) -> dict:
    t_n = timed(lambda: gen(new), reps)
    t_1 = timed(lambda: gen(1), reps)
    tpot = (t_n - t_1) / (new - 1)
    return {"ttft_ms": t_1 * 1e3, "tpot_ms": tpot * 1e3, "tok_s": batch / tpot, "total_ms": t_n * 1e3}


def common_prefix(x: list[int], y: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["130m"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    official_cls = config_cls = None
    if not a.no_official:
        official_cls = import_oracle("models.mixer_seq_simple", "MambaLMHeadModel")
        config_cls = import_oracle("models.config_mamba", "MambaConfig")
        if config_cls is None:
            official_cls = None
    rows = []
    for shape in a.shapes:
        cfg, ours, off = build(shape, official_cls, config_cls)
        V = cfg.vocab_size
        for b in a.batch:
            ids = torch.randint(0, V, (b, a.prompt), device="cuda")
            prompts = ids.tolist()
            row = {"shape": shape, "batch": b, "prompt": a.prompt, "new": a.new}
            try:
                row["ours"] = side(lambda n: generate(ours, prompts, n, temperature=0), b, a.new, a.reps)
                mine = generate(ours, prompts, a.new, temperature=0)
            except torch.cuda.OutOfMemoryError as e:
                row["ours"] = {"error": f"out of memory: {e}"}
                mine = None
            if off is not None:
                try:
                    row["official"] = side(lambda n: off.generate(ids, max_length=a.prompt + n, cg=True, top_k=1),
                                           b, a.new, a.reps)
                    theirs = off.generate(ids, max_length=a.prompt + a.new, cg=True, top_k=1)[:, a.prompt:].tolist()
                    if mine is not None:
                        row["match"] = statistics.mean(common_prefix(x, y) for x, y in zip(mine, theirs))
                except torch.cuda.OutOfMemoryError as e:
                    row["official"] = {"error": f"out of memory: {e}"}
                if "tok_s" in row.get("ours", {}) and "tok_s" in row.get("official", {}):
                    row["speedup"] = row["ours"]["tok_s"] / row["official"]["tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
        x = torch.randint(0, V, (1, a.prefill), device="cuda")
        with torch.inference_mode():
            pre = {"shape": shape, "prefill": a.prefill,
                   "ours_ms": 1e3 * timed(lambda: ours(x, logits_to_keep=1, check_ids=False), a.reps + 5)}
            if off is not None:
                pre["official_ms"] = 1e3 * timed(lambda: off(x, num_last_tokens=1), a.reps + 5)
                pre["speedup"] = pre["official_ms"] / pre["ours_ms"]
        rows.append(pre)
        print(json.dumps(pre), flush=True)
        if a.profile:
            from mamba2.generation import _engine
            eng = _engine(ours, a.batch[0], a.prompt + a.new, None, None)
            slots = torch.arange(a.batch[0])
            with torch.inference_mode():
                profile(lambda: eng.graphs.run(slots, greedy_only=True, penalty=False),
                        f"{shape} decode step batch {a.batch[0]} (graph replay)", rows=30, calls=10)
        del ours, off
        torch.cuda.empty_cache()
    print(f"\ngeneration, bf16 weights, fp32 state, greedy, prompt {a.prompt}, {a.new} new tokens, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'shape':>6} {'batch':>5} | {'ours tok/s':>10} {'TPOT ms':>8} {'TTFT ms':>8} | "
          f"{'official tok/s':>14} {'TPOT ms':>8} {'TTFT ms':>8} | {'ratio':>6} {'match':>6}")
    for r in rows:
        if "batch" not in r:
            continue
        o, f = r.get("ours", {}), r.get("official", {})
        fmt = lambda d, k, w, p: f"{d[k]:>{w}.{p}f}" if k in d else f"{'-':>{w}}"
        print(f"{r['shape']:>6} {r['batch']:>5} | {fmt(o, 'tok_s', 10, 0)} {fmt(o, 'tpot_ms', 8, 3)} "
              f"{fmt(o, 'ttft_ms', 8, 2)} | {fmt(f, 'tok_s', 14, 0)} {fmt(f, 'tpot_ms', 8, 3)} "
              f"{fmt(f, 'ttft_ms', 8, 2)} | {fmt(r, 'speedup', 6, 2)} {fmt(r, 'match', 6, 1)}")
    for r in rows:
        if "prefill" in r:
            print(f"prefill {r['shape']} 1 x {r['prefill']}: ours {r['ours_ms']:.2f} ms"
                  + (f", official {r['official_ms']:.2f} ms, ratio {r['speedup']:.2f}" if "official_ms" in r else ""))
    if a.out:
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "package": mamba2.__file__,
                "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a), "rows": rows}
        Path(a.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
