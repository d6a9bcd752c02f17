"""Distributed training on CPU with gloo (docs/distributed.md): every mode equals the one-process model.

Real process groups: workers are spawned processes that join one group, each builds the same one-device model and
batch, computes the reference itself, then the parallel version on its mesh, and reports the relative errors of
the loss, its own logits and every parameter gradient (gathered to one-device form), and of a few AdamW steps.
A launcher with a deadline fails a test that hangs instead of hanging the suite.
"""

from __future__ import annotations

import copy
import json
import re
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from conftest import child_env, rel_err
from mamba2.config import Mamba2Config
from mamba2.distributed.parallelize import ParallelDims

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5   # fp32, reductions in another order (the budget)
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")


# ---------------------------------------------------------------------------------------------- launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, queue, args):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:
        queue.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes; return the results by rank (an exception
    text for a rank that raised). Fails if any rank is still running after ``timeout`` seconds."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, queue, args)) for r in range(world)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"ranks {sorted(set(range(world)) - set(results))} of {world} hung (> {timeout} s)")
            try:
                rank, status, value = queue.get(timeout=min(left, 5.0))
            except Exception:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead:
                    pytest.fail(f"ranks {dead} died without reporting")
                continue
            results[rank] = value if status == "ok" else RuntimeError(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


# ---------------------------------------------------------------------------------------------- models
def _config(ngroups: int = 1, **kw) -> Mamba2Config:
    # nheads = 2 * 32 / 8 = 8; chunk 8 does not divide the 37 tokens or their pieces
    return Mamba2Config(**{**dict(d_model=32, n_layer=2, d_state=8, headdim=8, expand=2, ngroups=ngroups,
                                  chunk_size=8, vocab_size=96), **kw})


def _variant(v) -> Mamba2Config:
    """A mode's model: an int is ngroups; "hybrid" has SwiGLU MLPs and an attention layer (grouped KV heads,
    rotary, a conv over q/k/v)."""
    if v == "hybrid":
        return _config(1, layout=("mamba2+mlp", "attention+mlp"), d_intermediate=48, attn_num_heads=4,
                       attn_num_heads_kv=2, attn_d_conv=4, attn_rotary_dim=4)
    return _config(v)


def _batch(seed: int = 1, rows: int = 4, L: int = 37):
    """A global batch of packed documents whose boundaries fall inside and across the CP pieces."""
    from mamba2.data import IGNORE_INDEX, Batch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (rows, L + 1), generator=g)
    cuts = torch.sort(torch.randint(1, L, (rows, 3), generator=g), dim=1).values
    seq = (torch.arange(L + 1)[None, :, None] >= cuts[:, None, :]).sum(-1)
    targets = ids[:, 1:].clone()
    targets[seq[:, 1:] != seq[:, :-1]] = IGNORE_INDEX
    return Batch(ids[:, :-1], targets, seq[:, :-1].to(torch.int32))


