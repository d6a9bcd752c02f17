"""``mamba2 experiment NAME``: run (a part of) an experiment's grid, then merge every result into its table,
JSON and plot."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import sys
from pathlib import Path
from typing import Sequence

from mamba2.errors import UserError
from mamba2.fsutil import Busy

EXPERIMENTS = {"mqar": "multi-query associative recall (the paper's Fig. 8)",
               "lm": "matched-size language models: Mamba-2, Transformer++, Mamba-1, hybrid (Fig. 9 / Table 3)",
               "speed": "time of SSD, the Mamba-1 scan and attention against length and state size (Fig. 10)"}


def add_experiment_command(sub) -> None:
    x = sub.add_parser("experiment", help="run one of the paper's experiments at small scale (mqar, lm, speed)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run an experiment's grid of training runs and write its table (NAME.md), merged "
                                   "results (NAME.json) and plot (NAME.png) into --out. Each finished run is kept "
                                   "in NAME.partIofN.jsonl: an interrupted grid continues where it stopped, and "
                                   "parts run on different machines merge when their files share a folder. A folder "
                                   "holds one setting (--tiny, --steps): results of another are refused.\n\n" +
                                   "\n".join(f"  {k}: {v}" for k, v in EXPERIMENTS.items()),
                       epilog="examples:\n  mamba2 experiment mqar --tiny --out runs/mqar-tiny      # under a minute "
                              "on a CPU\n  mamba2 experiment mqar --out runs/mqar --part 1/4        # a quarter of "
                              "the full grid (a GPU)\n  mamba2 experiment mqar --out runs/mqar --report           "
                              "# table and plot of what is there")
    x.add_argument("name", choices=list(EXPERIMENTS), help="which experiment")
    x.add_argument("--out", required=True, help="folder of the results, table and plot")
    x.add_argument("--tiny", action="store_true", help="a small grid that runs end to end in about a minute on a CPU")
    x.add_argument("--part", default="1/1", help="run only part i of n of the grid, e.g. 2/4 (default: 1/1; a value "
                   "starting with '-' goes after '=': --part=VALUE)")
    x.add_argument("--workers", type=int, default=1, help="runs trained at once in separate processes (default: 1)")
    x.add_argument("--keep-going", action="store_true",
                   help="a run that fails is left out (traceback in NAME.failures.log) and the others go on, each "
                        "failed run's worker process replaced; the next call retries the failed runs")
    x.add_argument("--steps", type=int, help="training steps per run instead of the setting's")
    x.add_argument("--only", metavar="PATTERNS",
                   help="run only the runs whose key matches one of these comma-separated glob patterns (keys as in "
                        "the results: mqar 'MODEL/wWIDTH/TLENGTH/lrLR', lm 'ARCH/SIZE/lrLR', speed "
                        "'SWEEP/OP/PASS/LL/NN'), e.g. 'mamba1-*' or '*/T256/*'; the table counts the whole grid")
    x.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    x.add_argument("--report", action="store_true", help="only merge the results in --out into table, JSON and plot")
    x.set_defaults(func=cmd_experiment)


def _matches(key: str, only: str | None) -> bool:
    """Whether ``key`` matches one of ``only``'s comma-separated glob patterns (every key when None)."""
    return only is None or any(fnmatch.fnmatchcase(key, p.strip()) for p in only.split(",") if p.strip())


def _select(runs: list[dict], only: str | None, strict: bool = True, waiting: Sequence[str] = ()) -> list[dict]:
    """The runs whose key matches one of ``only``'s comma-separated glob patterns (all of them when None);
    ``waiting``: the keys of the grid's runs that wait on others (named in the error).

    Raises:
        UserError: no pattern in ``only``, or (``strict``) no run matches (naming a few keys).
    """
    from mamba2.experiments.grid import plural

    if only is None:
        return runs
    if not any(p.strip() for p in only.split(",")):
        raise UserError("--only is empty: give glob patterns of run keys, e.g. 'mamba1-*' or '*/T256/*'")
    chosen = [r for r in runs if _matches(r["key"], only)]
    if strict and runs and not chosen:
        examples = ", ".join(r["key"] for r in runs[:3])
        later = [k for k in waiting if _matches(k, only)]
        later = (f"; {plural(len(later), 'run')} it matches become{'s' if len(later) == 1 else ''} runnable once "
                 f"the learning-rate sweep is done: run it first" if later else "")
        raise UserError(f"--only {only!r} matches none of the grid's {plural(len(runs), 'runnable run')} (keys like "
                        f"{examples}){later}")
    return chosen


