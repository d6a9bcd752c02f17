"""The mamba2 command, run as a user would: `python -m mamba2 ...` in a subprocess."""

import json
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import child_env, word_tokenizer
from mamba2.cli import main

REPO = Path(__file__).resolve().parents[1]


def mamba2(*args, cwd, timeout=240):
    env = child_env(HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mamba2", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A small real corpus (the stdlib json package) and a checkpoint trained on it for 5 steps."""
    root = tmp_path_factory.mktemp("cli")
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", root / "corpus",
                    ignore=shutil.ignore_patterns("__pycache__"))
    proc = ok(mamba2("train", "--corpus", "corpus", "--preset", "tiny", "--steps", 5, "--batch-size", 2,
                     "--seq-len", 64, "--eval-every", 0, "--out", "run", "--prompt", "def ",
                     "--sample-tokens", 20, cwd=root))
    return root, proc


def test_train_writes_a_checkpoint_and_prints_a_sample(work):
    root, proc = work
    out = proc.stdout
    assert re.search(r"held-out loss \d+\.\d+ -> \d+\.\d+ nats/token", out)
    sample = out.split("--- sample", 1)[1].split("\n", 1)[1]
    assert sample.startswith("def ") and len(sample.encode()) > len("def ")
    names = sorted(p.name for p in (root / "run").iterdir())
    assert names == ["config.json", "loss_curve.png", "metrics.jsonl", "model.safetensors", "tokenizer_spec.json",
                     "trainer_state.pt"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_resume_extends_the_run(work, monkeypatch, capsys):
    root, _ = work
    shutil.copytree(root / "run", root / "run2")
    monkeypatch.chdir(root)
    assert main(["train", "--resume", "--out", "run2", "--steps", "7", "--no-sample"]) == 0
    assert "resuming run2 at step 5 of 7" in capsys.readouterr().out
    import torch
    state = torch.load(root / "run2" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 7 and state["train_config"]["seq_len"] == 64  # the run's own settings were kept
    assert [s for s, _ in state["train_history"]] == list(range(1, 8))
    # re-stating the run's own preset is accepted; a different one is refused with the fields it would change
    assert main(["train", "--resume", "--out", "run2", "--preset", "tiny", "--steps", "8", "--no-sample"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", "run2", "--preset", "small", "--steps", "9", "--no-sample"]) == 2
    assert re.search(r"--preset would change the model of the run in run2 \(.*d_model", capsys.readouterr().err)
    assert main(["train", "--resume", "--out", "run2", "--arch", "mamba2", "--steps", "9", "--no-sample"]) == 2
    assert "from the default --preset small, as --preset is not given" in capsys.readouterr().err
    # the data position counts the run's batches: their size, length and order stay; re-stating them is fine
    for flag, value in (("--batch-size", "3"), ("--seq-len", "32"), ("--seed", "7")):
        assert main(["train", "--resume", "--out", "run2", flag, value, "--steps", "9", "--no-sample"]) == 2
        assert f"{flag} cannot change when resuming" in capsys.readouterr().err
    # the run's own tokenizer may be re-stated; another is refused
    assert main(["train", "--resume", "--out", "run2", "--tokenizer", "bytes", "--steps", "9", "--no-sample"]) == 0
    other = word_tokenizer(root / "words.json", ["def", "return"])
    assert main(["train", "--resume", "--out", "run2", "--tokenizer", str(other), "--steps", "10",
                 "--no-sample"]) == 2
    assert "--tokenizer cannot change when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", "run2", "--batch-size", "2", "--seq-len", "64", "--steps", "10",
                 "--no-sample"]) == 0
    capsys.readouterr()
    # a metrics log whose last line was cut short (a full disk) loses that line only
    log = root / "run2" / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines) + "\n" + lines[-1][:20])
    assert main(["train", "--resume", "--out", "run2", "--steps", "11", "--no-sample"]) == 0
    assert [json.loads(x) for x in log.read_text().splitlines()][:len(lines)] == [json.loads(x) for x in lines]
    # a resumed run never goes back: --steps below where it stands is refused, naming both
    capsys.readouterr()
    assert main(["train", "--resume", "--out", "run2", "--steps", "4", "--no-sample"]) == 2
    assert "--steps 4 is below step 11, where the run in run2 stands" in capsys.readouterr().err
    # weights without optimizer state (what best/ keeps) cannot continue a run
    shutil.copytree(root / "run", root / "weights_only")
    state = torch.load(root / "weights_only" / "trainer_state.pt", weights_only=True)
    del state["optimizer"]
    torch.save(state, root / "weights_only" / "trainer_state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", "weights_only", "--steps", "9", "--no-sample"]) == 2
    assert "holds no optimizer state" in capsys.readouterr().err