def _compare(rank, world, modes, device="cpu"):
    """For each (tp, cp, ngroups or "hybrid"): errors of the parallel loss, logits, gradients and 3 optimizer steps.

    On "cuda" (the kernels compiled; gloo moves the CUDA tensors) FSDP2 is left out, gloo having no reduce-scatter:
    the gradients are summed over dp × cp here instead."""
    import torch.distributed as dist

    from mamba2.data import IGNORE_INDEX
    from mamba2.distributed.checkpoint import full_model_state, one_device
    from mamba2.distributed.parallelize import parallelize, split_rows, split_tokens
    from mamba2.distributed.runtime import Parallel
    from mamba2.models.lm import Mamba2LM

    out = {}
    for tp, cp, ngroups in modes:
        torch.manual_seed(0)
        ref = Mamba2LM(_variant(ngroups)).to(device)
        model = copy.deepcopy(ref)
        batch = _batch()
        n_targets = int((batch.targets != IGNORE_INDEX).sum())
        par = Parallel.start(torch.device("cpu"), tp=tp, cp=cp)
        par.device = torch.device(device)
        fsdp = device == "cpu"
        model = parallelize(model, par.dims, par.mesh, fsdp=fsdp)
        batch = batch.to(device)
        same_weights = all(torch.equal(v, ref.state_dict()[k].cpu()) for k, v in full_model_state(model).items())
        # the optimizer first: after a forward, FSDP2's root module holds its unsharded parameters
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
        local = par.local_batch(batch)
        with torch.no_grad():
            ref_logits = ref(batch.input_ids, seq_idx=batch.seq_idx, check_ids=False)
            logits = model(local.input_ids, seq_idx=local.seq_idx, check_ids=False)
        rows = split_rows(par.dims, par.mesh, batch.input_ids.shape[0])
        cols = split_tokens(par.dims, par.mesh, batch.input_ids.shape[1])
        errs = {"weights": 0.0 if same_weights else math.inf,
                "logits": rel_err(logits.detach(), ref_logits[rows, cols].detach())}
        # gradients and optimizer steps
        losses, ref_losses = [], []
        for step in range(3):
            b = _batch(seed=10 + step) if step else batch
            ref_opt.zero_grad()
            b = b.to(device)
            ref_loss = ref.loss(b.input_ids, b.targets, seq_idx=b.seq_idx, check_ids=False)
            ref_loss.backward()
            opt.zero_grad()
            n = int((b.targets != IGNORE_INDEX).sum()) if step else n_targets
            loss = par.loss(model, par.local_batch(b.to(device)), n)
            loss.backward()
            if not fsdp:
                for p in model.parameters():
                    dist.all_reduce(p.grad, group=par.data_group)
                    p.grad /= par.dims.dp * par.dims.cp
            if step == 0:
                names = [k for k, _ in ref.named_parameters()]
                grads = one_device(model, {k: p.grad for k, p in model.named_parameters()})
                errs["grads"] = max(rel_err(grads[k], dict(ref.named_parameters())[k].grad) for k in names)
            ref_losses.append(float(ref_loss.detach()))
            losses.append(par.sum(float(loss.detach())) / (par.dims.dp * par.dims.cp))
            ref_opt.step()
            opt.step()
        errs["losses"] = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        final = full_model_state(model)
        errs["weights_after"] = max(rel_err(final[k], v.detach().cpu()) for k, v in ref.state_dict().items())
        out[(tp, cp, ngroups)] = errs
        dist.barrier()
    return out


def _check(results, modes, tol=TOL):
    for rank, r in enumerate(results):
        if isinstance(r, Exception):
            raise r
        for mode in modes:
            errs = r[mode]
            assert errs["weights"] == 0.0, f"rank {rank} tp/cp/ngroups {mode}: sharding changed the weights"
            bad = {k: v for k, v in errs.items() if not v <= tol}
            assert not bad, f"rank {rank}, (tp, cp, ngroups) = {mode}: relative errors {bad} > {tol}"


WORLD2 = [(2, 1, 1), (2, 1, 2), (2, 1, "hybrid"), (1, 2, 1), (1, 2, 2), (1, 2, "hybrid"), (1, 1, 1)]
# TP 2, CP 2, FSDP2 2
WORLD4 = [(4, 1, 4), (4, 1, 1), (1, 4, 1), (1, 4, "hybrid"), (1, 1, 1), (2, 1, 1), (2, 2, 2), (2, 2, "hybrid"),
          (1, 2, 1)]
# (tp, cp, ngroups): TP 4, CP 4, FSDP2 4, TP 2 x FSDP2 2, TP 2 x CP 2, CP 2 x FSDP2 2


def test_two_ranks_equal_one_device():
    _check(run_ranks(_compare, 2, WORLD2), WORLD2)


def test_four_ranks_equal_one_device():
    _check(run_ranks(_compare, 4, WORLD4), WORLD4)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs MAMBA2_TEST_DEVICE=cuda (a GPU)")
def test_two_ranks_on_one_gpu_equal_one_device():
    """The Triton kernels inside TP and CP (final-state gradients, the conv over a halo): two ranks share the GPU,
    gloo moves the CUDA tensors. Budget of a GPU kernel against its reference in fp32 with TF32 (docs/design.md)."""
    modes = [(2, 1, 1), (2, 1, "hybrid"), (1, 2, 1), (1, 2, 2), (1, 2, "hybrid")]
    _check(run_ranks(_compare, 2, modes, "cuda"), modes, tol=3e-3)


