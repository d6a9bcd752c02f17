"""The paper's experiments: the MQAR generator's definition, accuracy, and the grid end to end (tiny setting)."""

import dataclasses
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env, require_working_interpreter
from mamba2.cli import main
from mamba2.experiments import grid
from mamba2.fsutil import Busy
from mamba2.experiments.mqar import IGNORE, accuracy, curriculum, mqar_batch

REPO = Path(__file__).resolve().parents[1]


def test_mqar_examples_follow_the_definition():
    T, K, V = 128, 16, 256
    x, y = mqar_batch(64, T, K, vocab_size=V, seed=3)
    assert x.shape == y.shape == (64, T) and x.dtype == y.dtype == torch.int64
    for inputs, targets in zip(x, y):
        keys, values = inputs[0:2 * K:2], inputs[1:2 * K:2]
        assert len(set(keys.tolist())) == K and len(set(values.tolist())) == K
        assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool(((values >= V // 2) & (values < V)).all())
        where = (targets != IGNORE).nonzero().flatten()
        assert len(where) == K                                     # each key queried exactly once
        assert bool((where >= 2 * K).all()) and bool(((where - 2 * K) % 2 == 0).all())   # after every pair
        pair = dict(zip(keys.tolist(), values.tolist()))
        queried = inputs[where].tolist()
        assert sorted(queried) == sorted(keys.tolist())
        assert [pair[k] for k in queried] == targets[where].tolist()
        assert bool((inputs >= 0).all()) and bool((inputs < V).all())


def test_mqar_is_deterministic_per_seed_and_its_gaps_follow_the_power_law():
    a, b = mqar_batch(8, 64, 8, vocab_size=128, seed=1), mqar_batch(8, 64, 8, vocab_size=128, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], mqar_batch(8, 64, 8, vocab_size=128, seed=2)[0])
    T, K = 1024, 8                         # 504 query slots for 8 queries: where they land shows the law
    _, y = mqar_batch(256, T, K, vocab_size=8192, seed=0)
    slots = ((y != IGNORE).nonzero()[:, 1] - 2 * K) // 2
    assert slots.float().median() < (T - 2 * K) // 2 / 8       # uniform would put the median near 252
    # the paper's harder setting: K = T/4 fills every slot
    _, y = mqar_batch(4, 64, 16, vocab_size=8192, seed=0)
    assert int((y != IGNORE).sum()) == 4 * 16


def test_mqar_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="4 \\* num_kv_pairs <= seq_len"):
        mqar_batch(1, 60, 16)
    with pytest.raises(ValueError, match="distinct keys"):
        mqar_batch(1, 1024, 40, vocab_size=64)
    assert curriculum(256) == [(64, 16), (128, 32), (256, 64)]


def test_accuracy_counts_exact_matches_at_labelled_positions_only():
    x, y = mqar_batch(16, 64, 8, vocab_size=128, seed=0)

    class Oracle(torch.nn.Module):
        """Looks each query's value up in the prefix; elsewhere predicts token 0."""
        def forward(self, ids):
            logits = torch.zeros(*ids.shape, 128)
            for i, row in enumerate(ids):
                pair = dict(zip(row[0:16:2].tolist(), row[1:16:2].tolist()))
                for t in range(16, 64, 2):
                    if int(row[t]) in pair:
                        logits[i, t, pair[int(row[t])]] = 1.0
            return logits

    class Constant(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, 128)

    assert accuracy(Oracle(), x, y, batch=5) == 1.0
    assert accuracy(Constant(), x, y) == 0.0


def test_mqar_grid_runs_in_parts_continues_and_merges(tmp_path, capsys):
    """The tiny grid end to end: two parts into one folder (the first part's table says it is incomplete), a part
    run again skips its finished runs, the merged table has every cell, the JSON every run with where it ran, and the
    plot is written."""
    out = tmp_path / "mqar"
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--part", "1/2", "--steps", "3"]) == 0
    assert "**Incomplete: 6 of 12 runs.**" in capsys.readouterr().out
    assert (out / "mqar.md").read_text().startswith("**Incomplete: 6 of 12 runs.**\n\n**T = 32")
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--part", "2/2", "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "12 runs in the grid" in text and "| mamba1-N16 |" in text and "| attention |" in text
    assert "Incomplete" not in text
    records = json.loads((out / "mqar.json").read_text())
    assert len(records) == 12 and len({r["key"] for r in records}) == 12
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["device"] and r["date"] for r in records)
    table = (out / "mqar.md").read_text()
    assert table.startswith("**T = 32") and table.count("| mamba2-N16 |") == 1 and "–" not in table
    assert (out / "mqar.png").stat().st_size > 10_000
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--part", "1/2", "--steps", "3"]) == 0
    said = "".join(capsys.readouterr())
    assert "6 runs of this part are done already" in said and " 0run " not in said   # no empty progress bar
    assert len(grid.merged(out, "mqar")) == 12
    assert main(["experiment", "mqar", "--out", str(tmp_path / "empty"), "--report"]) == 2
    assert "no MQAR results" in capsys.readouterr().err
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--part", "3/2"]) == 2
    assert main(["experiment", "mqar", "--tiny", "--out", " "]) == 2
    assert "--out is empty" in capsys.readouterr().err