def test_a_time_budget_is_not_kept_by_a_later_resume(work, monkeypatch, capsys):
    """--max-minutes limits the invocation that gives it: a later --resume without it runs to --steps."""
    import torch
    root, _ = work
    shutil.copytree(root / "run", root / "run3")
    monkeypatch.chdir(root)
    assert main(["train", "--resume", "--out", "run3", "--steps", "9", "--max-minutes", "1e-6", "--no-sample"]) == 0
    assert "budget is spent" in capsys.readouterr().out
    assert torch.load(root / "run3" / "trainer_state.pt", weights_only=True)["step"] == 6
    assert main(["train", "--resume", "--out", "run3", "--no-sample"]) == 0
    state = torch.load(root / "run3" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 9 and state["train_config"]["max_minutes"] is None


def test_a_second_train_into_the_same_out_is_refused_before_touching_it(tmp_path, monkeypatch, capsys):
    """While another process trains into --out (its lock, runs/.c3.lock, held here), a resume or a new run there
    is refused at once with one line and changes nothing in the folder; a lock file a killed run left behind
    blocks nothing and is cleared."""
    pytest.importorskip("fcntl")
    from mamba2 import fsutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs/c3").mkdir(parents=True)
    (tmp_path / "runs/c3/metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    with fsutil.locked("runs/c3", busy=str), fsutil.locked("runs/new", busy=str):
        for argv, out in ((["--resume", "--steps", "200"], "c3"), (["--preset", "tiny", "--steps", "2"], "new")):
            assert main(["train", *argv, "--out", f"runs/{out}", "--no-sample"]) == 2
            err = capsys.readouterr().err
            assert err == (f"error: another process is training into runs/{out} (runs/.{out}.lock is locked): "
                           f"wait for it to end or choose another --out\n")
        after = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if not p.name.endswith(".lock")}
        assert after == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c3"]     # the locks went with their holder
    (tmp_path / "runs/.gone.lock").write_text("")           # a killed run's (the OS dropped its lock)
    assert main(["train", "--resume", "--out", "runs/gone", "--no-sample"]) == 2
    assert "checkpoint not found: runs/gone" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["c3"]
    # a run refused after the lock made --out's parent leaves no empty folder behind
    assert main(["train", "--config", "none.json", "--out", "new/deep/run", "--no-sample"]) == 2
    assert "config file not found: none.json" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_generate_streams_one_prompt_and_batches_several(work, monkeypatch, capsys):
    root, _ = work
    one = ok(mamba2("generate", "--checkpoint", "run", "--prompt", "import ", "--max-new-tokens", 12,
                    "--temperature", 0, cwd=root))
    assert one.stdout.startswith("import ") and len(one.stdout.encode()) > len("import ")
    monkeypatch.chdir(root)
    assert main(["generate", "--checkpoint", "run", "--prompt", "import ", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == one.stdout  # greedy is deterministic
    assert main(["generate", "--checkpoint", "run", "--prompt", "def ", "--prompt", "class Foo",
                 "--max-new-tokens", "8", "--top-k", "5", "--top-p", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1 ===\ndef " in out and "=== prompt 2 ===\nclass Foo" in out


def test_generate_stop_strings_stdin_prompt_files_dtype_and_stats(work, monkeypatch, capsys):
    """--stop cuts the text before the stop string (streamed and batched); --prompt - reads stdin and
    --prompt-file a file (both the same as the text given directly); --dtype bfloat16 runs; the stats line goes
    to stderr (and --quiet drops it); bad sampling flags are refused before anything is printed."""
    import io
    root, _ = work
    monkeypatch.chdir(root)
    base = ["generate", "--checkpoint", "run", "--max-new-tokens", "40", "--temperature", "0"]
    assert main(base + ["--prompt", "def "]) == 0
    full = capsys.readouterr()
    stats = re.search(r"\[(\d+) new tokens in ([\d.]+) s: first token after ([\d.]+) s \(prefill\), then [\d.]+ "
                      r"tokens/s decoding; 1 prompt\(s\), float32 on (cpu|cuda:\d+)\]", full.err)
    assert stats and 1 <= int(stats[1]) <= 40 and float(stats[3]) <= float(stats[2]), full.err
    assert main(base + ["--prompt", "def ", "--prompt", "class "]) == 0       # a batch: one rate, prefill included
    assert re.search(r"\[\d+ new tokens in [\d.]+ s: [\d.]+ tokens/s, prefill included; 2 prompt\(s\), float32 on ",
                     capsys.readouterr().err)
    text = full.out[len("def "):].rstrip("\n")
    stop = text[10:12]                                   # a string that occurs in the greedy continuation
    cut = text[:text.index(stop)]
    assert main(base + ["--prompt", "def ", "--stop", stop, "--stop", "\x00never", "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.out == "def " + cut + "\n" and out.err == ""
    assert main(base + ["--prompt", "def ", "--prompt", "def ", "--stop", stop, "--quiet"]) == 0
    assert capsys.readouterr().out.count("def " + cut + "\n") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("def "))
    assert main(base + ["--prompt", "-", "--quiet"]) == 0
    assert capsys.readouterr().out == full.out
    (root / "p.txt").write_text("def ")
    assert main(base + ["--prompt-file", "p.txt", "--quiet"]) == 0
    assert capsys.readouterr().out == full.out
    assert main(base + ["--prompt", "def ", "--dtype", "bfloat16"]) == 0
    assert re.search(r"bfloat16 on (cpu|cuda:\d+)\]", capsys.readouterr().err)
    assert main(base + ["--prompt", "def ", "--min-p", "2"]) == 2
    out = capsys.readouterr()
    assert "--min-p must be a number in [0, 1], got 2.0" in out.err and out.out == ""
    assert main(base + ["--prompt-file", "missing.txt"]) == 2
    assert "cannot read --prompt-file missing.txt" in capsys.readouterr().err
    # a long prompt is prefilled in pieces behind a progress bar (stderr), with the same continuation
    monkeypatch.setattr("mamba2.cli.PREFILL_PIECE", 16)
    long_prompt = "def main(x):\n    return x + 1\n" * 3
    assert main(base + ["--prompt", long_prompt, "--quiet"]) == 0
    whole = capsys.readouterr()
    assert whole.err == ""
    assert main(base + ["--prompt", long_prompt]) == 0
    pieces = capsys.readouterr()
    assert pieces.out == whole.out and "prefill" in pieces.err, pieces.err
    # --top-k -1 is "off" as in the server's API (and vLLM's), the same as 0; below -1 is refused
    sampled = ["generate", "--checkpoint", "run", "--max-new-tokens", "12", "--seed", "3", "--prompt", "def ",
               "--quiet"]
    assert main(sampled + ["--top-k", "0"]) == 0
    off = capsys.readouterr().out
    assert main(sampled + ["--top-k", "-1"]) == 0 and capsys.readouterr().out == off
    with pytest.raises(SystemExit) as exit_:
        main(sampled + ["--top-k", "-2"])
    assert exit_.value.code == 2 and "must be ≥ 1, or 0 or -1 for off, got -2" in capsys.readouterr().err


def test_eval_reports_loss_perplexity_and_bits_per_byte(work):
    root, _ = work
    proc = ok(mamba2("eval", "--checkpoint", "run", cwd=root))
    m = re.search(r"loss (\d+\.\d+) nats/token \| perplexity (\d+\.\d+) \| bits/byte (\d+\.\d+) \| ([\d,]+) tokens",
                  proc.stdout)
    assert m, proc.stdout
    loss, ppl, bpb = map(float, m.groups()[:3])
    assert abs(ppl - 2.718281828 ** loss) < 0.01 * ppl and abs(bpb - loss / 0.693147) < 1e-3
    # defaulted to the corpus and the row length the checkpoint was trained with, and says so
    assert "corpus (val, rows of 64 tokens: the run's --seq-len)" in proc.stdout


def test_eval_refuses_flags_of_the_other_evaluation(capsys):
    """--limit / --include-path belong to --tasks, --corpus / --seq-len / --max-tokens to the corpus evaluation:
    given to the other they were ignored silently."""
    assert main(["eval", "--checkpoint", "nowhere", "--limit", "5"]) == 2
    assert "--limit does not apply without --tasks" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "nowhere", "--tasks", "x", "--corpus", "c", "--max-tokens", "9"]) == 2
    assert "--corpus and --max-tokens do not apply to --tasks" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", "nowhere", "--tasks", "x", "--split", "val"]) == 2
    assert "--split does not apply to --tasks" in capsys.readouterr().err
    for empty in ("", ",", " , "):
        assert main(["eval", "--checkpoint", "nowhere", "--tasks", empty, "--limit", "5"]) == 2
        assert f"--tasks {empty!r} names no task" in capsys.readouterr().err


def test_eval_reads_transformers_and_official_safetensors_dirs(work, monkeypatch, capsys):
    """Both formats can hold a model.safetensors next to config.json: eval must not take them for our own."""
    from mamba2 import checkpoints
    from mamba2.interop import save_pretrained

    root, _ = work
    monkeypatch.chdir(root)
    model, _, tok, _ = checkpoints.load("run")
    save_pretrained(model, "run_hf", format="hf", tokenizer=tok)
    save_pretrained(model, "run_off", format="official", tokenizer=tok, weights="safetensors")
    losses = []
    for d in ("run", "run_hf", "run_off"):
        assert main(["eval", "--checkpoint", d, "--corpus", "corpus", "--max-tokens", "2000", "--seq-len", "64"]) == 0
        losses.append(float(re.search(r"loss (\d+\.\d+)", capsys.readouterr().out).group(1)))
    assert losses[0] == losses[1] == losses[2], losses


@pytest.mark.parametrize("cmd", ["train", "generate", "eval"])
def test_help_describes_every_command(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.count("default") >= 3 and ("--checkpoint" in out or "--corpus" in out)


def test_version(capsys):
    import mamba2
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"mamba2 {mamba2.__version__}"


def bad_inputs(root):
    (root / "empty").mkdir(exist_ok=True)
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    (root / "notext.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (root / "bad_config.json").write_text(json.dumps({"d_model": -1}))
    (root / "small_vocab.json").write_text(json.dumps({"vocab_size": 50}))
    (root / "tiny.jsonl").write_text('{"text": "ab"}\n')
    (root / "not_ckpt").mkdir(exist_ok=True)
    (root / "not_ckpt" / "config.json").write_text("{}")
    t = ("train", "--corpus", "corpus", "--preset", "tiny", "--steps", 2, "--out", "never")
    return {
        "missing corpus": (("train", "--corpus", "nope", "--out", "never"), "corpus not found: nope"),
        "empty corpus": (("train", "--corpus", "empty", "--out", "never"), "corpus is empty"),
        "unreadable corpus": (("train", "--corpus", "latin1.txt", "--out", "never"), "not UTF-8"),
        "jsonl without text": (("train", "--corpus", "notext.jsonl", "--out", "never"), r'notext.jsonl:2: .*"text"'),
        "bad config value": ((*t, "--config", "bad_config.json"), "d_model must be a positive integer"),
        "missing config": ((*t, "--config", "nope.json"), "config file not found"),
        "unknown preset": (("train", "--preset", "huge", "--out", "never"), "unknown preset 'huge'"),
        "vocab below tokenizer": ((*t, "--config", "small_vocab.json"),
                                  r"vocab_size 50 \(--config\) is below the tokenizer's 256 ids"),
        "rows longer than corpus": ((*t, "--seq-len", 10**7, "--no-size-check"), "fewer than seq_len"),
        "not a number": (("train", "--steps", "many", "--out", "never"), "--steps: invalid positive integer value"),
        "empty sample prompt": (("train", "--prompt", "", "--out", "never"), "empty prompt"),
        "existing run": (("train", "--out", "run"), "run already exists .*--resume"),
        "resume nothing": (("train", "--resume", "--out", "never"), "checkpoint not found: never"),
        "not a checkpoint": (("generate", "--checkpoint", "not_ckpt"), "not a Mamba-2 config"),
        "empty prompt": (("generate", "--checkpoint", "run", "--prompt", ""), "empty prompt"),
        "negative temperature": (("generate", "--checkpoint", "run", "--temperature", "-1"), "temperature"),
        "eval missing checkpoint": (("eval", "--checkpoint", "gone"), "checkpoint not found: gone"),
        "nan temperature": (("generate", "--checkpoint", "run", "--temperature", "nan"), "temperature must be"),
        "bad lr": ((*t, "--lr", "-1"), r"lr \(--lr\) must be a number in \(0, 1e6\], got -1.0$"),
        "huge lr": ((*t, "--lr", "1e38"), r"lr \(--lr\) must be a number in \(0, 1e6\], got 1e\+38$"),
        "arch and layout": ((*t, "--arch", "mamba1", "--layout", "mamba2*2"), "--arch mamba1 and --layout"),
        "unwritable out": (("train", "--corpus", "corpus", "--steps", 1, "--out", "/proc/nope"),
                           "cannot write checkpoint /proc/nope"),
        "empty eval split": (("eval", "--checkpoint", "run", "--corpus", "tiny.jsonl"), "nothing to evaluate"),
        "serve queue below batch": (("serve", "--checkpoint", "run", "--max-batch", "10", "--max-queue", "2"),
                                    "--max-queue 2 is below --max-batch 10"),
        "meta device": (("generate", "--checkpoint", "run", "--device", "meta"), "--device meta cannot be used here"),
        "serve limit above max len": (("serve", "--checkpoint", "run", "--max-len", "64", "--max-tokens-limit", "64"),
                                      "--max-tokens-limit 64 is not below --max-len 64, .* up to 63"),
    }


SUBPROCESS_CASES = ("bad config value", "empty prompt")


def check_error(name, pattern, rc, stderr):
    lines = stderr.strip().splitlines()
    if rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]):
        return []
    return [f"{name}: rc={rc} stderr={stderr[-800:]!r}"]


def test_help_and_parsing_do_not_import_torch():
    """Every command's --help, and parsing its flags, start without torch (a second, not ten)."""
    code = ("import sys\nfrom mamba2.cli import build_parser\n"
            "p = build_parser()\n"
            "for argv in (['train', '--out', 'x'], ['experiment', 'speed', '--out', 'x'],\n"
            "             ['serve', '--checkpoint', 'x'], ['generate', '--checkpoint', 'x']):\n"
            "    p.parse_args(argv)\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=child_env())
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_ctrl_c_or_sigterm_while_starting_up_says_interrupted_without_a_traceback(tmp_path):
    """SIGINT or SIGTERM at random moments of a command's start (importing torch, loading the corpus, building the
    model, the first evaluation): status 130 / 143, the word 'interrupted', no traceback (a half-imported module's
    later error included). SIGTERM was the default action there: killed, no message."""
    import random
    import signal
    import time

    # from 0.5 s: before that, under load, the interpreter may still be starting, before main() installs the
    # handlers (a signal there is Python's default: a KeyboardInterrupt traceback or a kill, nothing of ours)
    for i, delay in enumerate(sorted(random.uniform(0.5, 2.5) for _ in range(6))):
        sig, status = (signal.SIGINT, 130) if i % 2 else (signal.SIGTERM, 143)
        proc = subprocess.Popen([sys.executable, "-m", "mamba2", "train", "--preset", "tiny", "--steps", "2",
                                 "--device", "cpu", "--out", f"run{delay:.2f}", "--no-sample"],
                                cwd=tmp_path, env=child_env(HF_HUB_OFFLINE="1"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:      # it finished first
            continue
        # -SIGINT: CPython 3.11 marks a KeyboardInterrupt raised inside exec() (dataclasses, while torch imports) as
        # unhandled even when caught, and ends the process by SIGINT: a shell reports 130 for it
        assert proc.returncode in (status, -signal.SIGINT) and "Traceback" not in err and "interrupted" in err, \
            f"{sig.name} after {delay:.2f} s: status {proc.returncode}\n{err[-3000:]}"


def test_user_mistakes_give_one_line_and_no_traceback(work):
    """A few cases as real processes (all at once: they are import-bound), checking the exit status and stderr."""
    root, _ = work
    cases = {k: v for k, v in bad_inputs(root).items() if k in SUBPROCESS_CASES}
    env = child_env()
    procs = {name: subprocess.Popen([sys.executable, "-m", "mamba2", *map(str, args)], cwd=root, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (args, _) in cases.items()}
    failures = []
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=240)
        failures += check_error(name, cases[name][1], proc.returncode, err)
    assert not failures, "\n".join(failures)
    assert not (root / "never").exists()


def test_every_user_mistake_is_one_error_line(work, monkeypatch, capsys):
    """Every case through main() in this process (the same code path, without a process start each)."""
    root, _ = work
    monkeypatch.chdir(root)
    failures = []
    for name, (args, pattern) in bad_inputs(root).items():
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse
            rc = e.code
        failures += check_error(name, pattern, rc, capsys.readouterr().err)
    assert not failures, "\n".join(failures)
    assert not (root / "never").exists()  # nothing half-written


@pytest.mark.parametrize("flags, layout", [
    (["--arch", "hybrid"], None),
    (["--layout", "mamba2*2,attention+mlp,mamba1", "--d-intermediate", "32"],
     ["mamba2", "mamba2", "attention+mlp", "mamba1"]),
])
def test_train_other_architectures_from_flags(work, monkeypatch, capsys, flags, layout):
    root, _ = work
    monkeypatch.chdir(root)
    out = f"arch{len(flags)}"
    assert main(["train", "--corpus", "corpus", "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--eval-every", "0", "--no-sample", "--out", out, *flags]) == 0
    config = json.loads((root / out / "config.json").read_text())
    kinds = [e.split("+")[0] for e in config["layout"]]
    assert "attention" in kinds
    if layout is not None:
        assert config["layout"] == layout and config["n_layer"] == len(layout)
    assert main(["generate", "--checkpoint", out, "--prompt", "def ", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0


def test_generate_takes_invalid_utf8_prompts_as_bytes(work, monkeypatch, capsys):
    """A prompt that is not valid UTF-8 (argv and stdin keep raw bytes as surrogateescape): the byte tokenizer
    encodes the raw bytes, the same tokens as the bytes given any other way; nothing raises."""
    import io
    root, _ = work
    monkeypatch.chdir(root)
    base = ["generate", "--checkpoint", "run", "--max-new-tokens", "8", "--temperature", "0", "--quiet"]
    assert main(base + ["--prompt", "def \udcff\udcfe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def \ufffd\ufffd")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def \xff\xfe")))
    assert main(base + ["--prompt", "-"]) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--checkpoint", "run", "--port", "70000"])
    assert exit_.value.code == 2 and "must be in [0, 65535], got 70000" in capsys.readouterr().err


def test_a_prompt_file_must_be_utf8_text(tmp_path, monkeypatch, capsys):
    """A --prompt-file that is not valid UTF-8 (a binary) or is empty is refused before the checkpoint is loaded,
    naming the file (and the byte offset of its first invalid byte); a UTF-8 file is read with newlines as a text
    file's; prompts and files keep their command-line order; stdin is read once and must not be empty."""
    import io

    from mamba2.cli import _texts

    monkeypatch.chdir(tmp_path)
    Path("binary.bin").write_bytes("café ".encode() + b"\x89PNG\x00")
    assert main(["generate", "--checkpoint", "no/such/dir", "--prompt-file", "binary.bin"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-file binary.bin is not valid UTF-8 text: byte 0x89 at offset 6" in err
    Path("text.txt").write_bytes("café\r\nnaïve\n".encode())
    Path("empty.txt").write_bytes(b"")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    sources = [("--prompt-file", "text.txt"), ("--prompt", "inline"), ("--prompt", "-"), ("--prompt-file", "text.txt")]
    assert _texts(sources, stdin_flag="--prompt") == ["café\nnaïve\n", "inline", "from stdin", "café\nnaïve\n"]
    assert main(["generate", "--checkpoint", "no/such/dir", "--prompt-file", "empty.txt"]) == 2
    assert "--prompt-file empty.txt is empty" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"again")))
    assert main(["generate", "--checkpoint", "no/such/dir", "--prompt", "-", "--prompt", "-"]) == 2
    assert "--prompt - reads stdin, which can be read once" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert main(["generate", "--checkpoint", "no/such/dir", "--prompt", "-"]) == 2
    assert "--prompt - reads the prompt from stdin, which was empty" in capsys.readouterr().err


def test_eval_dtype_bfloat16_is_close_to_float32(work):
    """eval --dtype bfloat16 loads the weights in bf16 (as generate and serve do) and gives the fp32 loss within
    the bf16 budget of docs/design.md §4."""
    root, _ = work
    losses = []
    for dtype in ("float32", "bfloat16"):
        proc = ok(mamba2("eval", "--checkpoint", "run", "--max-tokens", "2000", "--dtype", dtype, cwd=root))
        losses.append(float(re.search(r"loss (\d+\.\d+)", proc.stdout).group(1)))
    assert abs(losses[1] - losses[0]) <= 2e-2 * losses[0], losses


def test_eval_with_the_training_cap_gives_the_training_figure(work):
    """train's last held-out loss and eval's agree when eval reads the same tokens (--max-tokens = the run's
    eval_tokens), and a default eval that reads more says how to get the training figure."""
    import torch
    root, _ = work
    state = torch.load(root / "run" / "trainer_state.pt", weights_only=False)
    cap = state["train_config"]["eval_tokens"]
    last = state["eval_history"][-1][1]
    proc = ok(mamba2("eval", "--checkpoint", "run", "--max-tokens", str(cap), cwd=root))
    assert abs(float(re.search(r"loss (\d+\.\d+)", proc.stdout).group(1)) - last) < 1e-4, (proc.stdout, last)
    full = ok(mamba2("eval", "--checkpoint", "run", cwd=root))
    tokens = int(re.search(r"([\d,]+) tokens", full.stdout).group(1).replace(",", ""))
    assert (f"--max-tokens {cap} gives the same number" in full.stdout) == (tokens > cap), full.stdout


def test_init_from_fine_tunes_a_transformers_model_and_exports_it(work, tmp_path):
    """--init-from an HF-format directory: the held-out loss goes down, --export hf writes a directory that
    transformers loads with our checkpoint's logits (<= 1e-4), and model flags are refused."""
    import torch
    from transformers import Mamba2ForCausalLM

    from mamba2.checkpoints import load as load_checkpoint
    from mamba2.interop import load, save_pretrained

    root, _ = work
    base = load(root / "run").model
    save_pretrained(base, tmp_path / "base-hf", format="hf", tokenizer=load(root / "run").tokenizer)
    shutil.copytree(root / "corpus", tmp_path / "corpus")
    proc = ok(mamba2("train", "--init-from", "base-hf", "--corpus", "corpus", "--steps", 12, "--batch-size", 4,
                     "--seq-len", 64, "--eval-every", 6, "--out", "ft", "--export", "hf", "--no-sample",
                     cwd=tmp_path))
    assert "initialised from base-hf (hf format)" in proc.stdout
    assert "fine-tuning defaults: --lr 0.0003 --warmup 10" in proc.stdout
    first, last = map(float, re.search(r"held-out loss (\d+\.\d+) -> (\d+\.\d+)", proc.stdout).groups())
    assert last < first
    ours = load_checkpoint(tmp_path / "ft")[0]
    theirs = Mamba2ForCausalLM.from_pretrained(tmp_path / "ft-hf").eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    assert ((a - b).norm() / a.norm()).item() <= 1e-4
    bad = mamba2("train", "--init-from", "base-hf", "--preset", "small", "--out", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "leave out --preset" in bad.stderr


def test_lora_fine_tune_exports_merged_weights_and_logs_to_tensorboard(work, tmp_path, monkeypatch, capsys):
    """--init-from with --lora-rank: the adapters' settings and trainable share are printed, held-out loss goes
    down, only the targeted weights differ from the starting model, --export hf matches in transformers (<= 1e-4),
    --save-adapter and --tensorboard write their files; LoRA flags without a model to fine-tune are refused."""
    pytest.importorskip("peft")
    pytest.importorskip("tensorboard")
    import torch
    from transformers import Mamba2ForCausalLM

    from mamba2.checkpoints import load as load_checkpoint
    from mamba2.interop import load, save_pretrained

    root, _ = work
    start = load(root / "run")
    save_pretrained(start.model, tmp_path / "base-hf", format="hf", tokenizer=start.tokenizer)
    shutil.copytree(root / "corpus", tmp_path / "corpus")
    proc = ok(mamba2("train", "--init-from", "base-hf", "--lora-rank", 4, "--corpus", "corpus", "--steps", 12,
                     "--batch-size", 4, "--seq-len", 64, "--eval-every", 6, "--out", "runs/ft", "--export", "hf",
                     "--save-adapter", "--tensorboard", "--no-sample", cwd=tmp_path))
    assert "fine-tuning defaults: --lr 0.001 --warmup 10" in proc.stdout
    assert re.search(r"LoRA rank 4 on in_proj,out_proj: [\d,]+ trainable of [\d,]+ parameters", proc.stdout)
    first, last = map(float, re.search(r"held-out loss (\d+\.\d+) -> (\d+\.\d+)", proc.stdout).groups())
    assert last < first
    ours = load_checkpoint(tmp_path / "runs/ft")[0]
    before, after = start.model.state_dict(), ours.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("in_proj.weight", "out_proj.weight")) for k in changed)
    theirs = Mamba2ForCausalLM.from_pretrained(tmp_path / "runs/ft-hf").eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    assert ((a - b).norm() / a.norm()).item() <= 1e-4
    assert (tmp_path / "runs/ft/adapter/adapter_config.json").is_file()
    assert list((tmp_path / "runs/tensorboard/ft").glob("events.out.tfevents.*"))
    assert "TensorBoard: runs/tensorboard/ft" in proc.stdout
    monkeypatch.chdir(tmp_path)       # the refusals and the resume in this process: no interpreter start each

    def refused(*argv):
        capsys.readouterr()
        assert main(["train", *map(str, argv)]) == 2
        return capsys.readouterr().err

    assert "give it with --init-from DIR" in refused("--lora-rank", 4, "--out", "x")
    (tmp_path / "afile").write_text("x")
    assert "cannot use afile/tb for TensorBoard: afile is a file, not a folder" in refused(
        "--tensorboard", "afile/tb", "--out", "y")
    assert "cannot write checkpoint afile/run: afile is a file, not a folder" in refused("--out", "afile/run")
    if Path("/proc/self").is_dir():      # exists, takes no new files
        assert "cannot use /proc for TensorBoard" in refused("--tensorboard", "/proc", "--out", "y")
    exported = (tmp_path / "runs/ft-hf/config.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--out", "runs/ft", "--resume", "--steps", "13"]) == 0
    resumed, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "TensorBoard: runs/tensorboard/ft" in resumed     # kept from the run's own settings,
    assert "exported (hf): runs/ft-hf" in resumed               # as are its exports
    assert (tmp_path / "runs/ft-hf/config.json").stat().st_mtime_ns != exported
    assert "--- sample" not in resumed                          # and its --no-sample
    shutil.copytree(tmp_path / "runs/ft-hf", tmp_path / "runs/ft-official")  # not an official-format export
    assert "is not a model directory in the official format" in refused(
        "--out", "runs/ft", "--resume", "--steps", 14, "--export", "official")
    shutil.copytree(tmp_path / "runs/ft-hf", tmp_path / "runs/new-hf")
    assert "--export hf would replace runs/new-hf, which exists" in refused(
        "--init-from", "base-hf", "--export", "hf", "--out", "runs/new")
    shutil.rmtree(tmp_path / "runs/new-hf")
    shutil.copytree(tmp_path / "runs/ft", tmp_path / "runs/new-hf")       # a training run where the export goes
    assert "runs/new-hf: it holds a training run" in refused(
        "--init-from", "base-hf", "--export", "hf", "--out", "runs/new", "--overwrite")
    assert not (tmp_path / "runs/new").exists()                          # refused before any training
    assert "--lora-rank cannot change when resuming" in refused("--out", "runs/ft", "--resume", "--lora-rank", 8)


def test_generate_interactive_keeps_the_conversation(work):
    """--interactive: each stdin line is a turn, the model replies to each, the state line says what is kept, and
    Ctrl-D (end of stdin) ends with status 0."""
    root, _ = work
    proc = subprocess.run([sys.executable, "-m", "mamba2", "generate", "--checkpoint", "run", "--interactive",
                           "--temperature", "0", "--max-new-tokens", "5", "--stop", "\n", "--prompt", "import json\n"],
                          input="def f(\nreturn x\n", cwd=root, capture_output=True, text=True, timeout=240,
                          env=child_env(HF_HUB_OFFLINE="1"))
    ok(proc)
    out = proc.stdout
    # the opening --prompt is the first turn: it gets a reply too; then each line
    assert out.startswith("import json\n") and "\ndef f(\n" in out and "\nreturn x\n" in out
    assert len(out.split("\n")) == 7 and "the conversation's state is kept between turns" in proc.stderr
    bad = mamba2("generate", "--checkpoint", "run", "--interactive", "--prompt", "a", "--prompt", "b", cwd=root)
    assert bad.returncode == 2 and "at most one --prompt" in bad.stderr
    bad = mamba2("generate", "--checkpoint", "run", "--interactive", "--prompt", "-", cwd=root)
    assert bad.returncode == 2 and "--prompt - cannot read it too" in bad.stderr


def test_interactive_state_is_the_transcript_as_shown(work, monkeypatch, capsys):
    """The state --interactive keeps after each turn holds exactly the text printed so far: the opening, each
    line, each reply cut at its stop string and the newline printed after it."""
    import io

    from mamba2.interop import load
    from mamba2.serving.engine import Engine

    root, _ = work
    monkeypatch.chdir(root)
    kept, real = [], Engine.make_prefix

    def spy(self, ids, after=None):
        kept.append(list(ids))
        return real(self, ids, after=after)

    monkeypatch.setattr(Engine, "make_prefix", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("def f(\nreturn x\n"))
    assert main(["generate", "--checkpoint", "run", "--interactive", "--temperature", "0.8", "--seed", "1",
                 "--max-new-tokens", "12", "--stop", "\n", "--prompt", "import json\n"]) == 0
    out = capsys.readouterr().out
    tokenizer = load("run").tokenizer
    assert len(kept) == 4 and tokenizer.decode(kept[-1]) == out, (tokenizer.decode(kept[-1]), out)  # [0]: the size


def test_interactive_with_attention_layers_says_so_and_ends_cleanly_at_its_length(tmp_path, monkeypatch, capsys):
    """A model with attention layers: the banner says its keys and values grow; a conversation past
    CHAT_MAX_LEN ends with a one-line error (status 2), not a traceback."""
    import io

    from mamba2.config import Mamba2Config
    from mamba2.interop import save_pretrained
    from mamba2.models.lm import Mamba2LM
    from mamba2.tokenizer import ByteTokenizer

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=16,
                          layout=("mamba2", "attention"), attn_num_heads=4)
    save_pretrained(Mamba2LM(config).eval(), tmp_path / "hybrid", format="mamba2", tokenizer=ByteTokenizer())
    monkeypatch.setattr("mamba2.cli.CHAT_MAX_LEN", 64)
    monkeypatch.setattr("sys.stdin", io.StringIO("x = 1  # one line of thirty\n" * 3))
    assert main(["generate", "--checkpoint", str(tmp_path / "hybrid"), "--interactive", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "the attention layers' keys and values grow with the conversation, up to 64 tokens" in err, err
    assert "error: the conversation cannot go on: prompt (" in err and "Traceback" not in err, err


def _tiny_hybrid(path):
    """A tiny untrained Mamba-2 + attention checkpoint with the byte tokenizer, saved to ``path``."""
    import torch

    from mamba2.config import Mamba2Config
    from mamba2.interop import save_pretrained
    from mamba2.models.lm import Mamba2LM
    from mamba2.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    config = Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=16,
                          layout=("mamba2", "attention"), attn_num_heads=4)
    save_pretrained(Mamba2LM(config).eval(), path, format="mamba2", tokenizer=ByteTokenizer())
    return str(path)


def test_generate_checks_max_new_tokens_against_the_keys_and_values_it_reserves(tmp_path, monkeypatch, capsys):
    """With attention layers, --max-new-tokens sizes a key/value reservation: refused up front (one line, status 2)
    when it exceeds the free memory, said on stderr when large (over KV_NOTE_BYTES); --interactive refuses a
    value its conversation cannot hold."""
    ckpt = _tiny_hybrid(tmp_path / "hybrid")
    monkeypatch.setattr("mamba2.sizing.available_memory", lambda device: 2**20)         # 1 MiB free
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "ab", "--max-new-tokens", "10000000000",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: generating would need [\d,.]+ GiB of decoding state: the attention layers' keys and "
                        r"values for 1 prompt\(s\) × 10,000,000,002 positions \(the longest prompt \+ "
                        r"--max-new-tokens 10000000000\), more than the 1.0 MiB free on (cpu|cuda:0): use a smaller "
                        r"--max-new-tokens or fewer prompts\n", err), err
    assert main(["generate", "--checkpoint", ckpt, "--interactive", "--max-new-tokens", "70000"]) == 2
    assert "--max-new-tokens 70000 does not fit in an --interactive conversation" in capsys.readouterr().err
    monkeypatch.setattr("mamba2.sizing.available_memory", lambda device: None)          # unknown: not refused
    monkeypatch.setattr("mamba2.cli.KV_NOTE_BYTES", 0)
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "ab", "--prompt", "abc", "--max-new-tokens", "3",
                 "--temperature", "0", "--quiet"]) == 0
    assert "[reserving 0.0 MiB of decoding state: the attention layers' keys and values for 2 prompt(s) × 6 " \
           "positions" in capsys.readouterr().err


def test_generate_out_of_memory_names_only_generate_flags(tmp_path, monkeypatch, capsys):
    """An allocation that fails anyway: one line naming what generate can change (not train's --batch-size)."""
    ckpt = _tiny_hybrid(tmp_path / "hybrid")

    def oom(*args, **kw):
        raise RuntimeError("CUDA out of memory. Tried to allocate 5.00 GiB")

    monkeypatch.setattr("mamba2.cli._sample", oom)
    assert main(["generate", "--checkpoint", ckpt, "--max-new-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 5.00 GiB): use a smaller "
                          "--max-new-tokens") and err.count("\n") == 1, err
    assert "--batch-size" not in err and "--seq-len" not in err

    def oom_loading(*args, **kw):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("mamba2.interop.load", oom_loading)
    assert main(["generate", "--checkpoint", ckpt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory while loading the model (CUDA out of memory. Tried to allocate "
                          "2.00 GiB): use --dtype bfloat16") and "--max-new-tokens" not in err, err


def test_a_run_too_large_for_the_machine_is_refused_before_it_allocates(tmp_path):
    """The size check: a model whose training state alone exceeds the memory, and a batch far beyond any machine,
    are refused in seconds with the estimate and what to change, nothing written."""
    big = tmp_path / "big.json"
    big.write_text('{"d_model": 16384, "n_layer": 64}')      # ~34B parameters: 16 bytes each
    proc = mamba2("train", "--config", big, "--device", "cpu", "--out", "huge", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "this model does not fit: its weights, gradients and AdamW state" in proc.stderr
    assert "--no-size-check" in proc.stderr and not (tmp_path / "huge").exists()
    proc = mamba2("train", "--preset", "small", "--batch-size", 100_000, "--device", "cpu", "--out", "huge",
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "this run would not fit: estimated peak memory" in proc.stderr
    assert "smaller --batch-size" in proc.stderr and not (tmp_path / "huge").exists()


def test_size_estimate_grows_with_the_batch_and_says_what_it_is():
    import torch

    from mamba2.config import Mamba2Config
    from mamba2.sizing import estimate_training

    cfg = Mamba2Config.preset("small")
    small = estimate_training(cfg, 471_008, 8, 256, torch.device("cpu"))
    big = estimate_training(cfg, 471_008, 64, 256, torch.device("cpu"))
    half = estimate_training(cfg, 471_008, 64, 256, torch.device("cpu"), dtype_bytes=2)
    assert small.peak_bytes < half.peak_bytes < big.peak_bytes and small.step_s > 0 and small.fits
    assert re.fullmatch(r"peak memory ~\d+\.\d GiB of \d+\.\d GiB available, ~\d+ (ms|s|min) per step", str(small))


def test_size_estimate_counts_what_the_fused_layers_keep_where_the_kernels_train(monkeypatch):
    """Where the kernels train (a GPU), activations are what the fused Mamba-2 layer keeps (fp32 residual, the
    in_proj input and output: 11,324 B/token/layer at 130m bf16, measured by benchmarks/saved_activations.py), not
    the torch code's ≈250 B per channel in fp32 — 8× more, which refused GPU runs that fit."""
    import torch

    from mamba2 import kernels
    from mamba2.config import Mamba2Config
    from mamba2.sizing import KERNEL_ACT_MARGIN, activation_bytes

    cfg = Mamba2Config.preset("130m")
    cpu = torch.device("cpu")
    torch_code = activation_bytes(cfg, cpu, 2)
    monkeypatch.setattr(kernels, "use_triton", lambda t: True)
    fused = activation_bytes(cfg, cpu, 2)
    assert fused == int(KERNEL_ACT_MARGIN * 11_312)          # 3072 + 1536 + 6704 (the 12 B of rstd/ids aside)
    assert torch_code > 6 * fused


def test_running_out_of_memory_is_one_error_line(monkeypatch, capsys):
    """A failed allocation (here a simulated one: torch raises RuntimeError "... can't allocate memory") ends in one
    line that says what to change, exit 2; other RuntimeErrors still raise."""
    import mamba2.cli as cli

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 123456789 bytes.")
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_for(oom))
    assert main(["eval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and "smaller --batch-size" in err and err.count("\n") == 1

    def other(args):
        raise RuntimeError("something else")
    monkeypatch.setattr(cli, "build_parser", lambda: _parser_for(other))
    with pytest.raises(RuntimeError, match="something else"):
        main(["eval"])


def _parser_for(fn):
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("cmd")
    p.set_defaults(func=fn)
    return p


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_while_a_finished_command_exits_keeps_its_status(sig):
    """The process entry point (mamba2.cli.run): a stop that arrives while the interpreter shuts down after the
    command has ended (here from an exit handler) leaves the command's own status, not 130 / 143."""
    code = ("import atexit, os, signal\nfrom mamba2 import cli\ncli.main = lambda argv=None: 3\n"
            f"atexit.register(lambda: os.kill(os.getpid(), signal.{sig}))\ncli.run()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=child_env())
    assert done.returncode == 3, done.stderr
