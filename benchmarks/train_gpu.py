"""Whole-model training step on one GPU (issue 11): ours beside the official mamba_ssm in one run, on the same
random weights: median ms per step (CUDA events), tokens/s and peak memory, for each of our mixer's training paths
(the "keep" tuning of mamba2/layers/triton/mixer.py): fused recomputing y (the default), fused keeping y, fused
keeping y and the SSD's chunk states, per-op.

    python benchmarks/train_gpu.py --out runs/train_gpu                  # 130m 8×2048 and 2×8192, 1.3b 4×2048
    python benchmarks/train_gpu.py --cases 130m:8x2048 --steps 5         # one case, fewer steps
    python benchmarks/train_gpu.py --cases 1.3b:4x2048 --variants fused --profile   # where a step's time goes

A step: forward under bf16 autocast (fp32 parameters), the loss, backward, fused AdamW step, zero_grad; 3 warm-up
steps, then ``--steps`` timed ones. Ours computes its loss with ``Mamba2LM.loss``; the official model computes
cross-entropy over the logits its forward returns (what each library's users run). The official model is mamba_ssm
2.3.2's ``MambaLMHeadModel`` with causal-conv1d present (its fused memory-efficient path), imported from
``.oracle/pkg`` (benchmarks/gpu_util.py) and loaded with our weights; every variant starts from those weights, so
the first step's losses are comparable. Peak = the most memory allocated during the timed steps (weights, gradients
and optimizer state included: the same for both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_util import import_oracle, profile  # noqa: E402
from mamba2 import Mamba2Config, Mamba2LM  # noqa: E402
from mamba2.interop.official import config_to_mamba_ssm  # noqa: E402
from mamba2.layers.triton import mixer as fused_mixer  # noqa: E402

VARIANTS = {"fused": dict(FUSED=True, Y=False, STATES=False), "fused, y kept": dict(FUSED=True, Y=True, STATES=False),
            "fused, y+states kept": dict(FUSED=True, Y=True, STATES=True), "per-op": dict(FUSED=False)}
CASES = ("130m:8x2048", "130m:2x8192", "1.3b:4x2048")


def parse_case(text: str) -> tuple[str, int, int]:
    shape, _, bl = text.partition(":")
    b, _, L = bl.partition("x")
    return shape, int(b), int(L)


def make_step(model, x, y, official: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses = []

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if official:
                logits = model(x).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            else:
                loss = model.loss(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not losses:
            losses.append(float(loss))
    return step, losses, opt


def measure(step, steps: int) -> dict:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def run_case(case: str, steps: int, official_cls, config_cls, variants: list[str], show_profile: bool) -> dict:
    shape, b, L = parse_case(case)
    torch.manual_seed(0)
    cfg = Mamba2Config.preset(shape)
    ours = Mamba2LM(cfg)                               # on the CPU until its turn: the official peak is its own
    init = {k: v.clone() for k, v in ours.state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (b, L + 1), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]
    row = {"case": case, "tokens": b * L}
    runs = [(name, VARIANTS[name]) for name in variants]
    if official_cls is not None:
        runs.insert(0, ("official", None))
    for name, keep in runs:
        if keep is None:
            model = official_cls(config_cls(**config_to_mamba_ssm(cfg)), device="cuda")
            model.load_state_dict(init, strict=True)
        else:                                          # every variant starts from the same weights
            model = ours.to("cuda")
            model.load_state_dict(init)
        step = opt = None
        try:
            with fused_mixer.TUNING.tuned(keep=keep or {}):
                step, losses, opt = make_step(model, x, y, official=keep is None)
                r = measure(step, steps)
                if show_profile:
                    profile(step, f"{case} {name}: one training step", rows=25, calls=3)
            r["first_loss"] = losses[0]
            r["tok_s"] = b * L / (r["ms"] * 1e-3)
        except torch.cuda.OutOfMemoryError as e:
            r = {"error": f"out of memory: {str(e)[:120]}"}
        row[name] = r
        print(json.dumps({"case": case, "variant": name, **r}), flush=True)
        del step, opt
        if keep is None:
            del model
        ours.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    del ours
    torch.cuda.empty_cache()
    return row


def print_table(res: dict) -> None:
    print(f"\nTraining step ({res['device']}, {res['date']}, commit {res['commit']}): median ms / peak GiB; "
          f"speed and memory relative to official")
    names = [n for n in ["official", *VARIANTS] if any(n in r for r in res["rows"])]
    print("| case | " + " | ".join(f"{n} ms / GiB" for n in names) + " | "
          + " | ".join(f"{n} speed, memory" for n in names if n != "official") + " |")
    print("|---" * (1 + len(names) + len(names) - ("official" in names)) + "|")
    for r in res["rows"]:
        cells = [(f"{r[n]['ms']:.1f} / {r[n]['peak_gib']:.1f}" if "ms" in r.get(n, {}) else
                  r.get(n, {}).get("error", "—")) for n in names]
        off = r.get("official", {})
        ratios = []
        for n in names:
            if n == "official":
                continue
            if "ms" in off and "ms" in r.get(n, {}):
                ratios.append(f"{off['ms'] / r[n]['ms']:.2f}×, {r[n]['peak_gib'] / off['peak_gib']:.2f}×")
            else:
                ratios.append("—")
        print(f"| {r['case']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), help="SHAPE:BATCHxLENGTH, e.g. 130m:8x2048")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--no-official", action="store_true")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="our training paths to time (default: all)")
    ap.add_argument("--profile", action="store_true",
                    help="also print the CUDA kernel table of 3 steps of each side (official and each variant)")
    ap.add_argument("--out", default="runs/train_gpu")
    a = ap.parse_args()
    official_cls = config_cls = None
    if not a.no_official:
        official_cls = import_oracle("models.mixer_seq_simple", "MambaLMHeadModel")
        config_cls = import_oracle("models.config_mamba", "MambaConfig")
    import subprocess
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or "?"
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "commit": commit, "steps": a.steps, "rows": []}
    for case in a.cases:
        res["rows"].append(run_case(case, a.steps, official_cls, config_cls, a.variants, a.profile))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_gpu.json").write_text(json.dumps(res, indent=1))
    print_table(res)


if __name__ == "__main__":
    main()