# ---------------------------------------------------------------------------------------------- collectives
def _count_collectives(rank, world):
    from torch.distributed.tensor.debug import CommDebugMode

    from mamba2.distributed.runtime import Parallel
    from mamba2.models.lm import Mamba2LM

    counts = {}
    for ngroups in (2, 1):
        torch.manual_seed(0)
        par = Parallel.start(torch.device("cpu"), tp=world)
        model = par.parallelize(Mamba2LM(_config(ngroups, n_layer=3)))
        ids = torch.randint(0, 96, (2, 16))
        with CommDebugMode() as mode:
            model(ids, check_ids=False)
        counts[ngroups] = {str(k): v for k, v in mode.get_comm_counts().items()}
    return counts


def test_tensor_parallel_forward_has_one_all_reduce_per_block():
    for r in run_ranks(_count_collectives, 2):
        if isinstance(r, Exception):
            raise r
        assert r[2] == {"c10d.allreduce_": 3}, r            # 3 blocks, ngroups % tp == 0
        assert r[1] == {"c10d.allreduce_": 6}, r            # ngroups == 1: + the norm's sum of squares


# ---------------------------------------------------------------------------------------------- bad configurations
def _bad_world(rank, world):
    from mamba2.distributed.runtime import Parallel

    try:
        Parallel.start(torch.device("cpu"), tp=2, cp=2)
    except ValueError as e:
        return str(e)
    return None


def test_bad_world_size_raises_the_same_error_on_every_rank():
    msgs = run_ranks(_bad_world, 3, timeout=60)
    assert all(m == msgs[0] for m in msgs) and "world size 3, tp 2, cp 2" in msgs[0], msgs


def _peer_leaves(rank, world):
    import torch.distributed as dist

    from mamba2.distributed.runtime import lost_peer

    dist.init_process_group("gloo")
    if rank == 1:
        return "left"            # its group is torn down at once, while rank 0 waits in a collective
    try:
        dist.all_reduce(torch.ones(4))
    except RuntimeError as e:
        return lost_peer(e), lost_peer(RuntimeError("Tensors must be the same size")), str(e)[:200]
    return "the collective did not fail"


def test_a_collective_whose_peer_is_gone_is_told_apart():
    """gloo's real error when the peer is gone is recognised; this rank's own failures are not taken for it."""
    import torch.distributed as dist

    from mamba2.distributed.runtime import lost_peer

    results = run_ranks(_peer_leaves, 2, timeout=120)
    assert results[1] == "left" and isinstance(results[0], tuple), results
    assert results[0][:2] == (True, False), results[0]
    own = [RuntimeError("Caught ConnectionResetError in DataLoader worker process 0: Connection reset by peer")]
    if hasattr(dist, "DistBackendError"):
        own += [dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, unhandled cuda error, out of memory"),
                dist.DistBackendError("NCCL error: invalid usage")]
    assert not any(lost_peer(e) for e in own)
    assert lost_peer(RuntimeError("NCCL error: remote process exited or there was a network error"))


