"""Trainer, schedule, checkpoints: resume equals an uninterrupted run, saves are atomic, training learns."""

import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import child_env
from mamba2 import checkpoints
from mamba2.cli import main
from mamba2.data import load_corpus
from mamba2.errors import UserError
from mamba2.evaluation import EvalResult
from mamba2.interop import save_pretrained
from mamba2.models import Mamba2Config, Mamba2LM
from mamba2.tokenizer import ByteTokenizer
from mamba2.train_config import TrainConfig
from mamba2.training import Trainer, lr_at, param_groups

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus(None, TOK)


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config.preset("tiny")
    return Mamba2LM(cfg), cfg


def small_run(**kw):
    base = dict(steps=6, batch_size=2, seq_len=64, warmup=2, lr=3e-3, eval_every=0, eval_tokens=256)
    return TrainConfig(**{**base, **kw})


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # cosine midpoint
    assert lr_at(100, cfg) == pytest.approx(1e-4)


def test_train_config_rejects_bad_values():
    with pytest.raises(UserError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(UserError, match="steps"):
        TrainConfig(steps=0)
    for seed in (-1, 2 ** 64):       # numpy's data order and torch's generator take [0, 2**64) both
        with pytest.raises(UserError, match=r"seed \(--seed\) must be an integer in \[0, 2\*\*64\), got"):
            TrainConfig(seed=seed)
    TrainConfig(seed=2 ** 64 - 1)


def test_seeds_2_to_the_32_apart_start_from_different_weights():
    """torch's CPU generator keeps a seed's low 32 bits: init_seed is the seed below 2**32 (runs made before keep
    their weights) and a 32-bit hash above, so seeds 2**32 apart give other initial weights."""
    from mamba2.models import Mamba2LM

    seeds = [TrainConfig(seed=s).init_seed for s in (5, 5 + 2 ** 32, 5 + 2 ** 33, 2 ** 64 - 1)]
    assert seeds[0] == 5 and len(set(seeds)) == 4 and all(0 <= s < 2 ** 32 for s in seeds)
    assert TrainConfig(seed=5 + 2 ** 32).init_seed == TrainConfig(seed=5 + 2 ** 32).init_seed

    def weights(seed):
        torch.manual_seed(TrainConfig(seed=seed).init_seed)
        return Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16)).lm_head.weight

    assert torch.equal(weights(5), weights(5)) and not torch.equal(weights(5), weights(5 + 2 ** 32))


def test_weight_decay_spares_ssm_parameters_norms_biases_and_embeddings():
    model, _ = tiny()
    decay, keep = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    kept = {names[id(p)] for p in keep["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert kept.isdisjoint(decayed) and kept | decayed == set(names.values())
    for leaf in ("A_log", "dt_bias", ".D", "norm.weight", "conv1d.bias", "embedding.weight"):
        assert any(n.endswith(leaf) for n in kept), leaf
        assert not any(n.endswith(leaf) for n in decayed), leaf
    assert any(n.endswith("in_proj.weight") for n in decayed) and any(n.endswith("out_proj.weight") for n in decayed)


def test_resume_continues_the_same_run(stdlib, tmp_path):
    train, _ = stdlib
    cfg = small_run(steps=6, grad_accum=2)
    model, mcfg = tiny()
    whole = Trainer(model, mcfg, TOK, train, None, cfg, progress=False, log=lambda s: None)
    whole.fit()

    model, mcfg = tiny()
    first = Trainer(model, mcfg, TOK, train, None, cfg, out_dir=tmp_path / "ck", progress=False, log=lambda s: None)
    first.fit(until_step=3)
    del first, model
    torch.manual_seed(1234)  # the checkpoint, not the caller, decides every random state
    model, mcfg, tok, state = checkpoints.load(tmp_path / "ck")
    assert state["step"] == 3 and state["micro_step"] == 6
    second = Trainer(model, mcfg, tok, train, None, TrainConfig.from_dict(state["train_config"]), state=state,
                     progress=False, log=lambda s: None)
    second.fit()

    a = [loss for _, loss in whole.train_history]
    b = [loss for _, loss in second.train_history]
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    for (n, p), (_, q) in zip(whole.model.named_parameters(), second.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_training_on_real_text_lowers_held_out_loss(stdlib):
    train, val = stdlib
    model, mcfg = tiny()
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=128, warmup=5, lr=4e-3, eval_every=0, eval_tokens=4096)
    trainer = Trainer(model, mcfg, TOK, train, val, cfg, progress=False, log=lambda s: None)
    result = trainer.fit()
    before, after = trainer.eval_history[0][1], trainer.eval_history[-1][1]
    assert before == pytest.approx(math.log(256), abs=0.3)  # an untrained byte model is near uniform
    assert after < before - 1.5, (before, after)
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2))  # bytes: one token per byte
    assert result.perplexity == pytest.approx(math.exp(result.loss))


