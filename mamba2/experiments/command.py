"""``mamba2 experiment NAME``: run (a part of) an experiment's grid, then merge every result into its table,
JSON and plot."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mamba2.errors import UserError

EXPERIMENTS = ("mqar",)


def add_experiment_command(sub) -> None:
    x = sub.add_parser("experiment", help="run one of the paper's experiments at small scale (MQAR)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run an experiment's grid of training runs and write its table (NAME.md), merged "
                                   "results (NAME.json) and plot (NAME.png) into --out. Each finished run is kept "
                                   "in NAME.partIofN.jsonl: an interrupted grid continues where it stopped, and "
                                   "parts run on different machines merge when their files share a folder.",
                       epilog="examples:\n  mamba2 experiment mqar --tiny --out runs/mqar-tiny      # about a minute "
                              "on a CPU\n  mamba2 experiment mqar --out runs/mqar --part 1/4 --workers 8   # a "
                              "quarter of the full grid on a GPU\n  mamba2 experiment mqar --out runs/mqar --report"
                              "   # table and plot of what is there")
    x.add_argument("name", choices=EXPERIMENTS, help="mqar: multi-query associative recall (the paper's Fig. 8)")
    x.add_argument("--out", required=True, help="folder of the results, table and plot")
    x.add_argument("--tiny", action="store_true", help="a small grid that runs end to end in about a minute on a CPU")
    x.add_argument("--part", default="1/1", help="run only part i of n of the grid, e.g. 2/4 (default: 1/1)")
    x.add_argument("--workers", type=int, default=1, help="runs trained at once in separate processes (default: 1)")
    x.add_argument("--steps", type=int, help="training steps per run instead of the setting's")
    x.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    x.add_argument("--report", action="store_true", help="only merge the results in --out into table, JSON and plot")
    x.set_defaults(func=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    import torch

    from mamba2.experiments import grid, mqar

    out = Path(args.out)
    if not args.report:
        part = grid.parse_part(args.part)
        if args.workers < 1:
            raise UserError(f"--workers must be ≥ 1, got {args.workers}")
        setting = mqar.TINY if args.tiny else mqar.FULL
        if args.steps is not None:
            if args.steps < 1:
                raise UserError(f"--steps must be ≥ 1, got {args.steps}")
            setting = dataclasses.replace(setting, steps=args.steps)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.device(device)
        except RuntimeError as e:
            raise UserError(f"bad --device {device!r}: {e}") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine")
        runs = mqar.runs(setting, device)
        print(f"{args.name}: {len(runs)} runs in the grid ({len(setting.models)} models x {len(setting.widths)} "
              f"widths x {len(setting.lengths)} lengths x {len(setting.lrs)} learning rates, {setting.steps} steps "
              f"of {setting.batch_size} examples each); this is part {part[0]} of {part[1]}, on {device}")
        grid.run_grid(mqar.NAME, runs, mqar.train_one, out, part=part, workers=args.workers,
                      extra=grid.provenance(device),
                      describe=lambda r: f"{r['key']}: accuracy {r['accuracy']:.3f}")
    print(mqar.report(out))
    print(f"table {out / 'mqar.md'}, results {out / 'mqar.json'}, plot {out / 'mqar.png'}")
    return 0