def test_a_folder_holds_the_results_of_one_setting(tmp_path, capsys):
    """Another --steps or --tiny into a folder of results is refused before it runs (naming the folder and the
    fields with both values); a folder that mixes settings anyway (parts run by hand) is refused by --report."""
    out = tmp_path / "mqar"
    tiny = ["experiment", "mqar", "--tiny", "--out", str(out)]
    assert main(tiny + ["--part", "1/2", "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(tiny + ["--part", "2/2", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds results of another setting" in err and "steps 2 vs 3" in err and "another --out" in err
    assert main(["experiment", "mqar", "--out", str(out), "--part", "2/2", "--steps", "2"]) == 2   # the full grid
    err = capsys.readouterr().err
    assert "widths [16, 32] vs [32, 64, 128, 256]" in err and "vocab_size 64 vs 8192" in err and "steps" not in err
    assert not (out / "mqar.part2of2.jsonl").exists()
    assert main(tiny + ["--part", "2/2", "--steps", "2"]) == 0          # the same setting: the parts merge
    assert len(grid.merged(out, "mqar")) == 12
    first = json.loads((out / "mqar.part1of2.jsonl").read_text().splitlines()[0])
    with open(out / "mqar.part2of2.jsonl", "a") as f:
        f.write(json.dumps({**first, "setting": {**first["setting"], "steps": 5}}) + "\n")
    capsys.readouterr()
    assert main(["experiment", "mqar", "--out", str(out), "--report"]) == 2
    err = capsys.readouterr().err
    assert (f"{out} mixes results of different settings (mqar.part1of2.jsonl vs mqar.part2of2.jsonl: steps 2 vs 5)"
            in err)
    assert main(tiny + ["--part", "1/2", "--steps", "2"]) == 2
    assert "mixes results of different settings" in capsys.readouterr().err


def test_only_runs_the_runs_whose_keys_match(tmp_path, capsys):
    from mamba2.cli import main

    out = tmp_path / "mqar"
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2", "--only",
                 "mamba1-*, */w16/*/lr0.01"]) == 0
    keys = {json.loads(line)["key"] for f in out.glob("mqar.part*.jsonl") for line in f.read_text().splitlines()}
    assert keys and all(k.startswith("mamba1-") or ("/w16/" in k and k.endswith("/lr0.01")) for k in keys), keys
    assert {k for k in keys if not k.startswith("mamba1-")} == {"mamba2-N16/w16/T32/lr0.01",
                                                                 "attention/w16/T32/lr0.01"}
    text = capsys.readouterr().out
    assert f"{len(keys)} of them chosen by --only" in text and f"Incomplete: {len(keys)} of 12 runs" in text
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2", "--only", "transformer*"]) == 2
    assert "matches none of the grid's 12 runnable runs" in capsys.readouterr().err
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2", "--only", " , "]) == 2
    assert "--only is empty" in capsys.readouterr().err


def test_mqar_grid_with_worker_processes(tmp_path):
    """--workers 2: the runs are trained in two spawned processes and all come back into the results file."""
    out = tmp_path / "mqar"
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2", "--workers", "2"]) == 0
    assert len(grid.merged(out, "mqar")) == 12