def test_trainer_feeds_seq_idx_and_accumulates(stdlib, monkeypatch):
    train, _ = stdlib
    model, mcfg = tiny()
    seen = []
    real_loss = model.loss

    def spy(input_ids, targets, *, seq_idx=None, **kw):
        seen.append((input_ids.cpu(), seq_idx.cpu()))
        return real_loss(input_ids, targets, seq_idx=seq_idx, **kw)
    monkeypatch.setattr(model, "loss", spy)
    trainer = Trainer(model, mcfg, TOK, train, None, small_run(steps=2, grad_accum=3), progress=False)
    trainer.fit()
    assert trainer.micro_step == 6 and len(seen) == 6
    for k, (ids, seq_idx) in enumerate(seen):
        expected = trainer.loader.batch(k)
        assert torch.equal(ids, expected.input_ids) and torch.equal(seq_idx, expected.seq_idx)
        assert seq_idx.dtype == torch.int32


def logits_of(model):
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model, cfg = tiny(seed=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init: every tensor must really be stored
    checkpoints.save(tmp_path / "ck", model, cfg, TOK)
    loaded, cfg2, tok, state = checkpoints.load(tmp_path / "ck")
    assert cfg2 == cfg and isinstance(tok, ByteTokenizer) and state is None
    assert torch.equal(logits_of(loaded), logits_of(model))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("backbone.embedding.weight" in keys)  # tied head stored once
    assert loaded.lm_head.weight.data_ptr() == loaded.backbone.embedding.weight.data_ptr()
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    old, cfg = tiny(seed=1)
    checkpoints.save(tmp_path / "ck", old, cfg, TOK)
    new, _ = tiny(seed=2)

    def crash(path):
        assert path.parent.name.startswith(".ck.tmp-")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoints.save(tmp_path / "ck", new, cfg, TOK, extra_files={"x.png": crash})
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    assert torch.equal(logits_of(checkpoints.load(tmp_path / "ck")[0]), logits_of(old))

    # dying between the two renames of the swap: the next load puts the previous checkpoint back
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(tmp_path / "ck", new, cfg, TOK)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "ck").exists()
    assert torch.equal(logits_of(checkpoints.load(tmp_path / "ck")[0]), logits_of(old))
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_loading_a_non_checkpoint_names_what_is_missing(tmp_path):
    with pytest.raises(UserError, match="not found"):
        checkpoints.load(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"d is not a mamba2 checkpoint: missing model\.safetensors"):
        checkpoints.load(tmp_path / "d")


def test_a_checkpoint_of_another_shape_names_the_tensor(tmp_path):
    model, cfg = tiny()
    checkpoints.save(tmp_path / "ck", model, cfg, TOK)
    d = json.loads((tmp_path / "ck" / "config.json").read_text())
    d["d_state"] *= 2
    (tmp_path / "ck" / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match=r"tensor 'backbone\.layers\.0\.mixer\.[a-z0-9_.]+' has shape"):
        checkpoints.load(tmp_path / "ck")
    d["d_state"] = -1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(d))
    with pytest.raises(UserError, match="d_state"):
        checkpoints.load(tmp_path / "ck")