def test_a_lost_rank_ends_train_with_one_line(monkeypatch, capsys):
    """The surviving ranks of a run whose other rank was killed said so in a 40-line gloo traceback."""
    from mamba2 import cli

    class Alone:
        device, main, rank = torch.device("cpu"), True, 3

        def close(self, together):
            assert not together

    def lose(*_):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:47261. This "
                           "is typically caused by a remote worker crashing.")

    monkeypatch.setattr(cli, "_start_parallel", lambda args, device: Alone())
    monkeypatch.setattr(cli, "_train", lose)
    assert cli.main(["train", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: rank 3: another rank of the run is gone") and "--resume" in err, err
    assert "\n" not in err and "Connection closed by peer" in err


def test_rank_0_refused_by_the_out_lock_closes_every_rank_together(tmp_path, monkeypatch, capsys):
    """Rank 0 refused by --out's lock: every rank raises the refusal it broadcast, and they close together (a rank
    that skipped the barrier was SIGTERMed by torchrun while it tore down: "exitcode -15")."""
    pytest.importorskip("fcntl")
    from mamba2 import cli, fsutil

    closed = []

    class Rank0:
        device, main, rank = torch.device("cpu"), True, 0

        def broadcast(self, obj=None):
            return obj

        def close(self, together):
            closed.append(together)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_start_parallel", lambda args, device: Rank0())
    with fsutil.locked("run", busy=str):
        assert cli.main(["train", "--device", "cpu", "--out", "run", "--no-sample"]) == 2
    assert closed == [True]
    assert capsys.readouterr().err.startswith("error: another process is training into run (.run.lock is locked)")


@pytest.mark.parametrize("config, dims, match", [
    (_config(1, expand=3), ParallelDims(tp=8), "nheads % tp == 0 required, got nheads=12, tp=8"),
    (_config(3, expand=3), ParallelDims(tp=2), "ngroups % tp == 0 or ngroups == 1 required, got ngroups=3, tp=2"),
    (_config(1, layout=("mamba2", "attention"), attn_num_heads=4, attn_num_heads_kv=1), ParallelDims(tp=2),
     "attn_num_heads_kv % tp == 0 required, got 4 and 1 heads, tp=2"),
    (_config(1, layout=("mamba2+mlp", "mamba2"), d_intermediate=50), ParallelDims(tp=4), "d_intermediate % tp == 0"),
    (_config(1, layout=("mamba2", "mamba1")), ParallelDims(cp=2), "also has mamba1 layers"),
])
def test_bad_model_for_the_mesh_raises(config, dims, match):
    with pytest.raises(ValueError, match=match):
        dims.check_model(config)


def test_bad_mesh_sizes_raise():
    with pytest.raises(ValueError, match="world size 6, tp 4"):
        ParallelDims.for_world(6, tp=4)
    with pytest.raises(ValueError, match="tp must be an integer >= 1"):
        ParallelDims.for_world(4, tp=0)
    with pytest.raises(ValueError, match="batch_size % dp == 0 required, got batch_size=3, dp=2"):
        ParallelDims(dp=2).check_batch(3, 64, 4)
    with pytest.raises(ValueError, match="3 tokens per rank: seq_len=8, cp=4"):
        ParallelDims(cp=4).check_batch(4, 8, 4)
    assert ParallelDims.for_world(8, tp=2, cp=2) == ParallelDims(2, 2, 2)


# ---------------------------------------------------------------------------------------------- the command
def _env():
    return child_env(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _torchrun(n: int, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
            str(_free_port()), "-m", "mamba2", "train", *map(str, args)]


def test_the_multi_gpu_benchmark_runs_dry_on_gloo_and_its_report_checks_the_cost_model(tmp_path):
    """benchmarks/distributed_gpu.py (issue 13) end to end on CPU processes at world 1 and 2, then
    distributed_report.py: every layout within budget, and the TP forward's collectives as the profiler saw them
    are what docs/distributed.md §5 predicts (two all-reduces: out_proj's output and the norm's sum of squares)."""
    results = []
    for n in (1, 2):
        out = tmp_path / f"d{n}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(_free_port()), str(REPO / "benchmarks" / "distributed_gpu.py"), "--device", "cpu", "--small",
               "--reps", "1", "--out", str(out)]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(out)
    rows = json.loads(results[1].read_text())["rows"]
    tp = next(r for r in rows if r["part"] == "tp")
    assert tp["forward"]["collectives"] == {"all_reduce": 2}, tp
    assert tp["forward"]["payload_bytes"] == tp["forward_payload_model"] > 0, tp
    assert tp["backward"]["collectives"] == {"all_reduce": 3} and 0 < tp["comm_share"] < 1, tp
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "distributed_report.py"), *map(str, results),
                           "--out", str(tmp_path / "report")], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "report" / "distributed.md").read_text()
    assert text.count("| yes |") == 6 and "**no**" not in text, text
    est = r"(≈ )?{} MB( \(element sizes not recorded\))?"     # torch 2.11's profiler records no dtypes
    assert re.search(r"\| 2 × all_reduce; {} \| 0\.033 MB \| 3 × all_reduce; {} \|".format(
        est.format(r"0\.033"), est.format(r"0\.050")), text), text
    assert (tmp_path / "report" / "distributed.png").stat().st_size > 10_000