def test_lm_grid_sweeps_the_small_size_then_trains_the_larger_at_the_scaled_best_rate(tmp_path, capsys):
    """The tiny LM grid: every architecture at matched settings, the sweep's best rate scaled by width for the
    larger size, non-embedding parameter counts, curves of held-out loss against tokens, table and plot."""
    from mamba2.experiments import lm

    out = tmp_path / "lm"
    assert main(["experiment", "lm", "--tiny", "--out", str(out), "--steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "12 runs in the grid" in text and "| hybrid |" in text and "Learning-rate sweep" in text
    records = {r["key"]: r for r in json.loads((out / "lm.json").read_text())}
    assert len(records) == 12
    for arch in lm.ARCHS:
        sweep = [records[f"{arch}/tiny/lr{lr:g}"] for lr in lm.TINY.lrs]
        best = min(sweep, key=lambda r: r["eval_loss"])
        scaled = [r for r in records.values() if r["arch"] == arch and r["size"] == "tiny2"]
        assert len(scaled) == 1 and scaled[0]["lr"] == pytest.approx(best["lr"] * 32 / 48)
        lr = f"{scaled[0]['lr']:g}"            # the table writes the rate as the run's key does
        assert scaled[0]["key"].endswith(f"/lr{lr}") and f"; lr {lr}; " in text
        assert scaled[0]["parameters_non_embedding"] > best["parameters_non_embedding"] > 0
        assert all(r["tokens"] == 2 * 4 * 64 and len(r["curve"]) == 2 for r in sweep)
        edge = "top" if best["lr"] == max(lm.TINY.lrs) else "bottom"       # two rates: the best is at an edge
        assert f"lr {best['lr']:g}; {edge} of the sweep; " in text and f"lr {lr}; {edge}" not in text
    assert "is at an edge of the sweep" in text
    configs = {a: lm.model_config(a, 32, 2, lm.TINY) for a in lm.ARCHS}
    assert configs["transformer++"].layout == ("attention+mlp",) and configs["mamba1"].d_state == 16
    assert "attention" in configs["hybrid"].layout and (out / "lm.png").stat().st_size > 10_000
    assert "Incomplete" not in text
    # the first 3 runs: mamba2's sweep is done (its larger size is missing), the other 3 larger sizes wait on theirs
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (out / "lm.part1of1.jsonl").read_text().splitlines()
    (partial / "lm.part1of1.jsonl").write_text("\n".join(lines[:3]) + "\n")
    assert lm.report(partial).startswith("**Incomplete: 3 of 12 runs.**\n\nHeld-out loss")
    # runs that shared the device (--workers): their tokens/s is a share, and the table says so
    assert all(r["workers"] == 1 for r in records.values()) and "sharing the device" not in text
    shared = [json.loads(line) | {"workers": 3} for line in lines]
    (partial / "lm.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shared))
    text_shared = lm.report(partial)
    assert "with up to 3 runs sharing the device at once" in text_shared and " tok/s shared)" in text_shared
    assert " tok/s shared)" not in text
    # a sweep cut short says so in its cell; a larger size whose rate came from a sweep result since replaced is
    # left out (its planned run, at the new best rate, is missing)
    first = [json.loads(line) for line in lines[:3]]           # mamba2 at both rates, transformer++ at one
    (partial / "lm.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    assert f"lr {first[2]['lr']:g}; 1 of 2 rates; " in lm.report(partial)
    best = min(first[:2], key=lambda r: r["eval_loss"])
    stale = [json.loads(line) for line in lines]
    for r in stale:
        if r["key"] == best["key"]:
            r["eval_loss"] = None                                  # now diverged: the other rate is the best
    (partial / "lm.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    capsys.readouterr()
    text = lm.report(partial)
    scaled = next(r["key"] for r in stale if r["arch"] == "mamba2" and r["size"] == "tiny2")
    assert f"1 result of no run this grid plans left out of the table ({scaled})" in capsys.readouterr().err
    assert text.startswith("**Incomplete: 11 of 12 runs.**") and scaled not in (partial / "lm.json").read_text()
    # a larger size whose sweep is not all in this folder (one part's file copied alone) waits for it
    early = [json.loads(line) for line in lines[:3]] + [json.loads(line) for line in lines
                                                       if json.loads(line)["key"].startswith("transformer++/tiny2/")]
    (partial / "lm.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in early))
    lm.report(partial)
    assert (f"1 result of no run this grid plans left out of the table ({early[3]['key']}): they wait for their "
            "architecture's learning-rate sweep, which is not complete in this folder") in capsys.readouterr().err


def legend(ax) -> dict[str, str]:
    """A legend's labels → the line style of their handles."""
    return {text.get_text(): handle.get_linestyle()
            for text, handle in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_lm_plot_legend_names_the_colours_and_the_line_styles():
    """A colour per architecture, a line style per size: the legend has an entry for each."""
    from mamba2.experiments import lm

    curve = [(100, 2.0), (200, 1.5)]
    best = {(a, s): {"curve": curve, "eval_loss": 1.5} for a in lm.ARCHS for s in ("tiny", "tiny2")}
    fig = lm._plot(best, list(lm.ARCHS), ["tiny", "tiny2"])
    ax = fig.axes[0]
    styles = legend(ax)
    assert list(styles) == [*lm.ARCHS, "size tiny", "size tiny2"]
    assert {styles[a] for a in lm.ARCHS} == {"None"} and styles["size tiny"] != styles["size tiny2"]
    assert {line.get_linestyle() for line in ax.get_lines()} == {styles["size tiny"], styles["size tiny2"]}
    close(fig)


def test_speed_curves_time_every_op_and_pass_on_both_sweeps(tmp_path, capsys):
    from mamba2.experiments import speed

    out = tmp_path / "speed"
    assert main(["experiment", "speed", "--tiny", "--out", str(out)]) == 0
    records = json.loads((out / "speed.json").read_text())
    # 2 lengths x 3 ops x 2 passes, then 2 state sizes x 2 ops x 2 passes + attention's one point per pass
    assert len(records) == 12 + 10 and all(r["ms"] > 0 and r["error"] is None for r in records)
    assert all(r["ms_min"] <= r["ms"] <= r["ms_max"] for r in records)
    table = (out / "speed.md").read_text()
    assert "against sequence length" in table and "against state size" in table and "| attention | forward |" in table
    assert table.startswith("**time (ms) against sequence length")
    worst = max(records, key=lambda r: r["ms_max"] / r["ms_min"])
    assert f"differ by at most {worst['ms_max'] / worst['ms_min']:.2f}× (max/min, at {worst['key']};" in table
    assert "--tiny checks that the pipeline runs end to end" in table        # tiny timings are no measurement
    full = [r | {"setting": dataclasses.asdict(speed.FULL)} for r in records]
    assert "differ by at most" in speed._spread(full) and "--tiny" not in speed._spread(full)
    assert (out / "speed.png").stat().st_size > 10_000
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (out / "speed.part1of1.jsonl").read_text().splitlines()
    (partial / "speed.part1of1.jsonl").write_text("\n".join(lines[:5]) + "\n")
    assert speed.report(partial).startswith("**Incomplete: 5 of 22 runs.**\n\n**time (ms)")
    # a colour per op, dashed forward and solid forward+backward: the legend says both
    fig = speed._plot(records)
    styles = legend(fig.axes[1])
    assert styles == {"ssd": "None", "selective_scan": "None", "attention": "None", "forward": "--",
                      "forward+backward": "-"}
    assert {line.get_linestyle() for line in fig.axes[0].get_lines()} == {"--", "-"}
    close(fig)
    assert main(["experiment", "speed", "--tiny", "--out", str(out), "--steps", "5"]) == 2
    assert "trains nothing" in capsys.readouterr().err
    assert table.rstrip().endswith(f"Measured: 22 runs on {records[0]['device']}.")
    # timings of another device in the folder: refused before anything runs, the folder as it was
    other = tmp_path / "other"
    other.mkdir()
    foreign = "NVIDIA A100-SXM4-40GB" if records[0]["device"] != "NVIDIA A100-SXM4-40GB" else "NVIDIA H100 80GB HBM3"
    gpu = [json.loads(line) | {"device": foreign} for line in lines[:5]]
    (other / "speed.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gpu))
    assert main(["experiment", "speed", "--tiny", "--out", str(other)]) == 2
    mix = ("would mix speed timings of 2 devices: "
           + "; ".join(sorted([f"{foreign} (speed.part1of1.jsonl)", f"{records[0]['device']} (this run)"]))
           + "; timings of two devices do not belong in one table")
    assert mix in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["speed.part1of1.jsonl"]
    # parts run on two machines, merged by --report: refused too, naming each device's file
    (other / "speed.part2of2.jsonl").write_text("\n".join(lines[5:]) + "\n")
    assert main(["experiment", "speed", "--out", str(other), "--report"]) == 2
    mix = "; ".join(sorted([f"{foreign} (speed.part1of1.jsonl)",
                            f"{records[0]['device']} (speed.part2of2.jsonl)"]))
    assert mix in capsys.readouterr().err and not (other / "speed.md").exists()


def test_a_report_into_a_read_only_folder_is_one_error(tmp_path, monkeypatch):
    """On a read-only file system even removing a temporary file that is not there fails (EROFS): the report's
    own error is what is raised, not that one."""
    import errno
    import os

    from matplotlib.figure import Figure

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    with pytest.raises(grid.UserError, match=r"cannot write .*x\.md: Read-only file system; the report"):
        grid.write_report(tmp_path, "x", "text\n", [{"key": "a", "device": "cpu"}], Figure())


def test_grid_robustness_dead_worker_cut_line_unwritable_folder(tmp_path, capsys):
    """A worker that dies is reported (not waited on for ever) and the finished runs are kept; a results line cut
    short by a kill is skipped with a warning and the next record starts on its own line; a folder that cannot
    hold the results is refused before any training; an empty part and an unusable device are clear errors."""
    import functools
    import time

    from mamba2.errors import UserError

    runs = [{"key": f"r{i}", "setting": {"s": 1}} for i in range(3)]
    out = tmp_path / "g"
    t0 = time.time()
    with pytest.raises(UserError, match="worker process died"):
        grid.run_grid("x", runs, functools.partial(eval, "__import__('os')._exit(3)"), out, workers=2)
    assert time.time() - t0 < 120
    for workers in (1, 2):          # a run that raises (a bug): its traceback, and the run named
        with pytest.raises(RuntimeError, match=r"run r\d failed: TypeError: .*the runs finished so far are kept in"):
            grid.run_grid("y", runs, int, tmp_path / f"y{workers}", workers=workers)

    path = out / "x.part1of1.jsonl"
    path.write_text('{"key": "r0", "setting": {"s": 1}}\n{"key": "r1", "sett')          # cut short by a kill
    new = grid.run_grid("x", runs, dict, out)
    assert [r["key"] for r in new] == ["r1", "r2"]
    said = capsys.readouterr()
    assert "dropped its unfinished last line" in said.out + said.err and "unreadable" not in said.err
    assert {r["key"] for r in grid.merged(out, "x")} == {"r0", "r1", "r2"}
    assert "unreadable" not in capsys.readouterr().err                     # and nothing is warned about again
    path.write_text('{"key": "r0", "setting": {"s": 1}}')      # a whole record whose newline the kill cut: kept
    assert [r["key"] for r in grid.run_grid("x", runs, dict, out)] == ["r1", "r2"]
    assert path.read_text().count("\n") == 3 and len(grid.merged(out, "x")) == 3
    path.write_text("garbage\n" + path.read_text())          # an unreadable line elsewhere is still warned about
    grid.merged(out, "x")
    assert "1 unreadable line(s) skipped" in capsys.readouterr().err
    assert grid.run_grid("x", runs, dict, out, part=(2, 4)) == []        # its one run is done: no empty file left
    assert sorted(p.name for p in out.iterdir()) == ["x.part1of1.jsonl"]

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot write the results into"):
        grid.run_grid("x", runs, dict, tmp_path / "afile")
    assert main(["experiment", "mqar", "--tiny", "--out", str(tmp_path / "p"), "--part", "13/20"]) == 2
    assert "would be empty" in capsys.readouterr().err
    assert main(["experiment", "mqar", "--tiny", "--out", str(tmp_path / "d"), "--device", "meta"]) == 2
    assert "--device meta cannot be used here" in capsys.readouterr().err


def test_unreadable_lines_are_set_aside_and_a_key_in_two_parts_is_warned_about(tmp_path, capsys):
    """The part a process runs (its file locked): unreadable lines moved to NAME.partIofN.rejected.jsonl, the
    results file rewritten whole without them (and still locked), so the warning does not come back; a key whose
    results differ between two part files is named with both files and the one used (identical ones, or a run
    again within one file, are not); --out naming a file is refused in one line."""
    out = tmp_path / "g"
    out.mkdir()
    path = out / "x.part1of1.jsonl"
    r0 = {"key": "r0", "setting": {"s": 1}, "acc": 0.5}
    path.write_text(f"garbage\n{json.dumps(r0)}\n{{\"key\": 5}}\n")
    runs = [{"key": f"r{i}", "setting": {"s": 1}} for i in range(3)]
    with grid._locked(out, path, (1, 1)) as f:
        said = capsys.readouterr()
        assert f"{path}: moved its 2 unreadable lines (lines 1, 3) to x.part1of1.rejected.jsonl" in said.out, said
        with pytest.raises(Busy):                           # the rewritten file is locked too
            with grid._locked(out, path, (1, 1)):
                pass
        f.write((json.dumps({**r0, "key": "r1"}) + "\n").encode())
    assert (out / "x.part1of1.rejected.jsonl").read_text() == 'garbage\n{"key": 5}\n'
    assert [json.loads(ln)["key"] for ln in path.read_text().splitlines()] == ["r0", "r1"]
    assert [r["key"] for r in grid.run_grid("x", runs, dict, out)] == ["r2"]
    assert "unreadable line" not in "".join(capsys.readouterr()) and not list(out.glob(".*tmp-*"))
    path.write_text("garbage\n" + path.read_text())       # a rewrite cut short after the lines were set aside
    with grid._locked(out, path, (1, 1)):
        pass
    assert (out / "x.part1of1.rejected.jsonl").read_text() == 'garbage\n{"key": 5}\n'       # not set aside twice

    with open(path, "a") as f:                              # run again within one file: the last line wins, quietly
        f.write(json.dumps({**r0, "acc": 0.6}) + "\n")
    (out / "x.part1of2.jsonl").write_text(json.dumps({**r0, "acc": 0.7}) + "\n" + json.dumps({**r0, "key": "r1"})
                                          + "\n")                               # r1 as in part1of1
    (out / "x.part2of2.jsonl").write_text(json.dumps({**r0, "acc": 0.7}) + "\n")      # the same as the one used
    assert {r["key"]: r.get("acc") for r in grid.merged(out, "x")} == {"r0": 0.7, "r1": 0.5, "r2": None}
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and (f"warning: {out}: 1 run (r0) is in both x.part1of1.jsonl and "
                                          "x.part1of2.jsonl with different results: x.part1of2.jsonl's is used" in err)
    assert "r1" not in err, err

    afile = tmp_path / "afile"
    afile.write_text("x")
    for where, message in ((afile, f"--out {afile} is a file, not a folder"),
                           (afile / "sub", f"--out {afile / 'sub'}: {afile} is a file, not a folder")):
        assert main(["experiment", "mqar", "--tiny", "--out", str(where)]) == 2
        assert message in capsys.readouterr().err


def test_interrupted_grid_writes_the_table_of_the_runs_kept(tmp_path, monkeypatch, capsys):
    from mamba2.experiments import mqar

    real, calls = mqar.train_one, []

    def stop_after_two(run):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(run["key"])
        return real(run)

    monkeypatch.setattr(mqar, "train_one", stop_after_two)
    out = tmp_path / "mqar"
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2"]) == 130     # "interrupted"
    assert (out / "mqar.md").read_text().startswith("**Incomplete: 2 of 12 runs.**")
    assert (out / "mqar.png").stat().st_size > 0 and "table of the runs kept" in capsys.readouterr().out

    def fail_after_three(run):          # a bug in a run (e.g. a kernel fault): the table of the runs kept too
        if len(calls) == 3:
            raise ValueError("a kernel fault")
        calls.append(run["key"])
        return real(run)

    monkeypatch.setattr(mqar, "train_one", fail_after_three)
    with pytest.raises(RuntimeError, match=r"run .* failed: ValueError: a kernel fault"):
        main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2"])
    assert (out / "mqar.md").read_text().startswith("**Incomplete: 3 of 12 runs.**")
    assert "table of the runs kept" in capsys.readouterr().out

    real_report = mqar.report

    def stopped_while_reporting(folder):          # a stop once every chosen run is done: the report first
        signal.raise_signal(signal.SIGINT)
        return real_report(folder)

    monkeypatch.setattr(mqar, "train_one", real)
    monkeypatch.setattr(mqar, "report", stopped_while_reporting)
    key = _mqar_records()[5]["key"]
    assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2", "--only", key]) == 130
    assert (out / "mqar.md").read_text().startswith("**Incomplete: 4 of 12 runs.**")
    assert len(json.loads((out / "mqar.json").read_text())) == 4
    (out / "mqar.md").unlink()
    (out / "mqar.md").mkdir()                  # the report fails while a stop is held: its error is what is said
    capsys.readouterr()
    assert main(["experiment", "mqar", "--out", str(out), "--report"]) == 2
    assert f"cannot write {out / 'mqar.md'}" in capsys.readouterr().err


_POISONED = []


def _faulting_run(run):
    """A run as a kernel fault makes it: run "b" raises and leaves its process unusable (every later call there
    raises too), as an illegal memory access leaves a CUDA context."""
    if _POISONED:
        raise RuntimeError("this process is poisoned by an earlier fault")
    if run["key"] == "b":
        _POISONED.append(1)
        raise RuntimeError("illegal memory access")
    if run["key"] == "k":                  # its process dies (killed, a crash)
        import os
        os._exit(3)
    if run["key"] == "u":                  # the package's own refusal
        raise grid.UserError("a setting this run cannot take")
    return {"value": run["i"]}


def test_keep_going_leaves_a_failed_run_out_and_replaces_its_process(tmp_path):
    """--keep-going: the failing run is logged and left out, the others run in fresh processes (none in the
    poisoned one), the call ends with an error naming it, and the next call retries only it."""
    runs = [{"key": k, "i": i, "setting": {}} for i, k in enumerate("abcde")]
    with pytest.raises(grid.UserError, match=r"1 run failed and was left out \(b\): tracebacks in .*x.failures.log"):
        grid.run_grid("x", runs, _faulting_run, tmp_path, workers=1, keep_going=True)   # c would follow b there
    kept = sorted(r["key"] for r in grid.merged(tmp_path, "x"))
    assert kept == ["a", "c", "d", "e"], kept
    log = (tmp_path / "x.failures.log").read_text()
    assert log.count("--- ") == 1 and "run b" in log and "illegal memory access" in log and "poisoned" not in log
    with pytest.raises(grid.UserError, match=r"\(b\)"):     # only b is tried again (and fails again)
        grid.run_grid("x", runs, _faulting_run, tmp_path, workers=2, keep_going=True)
    assert (tmp_path / "x.failures.log").read_text().count("--- ") == 2
    with pytest.raises(RuntimeError, match=r"run b failed: RuntimeError: illegal memory access"):
        grid.run_grid("y", runs, _faulting_run, tmp_path, workers=2)    # without it: the grid stops at b
    # several workers, a run whose process dies and one that raises the package's own error: only those two are
    # failed (the runs beside the dead one are run again alone), every other run is kept
    runs = [{"key": k, "i": i, "setting": {}} for i, k in enumerate("akcuef")]
    with pytest.raises(grid.UserError, match=r"2 runs failed and were left out \((k, u|u, k)\)"):
        grid.run_grid("z", runs, _faulting_run, tmp_path, workers=2, keep_going=True)
    assert sorted(r["key"] for r in grid.merged(tmp_path, "z")) == ["a", "c", "e", "f"]
    log = (tmp_path / "z.failures.log").read_text()
    assert "run k" in log and "worker process died" in log and "run u" in log and "cannot take" in log


def _lm_run_failing_at_one_rate(run):
    """lm's train_one, except that Mamba-2's sweep run at 3e-3 raises (in the worker process that trains it)."""
    from mamba2.experiments import lm

    if run["key"] == "mamba2/tiny/lr0.003":
        raise RuntimeError("illegal memory access")
    return lm.train_one(run)


def test_lm_keep_going_trains_the_larger_sizes_whose_sweep_is_complete(tmp_path, monkeypatch, capsys):
    """A sweep run that fails under --keep-going holds back only its own architecture's larger size: the others'
    sweeps are complete, so their larger sizes train in the same call (they waited for the next call before)."""
    from mamba2.experiments import lm

    monkeypatch.setattr(lm, "train_one", _lm_run_failing_at_one_rate)      # passed by name to the workers
    out = tmp_path / "lm"
    assert main(["experiment", "lm", "--tiny", "--out", str(out), "--steps", "2", "--keep-going",
                 "--only", "mamba2/*,hybrid/*"]) == 2
    err = capsys.readouterr().err
    assert "1 run failed and was left out (mamba2/tiny/lr0.003)" in err, err[-2000:]
    keys = sorted(json.loads(line)["key"] for line in (out / "lm.part1of1.jsonl").read_text().splitlines())
    assert [k.rsplit("/", 1)[0] for k in keys] == ["hybrid/tiny", "hybrid/tiny", "hybrid/tiny2", "mamba2/tiny"]


def test_lm_only_on_a_later_size_says_the_sweep_comes_first(tmp_path, capsys):
    assert main(["experiment", "lm", "--tiny", "--out", str(tmp_path / "lm"), "--steps", "2",
                 "--only", "*/tiny2/*"]) == 2
    assert "4 runs it matches become runnable once the learning-rate sweep is done: run it first" in \
        capsys.readouterr().err
    # one architecture: its sweep, then its larger size in the same call; the other architectures' larger sizes
    # are not announced as waiting (--only excludes them), nor are the sweep's runs called "done already"
    assert main(["experiment", "lm", "--tiny", "--out", str(tmp_path / "lm"), "--steps", "2",
                 "--only", "mamba2/*"]) == 0
    out = capsys.readouterr()
    assert "12 runs in the grid, 2 training steps each, 3 of them chosen by --only (1 waits for the learning-rate " \
           "sweep)" in out.out
    keys = [r["key"] for r in json.loads((tmp_path / "lm" / "lm.json").read_text())]
    assert len(keys) == 3 and sorted(keys)[:2] == ["mamba2/tiny/lr0.003", "mamba2/tiny/lr0.01"]
    assert sorted(keys)[2].startswith("mamba2/tiny2/lr")
    assert "wait for results of other parts" not in out.out and "done already" not in out.out + out.err


def test_speed_refuses_workers_and_workers_are_bounded_by_the_cpus(tmp_path, monkeypatch, capsys):
    import os

    assert main(["experiment", "speed", "--tiny", "--out", str(tmp_path / "s"), "--workers", "2"]) == 2
    assert "runs without --workers" in capsys.readouterr().err
    assert main(["experiment", "mqar", "--tiny", "--out", str(tmp_path / "m"), "--workers", "0"]) == 2
    assert "--workers must be ≥ 1, got 0" in capsys.readouterr().err and not (tmp_path / "m").exists()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    key = _mqar_records(steps=1)[0]["key"]
    assert main(["experiment", "mqar", "--tiny", "--out", str(tmp_path / "m"), "--workers", "2", "--steps", "1",
                 "--only", key]) == 0
    assert "warning: --workers 2 is more than the 1 CPU this process may use" in capsys.readouterr().err
    assert [r["key"] for r in json.loads((tmp_path / "m" / "mqar.json").read_text())] == [key]


def test_sigterm_writes_the_table_and_one_part_runs_in_one_process_at_a_time(tmp_path, capsys):
    """SIGTERM (what schedulers send) ends a grid as Ctrl-C does: the table of the runs kept is written. A second
    process running the same part into the same folder is refused while the first holds it (another part is not);
    --report refuses the flags that choose runs."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "mqar"
    env = child_env()
    # runs long enough that the grid is still running when the other processes have come and gone (under load);
    # on the CPU everywhere: a GPU finished the whole grid before the SIGTERM
    cmd = [sys.executable, "-m", "mamba2", "experiment", "mqar", "--tiny", "--steps", "150", "--device", "cpu",
           "--out", str(out)]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = out / "mqar.part1of1.jsonl"
        deadline = time.time() + 240
        while not (path.exists() and path.read_text().count("\n") >= 1) and time.time() < deadline:
            assert first.poll() is None, first.communicate()
            time.sleep(0.2)
        assert path.exists(), "no run finished in 240 s"
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2 and "another process is running part 1/1 of this grid" in second.stderr
        assert not (out / "mqar.md").exists()          # the refused process writes no report
        other = subprocess.run(cmd + ["--part", "2/2", "--only", "attention/w16/*"], env=env, capture_output=True,
                               text=True, timeout=240)
        assert other.returncode == 0, other.stderr
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143 and "interrupted" in stderr, stderr      # 128 + SIGTERM
    assert "table of the runs kept so far" in stdout
    assert (out / "mqar.md").read_text().startswith("**Incomplete: ")
    assert main(["experiment", "mqar", "--out", str(out), "--report", "--only", "x", "--workers", "2"]) == 2
    assert "--report only merges the results already in --out; --workers, --only choose runs" in \
        capsys.readouterr().err
    assert main(["experiment", "mqar", "--out", str(out), "--report"]) == 0

    # SIGTERM while the plot is being written (a narrow window at the end of every call): handled as Ctrl-C, once
    # the report is written whole (the default action killed the process mid-write)
    (out / "mqar.png").write_bytes(b"old")
    script = ("import os, signal, sys\nimport matplotlib.figure as F\nsave = F.Figure.savefig\n"
              "def stop(self, *a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return save(self, *a, **k)\n"
              "F.Figure.savefig = stop\nfrom mamba2.cli import main\n"
              f"sys.exit(main(['experiment', 'mqar', '--out', {str(out)!r}, '--report']))")
    stopped = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert stopped.returncode == 143 and "interrupted" in stopped.stderr, stopped.stderr[-2000:]
    assert (out / "mqar.png").read_bytes().startswith(b"\x89PNG") and not list(out.glob(".*tmp-*"))


def _mqar_records(steps: int = 2, **measured) -> list[dict]:
    """The tiny MQAR grid's runs (``--steps steps``) as records, with ``measured`` (default: accuracy 0.5)."""
    import dataclasses

    from mamba2.experiments import mqar

    planned, _ = mqar.runs(dataclasses.replace(mqar.TINY, steps=steps), "cpu")
    return [{**r, "accuracy": 0.5, **measured} for r in planned]


def test_lm_cells_say_when_the_best_rate_is_at_an_edge_of_the_sweep_and_when_tokens_per_s_was_shared(tmp_path):
    """Three rates: a best in the middle of the sweep gets no mark, one at the top or bottom does (and the line under
    the table names those architectures); a scaled size never does; a diverged best is not called an edge; only
    the runs that shared the device (workers > 1) are marked shared, in a table that mixes both."""
    import dataclasses

    from mamba2.experiments import lm

    setting = dataclasses.replace(lm.TINY, archs=("mamba2", "transformer++", "mamba1", "hybrid"), lrs=(1e-3, 3e-3, 1e-2))
    losses = {"mamba2": (0.9, 0.7, 0.8), "transformer++": (0.9, 0.8, 0.7), "mamba1": (0.7, 0.8, 0.9),
              "hybrid": (None, None, None)}                                          # middle, top, bottom, diverged
    shared = {"mamba2/tiny/lr0.003", "transformer++/tiny2/lr0.00666667"}

    def record(run, loss):
        return {**run, "eval_loss": loss, "bits_per_byte": None if loss is None else loss / math.log(2),
                "parameters_non_embedding": 1000 * run["d_model"], "curve": [] if loss is None else [[256, loss]],
                "tokens_per_s": 1000, "workers": 4 if run["key"] in shared else 1}

    sweep, _ = lm.runs(setting, "cpu", [])
    done = [record(r, losses[r["arch"]][setting.lrs.index(r["lr"])]) for r in sweep]
    planned, _ = lm.runs(setting, "cpu", done)
    done += [record(r, 0.5) for r in planned if r["stage"] == "scaled"]
    out = tmp_path / "lm"
    out.mkdir()
    (out / "lm.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in done))
    text = lm.report(out)
    main_table = text[:text.index("Learning-rate sweep")]
    rows = {line.split(" | ")[0].strip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    assert "; lr 0.003; 1,000 tok/s shared) |" in rows["mamba2"]                    # middle best: no edge mark
    assert "; lr 0.01; top of the sweep; 1,000 tok/s) |" in rows["transformer++"]
    assert "; lr 0.001; bottom of the sweep; 1,000 tok/s) |" in rows["mamba1"]
    assert rows["hybrid"].count("diverged (lr ") == 1 and "of the sweep" not in rows["hybrid"]
    assert "lr 0.00666667; 1,000 tok/s shared) |" in rows["transformer++"]        # scaled: no edge mark
    assert "The best rate of transformer++, mamba1 is at an edge of the sweep" in text
    assert sum(line.count("tok/s shared") for line in rows.values()) == 2


def test_mqar_plot_names_every_model_and_keeps_its_colour_across_panels():
    """A model drawn only in the first panel is still in the legend (drawn in the last), and a model keeps one colour
    in every panel even where a model before it in the grid's order is missing."""
    from mamba2.experiments import mqar

    best = {("a", 32, 256): {"accuracy": 0.5}, ("b", 32, 256): {"accuracy": 0.7}, ("c", 32, 256): {"accuracy": 0.1},
            ("c", 64, 256): {"accuracy": 0.2}, ("c", 32, 512): {"accuracy": 0.9}}
    fig = mqar._plot(best, ["a", "b", "c"], [32, 64], [256, 512])
    first, last = fig.axes
    assert [t.get_text() for t in last.get_legend().get_texts()] == ["a", "b", "c"]
    assert len(first.lines) == 3 and len(last.lines) == 1
    assert last.lines[0].get_color() == first.lines[2].get_color() != first.lines[0].get_color()


def test_a_process_refused_by_the_part_lock_writes_nothing(tmp_path, capsys):
    """The part's results file locked by another process: the second call is refused with the error and writes no
    report (the running process's table, JSON and plot are its own)."""
    out = tmp_path / "mqar"
    out.mkdir()
    path = out / "mqar.part1of1.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _mqar_records()[:3]))
    with grid._locked(out, path, (1, 1)):
        assert main(["experiment", "mqar", "--tiny", "--out", str(out), "--steps", "2"]) == 2
    said = capsys.readouterr()
    assert "another process is running part 1/1 of this grid" in said.err and "table" not in said.out
    assert sorted(p.name for p in out.iterdir()) == ["mqar.part1of1.jsonl"]


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_written(tmp_path, monkeypatch):
    """No space left while a record or the report is written: a UserError naming the file and the reason (no
    second traceback from closing the file), the records before kept, the old report left whole."""
    import errno

    from mamba2.errors import UserError

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    class FillsUp:
        """A results file whose disk is full after its first record (its close fails again, as a buffered one's)."""
        def __init__(self, f):
            self.f, self.full = f, False

        def __getattr__(self, name):
            return getattr(self.f, name)

        def write(self, data):
            if self.full or data.startswith(b'{"key": "r1"'):
                self.full = True
                no_space()
            return self.f.write(data)

        def close(self):
            self.f.close()
            if self.full:
                no_space()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    monkeypatch.setattr(grid, "open", lambda *a, **k: FillsUp(open(*a, **k)), raising=False)
    runs = [{"key": f"r{i}", "setting": {}} for i in range(3)]
    with pytest.raises(UserError, match=r"cannot write .*x.part1of1.jsonl: No space left on device; the runs "
                                        r"finished before are kept") as e:
        grid.run_grid("x", runs, dict, tmp_path)
    assert e.value.__suppress_context__
    monkeypatch.undo()
    assert [r["key"] for r in grid.merged(tmp_path, "x")] == ["r0"]

    fig, _ = grid.figure()
    grid.write_report(tmp_path, "x", "old", [], fig)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("x.*")}
    fig, _ = grid.figure()
    monkeypatch.setattr(fig, "savefig", no_space)
    with pytest.raises(UserError, match=r"cannot write .*x.png: No space left on device; the report in .* is left "
                                        r"as it was and the results are kept: --report writes it"):
        grid.write_report(tmp_path, "x", "new", [{"key": "r0"}], fig)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("x.*")} == before and not list(tmp_path.glob(".*tmp-*"))


def test_a_stop_while_the_report_is_written_comes_after_it(tmp_path, monkeypatch):
    """Ctrl-C while the report is written (a second one after the stop that ended the grid): the table, JSON and
    plot are all written, then the stop is acted on."""
    import os
    import signal

    fig, _ = grid.figure()
    save = fig.savefig

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save(*args, **kwargs)

    monkeypatch.setattr(fig, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid.write_report(tmp_path, "x", "table", [{"key": "r0"}], fig)
    assert (tmp_path / "x.md").read_text() == "table" and json.loads((tmp_path / "x.json").read_text())
    assert (tmp_path / "x.png").read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".*tmp-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigterm_wins_and_comes_after_the_temporary_files_are_gone(tmp_path, monkeypatch):
    """Ctrl-C then SIGTERM while the report is written: SIGTERM is the one acted on (exit 143), once no temporary
    file is left (its default handler ends the process at once)."""
    import os
    import signal

    fig, _ = grid.figure()
    save = fig.savefig

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return save(*args, **kwargs)

    raised = []
    monkeypatch.setattr(signal, "raise_signal", lambda sig: raised.append((sig, list(tmp_path.glob(".*tmp-*")))))
    monkeypatch.setattr(fig, "savefig", stopped)
    grid.write_report(tmp_path, "x", "table", [{"key": "r0"}], fig)
    assert raised == [(signal.SIGTERM, [])] and (tmp_path / "x.png").exists()


def test_records_that_do_not_fit_are_skipped_and_nan_never_wins(tmp_path, capsys):
    """--report on records of the wrong shape (valid JSON): each skipped with a warning naming the file and line;
    a NaN accuracy or loss (diverged) is never a cell's best, and is shown as diverged."""
    from mamba2.experiments import lm, mqar

    out = tmp_path / "mqar"
    out.mkdir()
    records = _mqar_records()
    nan = {**records[0], "accuracy": float("nan")}                      # mamba2-N16/w32/T32 at its first rate
    lines = [nan, records[1] | {"accuracy": 0.25}, records[2] | {"accuracy": "0.9"},
             {k: v for k, v in records[3].items() if k != "model"}, records[4] | {"width": True},
             records[5] | {"accuracy": float("nan")}]
    (out / "mqar.part1of1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = mqar.report(out)
    err = capsys.readouterr().err
    assert (f"{out / 'mqar.part1of1.jsonl'}: 3 unreadable line(s) skipped" in err and "line 3 ('accuracy' is str, "
            "not int or float)" in err and "line 4 (no 'model')" in err and "line 5 ('width' is bool" in err), err
    best = mqar.best_per_cell(grid.merged(out, "mqar", mqar.FIELDS))
    assert best[("mamba2-N16", 32, 32)]["accuracy"] == 0.25
    assert "| 0.250 (0.01) |" in text and "diverged (0.01; 1 of 2 rates)" in text   # attention/w32: NaN, one rate
    saved = json.loads((out / "mqar.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert [r["accuracy"] for r in saved if r["key"] == records[0]["key"]] == [None]       # standard JSON: null
    # a record of no planned run (a key edited by hand) is left out, with a warning
    off = records[1] | {"key": records[1]["key"].replace("/w32/", "/w99/"), "width": 99}
    with open(out / "mqar.part1of1.jsonl", "a") as f:
        f.write(json.dumps(off) + "\n")
    text = mqar.report(out)
    assert f"1 result of no run this grid plans left out of the table ({off['key']})" in capsys.readouterr().err
    assert "width 99" not in text and text.startswith("**Incomplete: 3 of 12 runs.**")
    assert lm._loss({"eval_loss": float("nan")}) == lm._loss({"eval_loss": None}) == float("inf")


def test_worker_threads_share_the_cpus_this_process_may_use(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert [grid.worker_threads(w) for w in (1, 2, 3, 8)] == [4, 2, 1, 1]
    assert grid.plural(1, "run") == "1 run" and grid.plural(2, "run") == "2 runs"


def test_locate_fault_names_the_first_failing_launch():
    """benchmarks/locate_fault.py (how the MQAR cell's fault is hunted, docs/experiments.md §1) runs its mixer
    workload under the interpreter counting every launch, and names the launch whose device sync fails, with its
    tensor arguments, exiting 3."""
    pytest.importorskip("triton")
    require_working_interpreter()
    env = child_env(TRITON_INTERPRET="1")
    script = REPO / "benchmarks" / "locate_fault.py"
    ok = subprocess.run([sys.executable, str(script), "mixer", "1", "16"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    launches = int(ok.stdout.split("(")[-1].split(" launches")[0])
    assert launches > 50, ok.stdout                # 6 forward + backward passes, each of a dozen kernels or more
    code = ("import sys; sys.argv = ['x']; sys.path.insert(0, 'benchmarks'); import locate_fault as L\n"
            "calls = [0]\n"
            "def sync():\n"
            "    calls[0] += 1\n"
            "    if calls[0] == 12: raise RuntimeError('CUDA error: an illegal memory access was encountered')\n"
            "L.sync_every_launch(sync)\n"
            "L.mixer(1, 16, 'cpu')\n")
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert bad.returncode == 3, (bad.stdout[-2000:], bad.stderr[-2000:])
    assert "FAULT in launch #6: " in bad.stdout and "illegal memory access" in bad.stdout, bad.stdout
    assert "  arg 0: (" in bad.stdout and "strides" in bad.stdout, bad.stdout


def test_lm_speed_benchmark_times_each_model_alone(tmp_path):
    """benchmarks/lm_speed.py on the tiny grid's models: a row per architecture and size with the same model as the
    grid's (its non-embedding parameters), tokens/s from the median step, and one-line errors for bad choices."""
    from mamba2.experiments import lm
    from mamba2.models import Mamba2LM

    out = tmp_path / "new" / "speed.json"                   # a folder that does not exist yet is made
    script = [sys.executable, str(REPO / "benchmarks" / "lm_speed.py"), "--tiny"]
    done = subprocess.run(script + ["--steps", "2", "--warmup", "0", "--archs", "mamba2,hybrid", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [(r["arch"], r["size"]) for r in report["rows"]] == [("mamba2", "tiny"), ("hybrid", "tiny"),
                                                                ("mamba2", "tiny2"), ("hybrid", "tiny2")]
    for r in report["rows"]:
        name, d_model, n_layer = next(s for s in lm.TINY.sizes if s[0] == r["size"])
        with torch.device("meta"):
            model = Mamba2LM(lm.model_config(r["arch"], d_model, n_layer, lm.TINY))
        assert r["parameters_non_embedding"] == model.num_parameters(exclude_embedding=True)
        assert r["tokens_per_step"] == lm.TINY.batch_size * lm.TINY.seq_len and r["spread"] >= 1
        assert r["tokens_per_s"] == round(r["tokens_per_step"] / (r["ms_per_step"] / 1e3))
    assert report["device"] and report["steps"] == 2 and report["complete"] and "tokens/s" in done.stdout
    # stopped by SIGTERM after its first row: the JSON holds the rows timed so far and says it is not complete
    stopped = tmp_path / "stopped.json"
    proc = subprocess.Popen(script + ["--steps", "2", "--warmup", "0", "--sizes", "tiny", "--out", str(stopped)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("arch") and proc.stdout.readline().startswith("mamba2 ")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.stdout.close()
    partial = json.loads(stopped.read_text())
    assert not partial["complete"] and 1 <= len(partial["rows"]) < 4 and partial["rows"][0]["arch"] == "mamba2"
    for bad, says in ((["--sizes", "7M"], "--sizes must name sizes of the setting (tiny, tiny2), got '7M'"),
                      (["--archs", "rwkv"], "--archs must name architectures of"), (["--steps", "1"], "≥ 2"),
                      (["--device", "cuda:99"], "error: --device cuda:99")):
        done = subprocess.run(script + bad + ["--out", str(out)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_devices_line_names_each_device_and_says_when_timings_mix():
    assert grid.devices_line([]) == "" and grid.devices_line([{"key": "a"}]) == ""
    assert grid.devices_line([{"device": "cpu"}] * 2) == "\nMeasured: 2 runs on cpu.\n"
    assert grid.devices_line([{"device": "A"}, {"device": "B"}, {"device": "B"}]) == \
        "\nMeasured: 2 runs on B, 1 run on A; compare timings only within one device.\n"
