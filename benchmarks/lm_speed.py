"""Training tokens/s of the language-model experiment's models, each alone on the device (docs/experiments.md §2).

    python benchmarks/lm_speed.py --out runs/lm_speed.json                  # every architecture at 5M, 15M, 40M
    python benchmarks/lm_speed.py --sizes 5M --archs mamba2,hybrid --steps 20
    python benchmarks/lm_speed.py --tiny --out /tmp/lm_speed.json           # the --tiny grid's models (CPU, seconds)

`mamba2 experiment lm` records each run's tokens/s, but when its runs share the device (``--workers``) that rate is a
share. This script gives the rates alone, for the same models (:func:`mamba2.experiments.lm.model_config`), batch,
sequence length, data and training step (:meth:`mamba2.training.Trainer.train_step`: forward, loss, backward, clip,
AdamW), at the sweep's smallest learning rate (the rate does not change the work): ``--warmup`` steps first (kernel
compilation, caches), then ``--steps`` timed steps, each by wall clock (a step returns its loss as a float, so it
has finished on the device). Prints a table (median ms per step, tokens/s, and the spread as max/min of the step
times) and writes JSON with date, device, torch and commit, rewritten after every row (``"complete"`` says whether
every chosen model was timed: a stopped run keeps its rows).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.script_args import check_output_file, write_json  # noqa: E402
from mamba2.experiments import grid, lm  # noqa: E402


def time_steps(arch: str, size: tuple[str, int, int], setting: lm.Setting, device: str, warmup: int,
               steps: int) -> dict:
    """One model's training steps: the median and spread of their wall-clock times and the tokens/s."""
    from mamba2.models import Mamba2LM
    from mamba2.train_config import TrainConfig
    from mamba2.training import Trainer

    name, d_model, n_layer = size
    tokenizer, train, val = lm._corpus()
    torch.manual_seed(0)
    config = lm.model_config(arch, d_model, n_layer, setting)
    model = Mamba2LM(config)
    cfg = TrainConfig(steps=warmup + steps, batch_size=setting.batch_size, seq_len=setting.seq_len,
                      lr=min(setting.lrs), warmup=1, eval_every=0, eval_tokens=setting.eval_tokens, keep_best=False)
    trainer = Trainer(model, config, tokenizer, train, val, cfg, device=device, progress=False, log=lambda msg: None)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    tokens = setting.batch_size * setting.seq_len
    return {"arch": arch, "size": name, "d_model": d_model, "n_layer": config.n_layer,
            "parameters_non_embedding": model.num_parameters(exclude_embedding=True), "tokens_per_step": tokens,
            "ms_per_step": median * 1e3, "tokens_per_s": round(tokens / median), "spread": max(times) / min(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/lm_speed.json"), help="the JSON report")
    ap.add_argument("--tiny", action="store_true", help="the --tiny grid's models and batch")
    ap.add_argument("--sizes", help="comma-separated sizes of the setting (default: all)")
    ap.add_argument("--archs", help=f"comma-separated architectures (default: {','.join(lm.ARCHS)})")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per model (default: 30)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (default: 5)")
    ap.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    args = ap.parse_args()
    setting = lm.TINY if args.tiny else lm.FULL
    sizes = {s[0]: s for s in setting.sizes}
    chosen = list(sizes) if args.sizes is None else [s.strip() for s in args.sizes.split(",") if s.strip()]
    archs = list(lm.ARCHS) if args.archs is None else [a.strip() for a in args.archs.split(",") if a.strip()]
    if not chosen or any(s not in sizes for s in chosen):
        ap.error(f"--sizes must name sizes of the setting ({', '.join(sizes)}), got {args.sizes!r}")
    if not archs or any(a not in lm.ARCHS for a in archs):
        ap.error(f"--archs must name architectures of {', '.join(lm.ARCHS)}, got {args.archs!r}")
    if args.steps < 2 or args.warmup < 0:
        ap.error(f"--steps must be ≥ 2 and --warmup ≥ 0, got {args.steps} and {args.warmup}")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)      # the default runs/ of a fresh clone, as other scripts
    except OSError as e:
        ap.error(f"--out {args.out}: cannot make its folder ({e.strerror})")
    check_output_file(ap, "--out", args.out)
    from mamba2.devices import resolve_device
    from mamba2.errors import UserError

    try:
        device = str(resolve_device(args.device))
    except UserError as e:
        ap.error(" ".join(str(e).split()))
    rows = []
    header = {**grid.provenance(device), "setting": "tiny" if args.tiny else "full", "warmup": args.warmup,
              "steps": args.steps}
    print(f"{'arch':14s} {'size':6s} {'params':>8s} {'ms/step':>9s} {'tokens/s':>11s} {'max/min':>8s}", flush=True)
    for size in chosen:
        for arch in archs:
            r = time_steps(arch, sizes[size], setting, device, args.warmup, args.steps)
            rows.append(r)
            # after every row, whole: a run stopped by a signal keeps the rows timed before it
            why = write_json(args.out, {**header, "complete": len(rows) == len(chosen) * len(archs), "rows": rows})
            if why:
                sys.exit(f"cannot write {args.out}: {why}")
            print(f"{arch:14s} {size:6s} {r['parameters_non_embedding'] / 1e6:7.2f}M {r['ms_per_step']:9.2f} "
                  f"{r['tokens_per_s']:11,} {r['spread']:8.2f}", flush=True)
    print(f"results {args.out}")


if __name__ == "__main__":
    main()