def cmd_experiment(args: argparse.Namespace) -> int:
    """``mamba2 experiment``: SIGTERM arrives as Ctrl-C does (:func:`mamba2.cli.main`), so a stop during the grid
    writes the table of the runs kept, and one while the report is written is acted on once it is written whole
    (:func:`grid.write_report`). A process refused because another runs the same part writes nothing."""
    from mamba2.experiments import grid

    experiment = importlib.import_module(f"mamba2.experiments.{args.name}")
    if not args.out.strip():
        raise UserError("--out is empty: name the folder of the results")
    out = Path(args.out)
    for folder in (out, *out.parents):        # the folder, or one it would be made in, taken by a file
        if folder.exists() and not folder.is_dir():
            where = f"--out {args.out}" if folder == out else f"--out {args.out}: {folder}"
            raise UserError(f"{where} is a file, not a folder")
    if args.report:
        given = {"--tiny": args.tiny, "--part": args.part != "1/1", "--workers": args.workers != 1,
                 "--steps": args.steps is not None, "--only": args.only is not None,
                 "--device": args.device is not None, "--keep-going": args.keep_going}
        given = [flag for flag, on in given.items() if on]
        if given:
            one = len(given) == 1
            raise UserError(f"--report only merges the results already in --out; {', '.join(given)} "
                            f"{'chooses' if one else 'choose'} runs to train: leave {'it' if one else 'them'} out")
    else:
        part = grid.parse_part(args.part)
        if experiment.TIMED and args.workers != 1:
            raise UserError(f"{args.name} times each op with the device to itself: it runs without --workers")
        if args.workers < 1:
            raise UserError(f"--workers must be ≥ 1, got {args.workers}")
        cpus = grid.usable_cpus()
        if args.workers > cpus:           # on a GPU more may pay (they wait on the device); on the CPU they queue
            print(f"warning: --workers {args.workers} is more than the {grid.plural(cpus, 'CPU')} this process may "
                  f"use: each worker is a process with its own torch, and they will share them", file=sys.stderr)
        setting = experiment.TINY if args.tiny else experiment.FULL
        if args.steps is not None:
            if not hasattr(setting, "steps"):
                raise UserError(f"--steps sets the training steps of mqar and lm; {args.name} trains nothing")
            if args.steps < 1:
                raise UserError(f"--steps must be ≥ 1, got {args.steps}")
            setting = dataclasses.replace(setting, steps=args.steps)
        done = grid.merged(out, experiment.NAME, experiment.FIELDS)
        grid.check_setting(out, done, dataclasses.asdict(setting))
        from mamba2.devices import resolve_device     # torch: only once a command runs, not for --help

        device = str(resolve_device(args.device))
        extra = {**grid.provenance(device), "workers": args.workers}    # runs sharing the device: their speed is not alone
        if experiment.TIMED:
            grid.one_device(out, args.name, done, extra["device"])
        runs, waiting = experiment.runs(setting, device, done)
        total = len(runs) + len(waiting)
        chosen = _select(runs, args.only, waiting=waiting)
        waiting = [k for k in waiting if _matches(k, args.only)]
        if part[0] > len(chosen) + len(waiting):
            n = len(chosen) + len(waiting)
            raise UserError(f"--part {args.part}: the grid has {grid.plural(n, 'run')}, so part {part[0]} of "
                            f"{part[1]} would be empty; split it into at most {grid.plural(n, 'part')}")
        steps = f", {grid.plural(setting.steps, 'training step')} each" if hasattr(setting, "steps") else ""
        only = (f", {len(chosen) + len(waiting)} of them chosen by --only" if args.only is not None else "")
        wait = "waits" if len(waiting) == 1 else "wait"
        later = f" ({len(waiting)} {wait} for the learning-rate sweep)" if waiting else ""
        print(f"{args.name}: {grid.plural(total, 'run')} in the grid{steps}{only}{later}; this is part {part[0]} of "
              f"{part[1]}, on {device}")
        runs = chosen
        try:
            first, failed = True, []
            while True:     # runs that wait on others (the lm sweep) become runnable as those finish
                try:
                    new = grid.run_grid(experiment.NAME, runs, experiment.train_one, out, part=part,
                                        workers=args.workers, extra=extra, describe=experiment.describe,
                                        announce_done=first, keep_going=args.keep_going, fields=experiment.FIELDS)
                except grid.RunsFailed as e:    # --keep-going: the runs waiting on the others still go on
                    failed.append(e)
                    new = e.records
                if not (waiting and new):
                    break
                done = grid.merged(out, experiment.NAME, experiment.FIELDS)
                runs, waiting = experiment.runs(setting, device, done)
                runs = _select(runs, args.only, strict=False)   # run_grid takes this part's share, then skips done
                runs = [r for r in runs if all(r["key"] not in e.failures for e in failed)]   # once per call
                waiting = [k for k in waiting if _matches(k, args.only)]
                first = False
            if failed:
                raise grid.RunsFailed([k for e in failed for k in e.failures], failed[0].log, failed[0].path,
                                      [r for e in failed for r in e.records])
        except Busy:              # another process runs this part: its report is its own
            raise
        except (KeyboardInterrupt, UserError, RuntimeError):   # stopped, a worker died, a run failed: the runs kept
            with grid.stops_deferred():                           # still get their table and plot, whole
                if grid.merged(out, experiment.NAME, experiment.FIELDS):
                    try:
                        experiment.report(out)
                        print(f"\ntable of the runs kept so far: {out / (experiment.NAME + '.md')}")
                    except UserError as e:        # e.g. a full disk: the error that stopped the grid comes first
                        print(f"warning: no table of the runs kept: {' '.join(str(e).split())}", file=sys.stderr)
            raise
        if waiting:
            wait = "waits" if len(waiting) == 1 else "wait"
            print(f"{grid.plural(len(waiting), 'run')} {wait} for results of other parts (the learning-rate sweep): "
                  f"run this part again once those are in {out}")
    with grid.stops_deferred():           # a stop now (the runs are done) comes after the report, not instead of it
        text = experiment.report(out)
    print(text)
    print(f"table {out / (experiment.NAME + '.md')}, results {out / (experiment.NAME + '.json')}, "
          f"plot {out / (experiment.NAME + '.png')}")
    return 0