def test_save_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    model, cfg = tiny()
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a mamba2 checkpoint"):
        checkpoints.save(tmp_path, model, cfg, TOK)
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_time_budget_stops_early_and_saves(stdlib, tmp_path):
    train, val = stdlib
    model, mcfg = tiny()
    logs = []
    trainer = Trainer(model, mcfg, TOK, train, val, small_run(steps=500, max_minutes=1e-5), out_dir=tmp_path / "ck",
                      progress=False, log=logs.append)
    trainer.fit()
    assert trainer.step == 1 and any("budget" in line for line in logs)
    state = checkpoints.load(tmp_path / "ck")[3]
    assert state["step"] == 1 and state["eval_history"][-1][0] == 1
    assert (tmp_path / "ck" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_saves_before_stopping(stdlib, tmp_path, monkeypatch):
    train, _ = stdlib
    model, mcfg = tiny()
    trainer = Trainer(model, mcfg, TOK, train, None, small_run(steps=10), out_dir=tmp_path / "ck", progress=False)
    real_step = trainer.train_step

    def step():
        if trainer.step == 3:
            raise KeyboardInterrupt
        return real_step()
    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert checkpoints.load(tmp_path / "ck")[3]["step"] == 3


REPO = Path(__file__).resolve().parents[1]
TINY_RUN = ["--device", "cpu", "--preset", "tiny", "--batch-size", "2", "--seq-len", "64", "--eval-every", "0",
            "--no-sample"]


@pytest.fixture
def json_corpus(tmp_path):
    """A small real corpus: the stdlib json package."""
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", tmp_path / "corpus",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def train_cli(*args, cwd):
    """`mamba2 train` on the json corpus in a subprocess, its output unbuffered so that it can be followed."""
    env = child_env(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    # a test runner started in the background may ignore SIGINT, and its children with it
    return subprocess.Popen([sys.executable, "-m", "mamba2", "train", "--corpus", "corpus", *TINY_RUN, *args],
                            cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_sigterm_saves_and_exits_143(json_corpus):
    """SIGTERM (a scheduler's stop) is handled as Ctrl-C — the step finishes and is saved — and the exit status is
    143 (128 + 15), what a process ended by SIGTERM reports."""
    run = train_cli("--steps", "60", "--out", "term", "--export", "hf", cwd=json_corpus)
    for line in run.stdout:  # the step-0 evaluation is done: training has started
        if "held-out" in line:
            break
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 143, err[-3000:]
    assert re.search(r"interrupted at step \d+; checkpoint saved in term", err) and "Traceback" not in err
    assert "(continue with: mamba2 train --resume --out term)" in err   # the export is kept with the run's state


def test_ctrl_c_then_resume_gives_the_weights_of_the_uninterrupted_run(json_corpus):
    root, steps = json_corpus, ["--steps", "60", "--grad-accum", "4"]
    ref = train_cli(*steps, "--out", "ref", cwd=root)
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err[-3000:]

    run = train_cli(*steps, "--out", "run", cwd=root)
    for line in run.stdout:  # the step-0 evaluation is done: training has started
        if "held-out" in line:
            break
    try:
        run.wait(timeout=random.uniform(0.1, 1.5))  # a random moment, most likely in the middle of a step
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    stopped = int(re.search(r"interrupted at step (\d+); checkpoint saved in run", err).group(1))
    assert stopped < 60 and "Traceback" not in err

    resumed = train_cli("--resume", "--out", "run", cwd=root)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0 and f"resuming run at step {stopped} of 60" in out, err[-3000:]
    a, b = load_file(root / "ref" / "model.safetensors"), load_file(root / "run" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_overwrite_replaces_a_run_but_never_a_nested_model_or_a_users_file(json_corpus, monkeypatch, capsys):
    """train --overwrite replaces a run's own entries (metrics, loss curve, best/) but refuses, before training,
    a folder that also holds another model or a file of the user's, naming them; everything stays."""
    monkeypatch.chdir(json_corpus)
    run = ["train", "--corpus", "corpus", *TINY_RUN, "--steps", "1", "--no-sample", "--out", "ow"]
    assert main(run) == 0
    assert main([*run, "--overwrite"]) == 0                                 # its own files: replaced
    save_pretrained(Mamba2LM(Mamba2Config.preset("tiny", vocab_size=256)), json_corpus / "ow/inner", format="hf")
    (json_corpus / "ow/notes.txt").write_text("mine")
    before = sorted(p.name for p in (json_corpus / "ow").iterdir())
    capsys.readouterr()
    assert main([*run, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "refusing to replace the checkpoint ow: it also holds inner/, notes.txt" in err, err
    assert sorted(p.name for p in (json_corpus / "ow").iterdir()) == before


def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(json_corpus, monkeypatch, capsys):
    monkeypatch.chdir(json_corpus)

    def weights_of(out):
        return load_file(json_corpus / out / "model.safetensors")

    # an absurd learning rate: the first updates are finite, then the loss is NaN
    assert main(["train", "--corpus", "corpus", *TINY_RUN, "--steps", "5", "--save-every", "1", "--warmup", "0",
                 "--lr", "1e3", "--out", "lr"]) == 2
    err = capsys.readouterr().err
    step = re.fullmatch(r"error: training diverged: loss is nan at step (\d+); try a lower --lr\n", err).group(1)
    assert checkpoints.read_trainer_state(json_corpus / "lr")["step"] == int(step) - 1 >= 1
    assert all(torch.isfinite(w).all() for w in weights_of("lr").values())

    # a finite loss whose gradients overflow (as in low precision) on the last step, which is saved at the end
    real_loss, backward_passes = Mamba2LM.loss, itertools.count(1)

    def loss(self, *args, **kw):
        value = real_loss(self, *args, **kw)
        if value.requires_grad:
            value.register_hook(lambda g: g * math.inf if next(backward_passes) == 4 else g)
        return value
    monkeypatch.setattr(Mamba2LM, "loss", loss)
    assert main(["train", "--corpus", "corpus", *TINY_RUN, "--steps", "4", "--save-every", "2", "--out", "grad"]) == 2
    assert re.fullmatch(r"error: training diverged: gradient norm is (nan|inf) at step 4; try a lower --lr\n",
                        capsys.readouterr().err)
    assert checkpoints.read_trainer_state(json_corpus / "grad")["step"] == 2
    assert all(torch.isfinite(w).all() for w in weights_of("grad").values())


def test_resume_with_more_steps_goes_on_from_the_current_learning_rate(stdlib, tmp_path, monkeypatch):
    train, _ = stdlib
    cfg = small_run(steps=10, warmup=2)
    model, mcfg = tiny()
    Trainer(model, mcfg, TOK, train, None, cfg, out_dir=tmp_path / "ck", progress=False).fit(until_step=6)

    def resume(steps, until):
        model, mcfg, tok, state = checkpoints.load(tmp_path / "ck")
        trainer = Trainer(model, mcfg, tok, train, None, TrainConfig.from_dict({**state["train_config"], "steps": steps}),
                          state=state, out_dir=tmp_path / "ck", progress=False)
        lrs, real_step = [], trainer.train_step

        def step():
            lrs.append(lr_at(trainer.step, trainer.cfg, trainer.lr_anchor))
            loss = real_step()
            assert trainer.optimizer.param_groups[0]["lr"] == lrs[-1]
            return loss
        monkeypatch.setattr(trainer, "train_step", step)
        trainer.fit(until_step=until)
        return trainer, lrs

    longer, lrs = resume(20, 13)
    assert abs(lrs[0] - lr_at(6, cfg)) <= 1e-12  # no jump: the rate step 6 had in the 10-step run
    # a later resume with the same --steps follows the extended schedule exactly
    longer, more = resume(20, None)
    lrs += more
    assert len(lrs) == 14 and all(a > b for a, b in zip(lrs, lrs[1:]))
    floor = cfg.lr * cfg.min_lr_ratio
    assert lrs[-1] > floor and lr_at(20, longer.cfg, longer.lr_anchor) == pytest.approx(floor, abs=1e-15)
    assert lr_at(0, longer.cfg, longer.lr_anchor) == lr_at(0, cfg)  # the warmup is not part of the change


def test_keeps_the_best_evaluation_in_best_and_resume_does_not_replace_it_with_a_worse_one(stdlib, tmp_path,
                                                                                          monkeypatch):
    import mamba2.training as training
    train, val = stdlib
    losses = iter([5.0, 3.0, 2.0, 4.0, 2.5, 1.0, 0.5])  # evaluations at steps 0, 2, 4, 6 (stop), 8, 10, 10 again
    weights = {}

    def scripted(model, stream, **kw):
        weights[trainer.step] = {n: p.detach().cpu().clone() for n, p in model.state_dict().items()}  # best/ loads on cpu
        loss = next(losses)
        return EvalResult(loss, math.exp(loss), loss / math.log(2), 256)
    monkeypatch.setattr(training, "evaluate", scripted)
    logs = []
    model, mcfg = tiny()
    cfg = small_run(steps=10, eval_every=2)
    trainer = Trainer(model, mcfg, TOK, train, val, cfg, out_dir=tmp_path / "ck", progress=False, log=logs.append)
    trainer.fit(until_step=6)
    assert trainer.best == (4, 2.0) and sum("best so far" in line for line in logs) == 3

    def best_weights():
        return checkpoints.load(tmp_path / "ck" / "best")[0].state_dict()

    def assert_best_is(step):
        for name, value in best_weights().items():
            torch.testing.assert_close(value, weights[step][name], rtol=0, atol=0, msg=name)
    assert_best_is(4)

    model, mcfg, tok, state = checkpoints.load(tmp_path / "ck")
    assert state["best"] == [4, 2.0]
    other = Trainer(model, mcfg, tok, train, val, TrainConfig.from_dict(state["train_config"]), state=state,
                    corpus=str(tmp_path / "other"), progress=False, log=logs.append)   # losses of another held-out set
    assert other.best == (4, math.inf) and "held-out set changed with the corpus (stdlib -> " in logs[-1]
    assert other.eval_from == len(state["eval_history"]) == 4      # its summary starts at its own first evaluation
    trainer = Trainer(model, mcfg, tok, train, val, TrainConfig.from_dict(state["train_config"]), state=state,
                      out_dir=tmp_path / "ck", progress=False, log=logs.append)
    trainer.fit(until_step=8)  # 2.5 at step 8: worse than step 4's 2.0
    assert_best_is(4)
    trainer.fit()  # 1.0 at step 10
    assert trainer.best == (10, 1.0)
    assert_best_is(10)
    assert sorted(os.listdir(tmp_path / "ck")) == ["best", "config.json", "loss_curve.png", "metrics.jsonl",
                                                   "model.safetensors", "tokenizer_spec.json", "trainer_state.pt"]

    # a run already at its end whose last step has no evaluation (stopped by Ctrl-C) evaluates once more; the new
    # best it saves is recorded in the trainer state too (it was not: best/ and the state then disagreed)
    model, mcfg, tok, state = checkpoints.load(tmp_path / "ck")
    state["eval_history"] = state["eval_history"][:-1]
    done = Trainer(model, mcfg, tok, train, val, TrainConfig.from_dict(state["train_config"]), state=state,
                   out_dir=tmp_path / "ck", progress=False, log=logs.append)
    done.fit()
    saved = checkpoints.load(tmp_path / "ck")[3]
    assert saved["best"] == [10, 0.5] and saved["eval_history"][-1][:2] == [10, 0.5]


def test_cli_keeps_best_and_eval_reads_it(json_corpus, monkeypatch, capsys):
    monkeypatch.chdir(json_corpus)
    assert main(["train", "--corpus", "corpus", *TINY_RUN, "--steps", "4", "--eval-every", "2", "--out", "run"]) == 0
    out = capsys.readouterr().out
    assert "(best so far: saved to run/best)" in out and re.search(r"best held-out loss .* at step \d: run/best", out)
    assert main(["eval", "--checkpoint", "run/best", "--device", "cpu"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["train", "--corpus", "corpus", *TINY_RUN, "--steps", "4", "--eval-every", "2", "--out", "off",
                 "--no-keep-best"]) == 0
    assert not (json_corpus / "off" / "best").exists()


def test_without_a_progress_bar_progress_lines_are_logged(stdlib):
    """No bar (nohup, CI, a pipe): a line with the running train loss, tokens/s, elapsed time and ETA is logged
    every report_every_s seconds (0: every step), counting up to the last step with the ETA reaching 0:00."""
    train, _ = stdlib
    model, mcfg = tiny()
    lines: list[str] = []
    Trainer(model, mcfg, TOK, train, None, small_run(steps=4), progress=False, log=lines.append,
            report_every_s=0).fit()
    pattern = r"step +(\d)/4: train loss (\d+\.\d{4}) \| [\d,]+ tokens/s \| elapsed \d+:\d\d \| ETA (\d+:\d\d)"
    found = [re.fullmatch(pattern, ln) for ln in lines]
    assert [int(m.group(1)) for m in found if m] == [1, 2, 3, 4], lines
    assert found[-1] is not None and found[-1].group(3) == "0:00"
    quiet: list[str] = []
    model, mcfg = tiny()
    Trainer(model, mcfg, TOK, train, None, small_run(steps=4), progress=False, log=quiet.append).fit()
    assert not any(re.fullmatch(pattern, ln) for ln in quiet)          # 30 s default: a short run reports nothing


def test_a_second_ctrl_c_during_the_save_does_not_cut_it_short(stdlib, tmp_path, monkeypatch):
    """Ctrl-C at step 3, then another Ctrl-C while that step is being saved: the save completes (the checkpoint on
    disk is step 3), then the interrupt goes on."""
    train, _ = stdlib
    model, mcfg = tiny()
    trainer = Trainer(model, mcfg, TOK, train, None, small_run(steps=6), out_dir=tmp_path / "ck", progress=False,
                      log=lambda s: None)
    real_step, real_save = trainer.train_step, checkpoints.save

    def step_then_interrupt():
        loss = real_step()
        if trainer.step == 3:
            raise KeyboardInterrupt
        return loss

    def save_with_a_second_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **k)

    monkeypatch.setattr(trainer, "train_step", step_then_interrupt)
    monkeypatch.setattr(checkpoints, "save", save_with_a_second_ctrl_c)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default handler here")
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert checkpoints.read_trainer_state(tmp_path / "ck")["step"] == 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_runs_the_forward_under_autocast_and_float16_scales_the_loss(stdlib, tmp_path, dtype):
    """--dtype: the mixers compute in that dtype on CPU too (weights stay float32), the loss goes down; float16's
    loss scaler is saved with the checkpoint and restored on resume."""
    train, val = stdlib
    seen = set()
    model, mcfg = tiny()
    model.backbone.layers[0].mixer.in_proj.register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    cfg = small_run(steps=6, dtype=dtype, eval_every=3)
    trainer = Trainer(model, mcfg, TOK, train, val, cfg, out_dir=tmp_path / "a", progress=False, log=lambda m: None)
    trainer.fit(until_step=3)
    assert seen == {getattr(torch, dtype)} and model.lm_head.weight.dtype == torch.float32
    state = trainer.state_dict()
    assert ("grad_scaler" in state) == (dtype == "float16")
    trainer.fit()
    losses = [loss for _, loss, *_ in trainer.eval_history]
    assert losses[-1] < losses[0]
    model2, mcfg2, tok, saved = checkpoints.load(tmp_path / "a")
    resumed = Trainer(model2, mcfg2, tok, train, val, cfg, state=saved, progress=False, log=lambda m: None)
    assert resumed.step == 6 and (resumed.scaler is not None) == (dtype == "float16")
    if dtype == "float16":
        assert resumed.scaler.get_scale() == trainer.scaler.get_scale()


def test_unknown_dtype_is_refused():
    with pytest.raises(UserError, match="dtype .* must be one of auto, float32, bfloat16, float16, got 'int8'"):
        TrainConfig(dtype="int8")


def test_metrics_jsonl_grows_as_training_goes_and_a_resume_drops_the_lines_after_its_checkpoint(stdlib, tmp_path):
    train, val = stdlib
    model, mcfg = tiny()
    cfg = small_run(steps=8, eval_every=2, save_every=4)
    log = tmp_path / "ck" / "metrics.jsonl"
    trainer = Trainer(model, mcfg, TOK, train, val, cfg, out_dir=tmp_path / "ck", progress=False, log=lambda m: None)
    trainer.fit(until_step=5)           # saved at step 4 (save_every) and 5 (end of fit)
    # a line the checkpoint does not cover (as if the run had gone on past its last save, then died)
    trainer.metrics.add(step=6, train_loss=1.0, lr=0.0, grad_norm=0.0, tokens_per_s=0.0, elapsed_s=0.0)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = [r["step"] for r in rows if "train_loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 2, 4, 5]
    first = next(r for r in rows if "train_loss" in r)
    assert set(first) == {"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}
    assert first["train_loss"] == trainer.train_history[0][1] and first["lr"] > 0 and first["grad_norm"] > 0
    model, mcfg, tok, state = checkpoints.load(tmp_path / "ck")           # the checkpoint of step 5
    resumed = Trainer(model, mcfg, tok, train, val, cfg, state=state, out_dir=tmp_path / "ck", progress=False,
                      log=lambda m: None)
    resumed.fit()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows if "train_loss" in r] == list(range(1, 9))