def _history(run: Path) -> list[tuple[int, float]]:
    return [tuple(x) for x in torch.load(run / "trainer_state.pt", weights_only=True)["train_history"]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    text = (REPO / "mamba2" / "training.py").read_text() + (REPO / "mamba2" / "data.py").read_text()
    (root / "corpus.txt").write_text(text)
    return root


ARGS = ("--corpus", "corpus.txt", "--preset", "tiny", "--batch-size", 4, "--seq-len", 32, "--eval-every", 0,
        "--save-every", 1, "--no-sample", "--device", "cpu", "--steps")   # gloo, also on a GPU machine
STEPS = 12


def test_killed_run_resumes_on_four_ranks_and_on_one(corpus):
    """A 2-rank run killed (SIGKILL to every process) after some checkpoint continues on 4 ranks and on 1 with the
    losses of the uninterrupted one-process run."""
    ref = subprocess.run([sys.executable, "-m", "mamba2", "train", *map(str, ARGS), str(STEPS), "--out", "ref"],
                         cwd=corpus, env=_env(), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _history(corpus / "ref")
    assert len(want) == STEPS

    proc = subprocess.Popen(_torchrun(2, *ARGS, STEPS, "--out", "run"), cwd=corpus, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    state = corpus / "run" / "trainer_state.pt"
    while not (state.is_file() and _saved_step(state) >= 2) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)       # the launcher dies; its workers (sessions of their own) must follow
    proc.wait()
    deadline = time.monotonic() + 20
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    orphans = [w for w in workers if _running(w)]
    for w in orphans:
        os.kill(w, signal.SIGKILL)
    assert not orphans, "workers kept running after torchrun was killed"
    killed_at = _saved_step(state)
    assert 2 <= killed_at < STEPS, (f"the run was not stopped mid-training (saved step {killed_at}); its stderr:\n"
                                    f"{proc.stderr.read()[-3000:]}")
    assert (corpus / "run" / "distributed").is_dir()
    subprocess.run(["cp", "-r", "run", "run1"], cwd=corpus, check=True)

    for n, run in ((4, "run"), (1, "run1")):
        cmd = (_torchrun(n, "--resume", "--out", run, "--no-sample", "--device", "cpu") if n > 1 else
               [sys.executable, "-m", "mamba2", "train", "--resume", "--out", run, "--no-sample", "--device", "cpu"])
        res = subprocess.run(cmd, cwd=corpus, env=_env(), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resuming {run} at step {killed_at} of {STEPS}" in res.stdout
        got = _history(corpus / run)
        assert [s for s, _ in got] == list(range(1, STEPS + 1))
        worst = max(abs(a - b) / b for (_, a), (_, b) in zip(got, want))
        assert worst <= TOL, f"{n} rank(s) after a kill at step {killed_at}: loss differs by {worst:.2e} (rel)"


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_to_one_rank_during_evaluation_stops_every_rank_after_the_same_step(corpus):
    """SIGINT reaching one worker while the ranks evaluate (every step) or save: every rank stops after the same
    step and the checkpoint of that step is written (before, the rank that raised at once left the others
    waiting in a collective)."""
    proc = subprocess.Popen(_torchrun(2, "--corpus", "corpus.txt", "--preset", "tiny", "--batch-size", 4,
                                      "--seq-len", 32, "--eval-every", 1, "--save-every", 3, "--no-sample",
                                      "--device", "cpu", "--steps", 10_000, "--out", "sig"),
                            cwd=corpus, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    state, deadline = corpus / "sig" / "trainer_state.pt", time.monotonic() + 240
    while not (state.is_file() and _saved_step(state) >= 3) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    worker = _descendants(proc.pid)[-1]
    os.kill(worker, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the ranks hung after a Ctrl-C to one of them")
    saved = _saved_step(state)
    assert f"interrupted at step {saved}; checkpoint saved" in err, err[-3000:]
    assert saved < 10_000


def _saved_step(state: Path) -> int:
    try:
        return int(torch.load(state, weights_only=True)["step"])
    except Exception:       # replaced between the check and the read
        return -1


def test_tp_and_cp_without_torchrun_say_how_to_launch(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mamba2", "train", "--tp", "2", "--out", "x"],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "launch with torchrun" in res.stderr and "Traceback" not in res.stderr
