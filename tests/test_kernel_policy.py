"""The kernel policy (mamba2/kernels.py): one rule decides torch or Triton for the SSD, its decode step, the conv
and both norms; ``kernels("off")`` turns every Triton path off; the mode is per thread and per asyncio task;
launch parameters are overridden only inside ``tuned`` blocks; a kernel's backward runs with the mode and
overrides of its forward, also when autograd runs it on another thread (as torch does for CUDA tensors).

The interpreted part runs in one subprocess with TRITON_INTERPRET=1 (it must be set before Triton is imported)
and counts the calls that reach each Triton entry point while a small LM runs a prefill and a decode step.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":   # the subprocess: this checkout first on the path, installed or not
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from mamba2.kernels import MODES, Tuning, keeps_context, kernels, mode  # noqa: E402

KINDS = ("ssd", "step", "conv", "norm")
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")   # cuda: the same checks with compiled kernels


def _count_calls():
    """Wrap the four Triton entry points (where the dispatchers find them) with call counters."""
    import dataclasses
    import importlib

    import mamba2.layers.conv as conv_mod
    import mamba2.layers.norm as norm_mod

    ssd_mod = importlib.import_module("mamba2.ssd")   # the attribute mamba2.ssd is the function

    calls = dict.fromkeys(KINDS, 0)

    def counted(kind, fn):
        def wrapper(*a, **k):
            calls[kind] += 1
            return fn(*a, **k)
        return wrapper

    be = ssd_mod._BACKENDS["triton"]
    ssd_mod._BACKENDS["triton"] = dataclasses.replace(be, fn=counted("ssd", be.fn), step=counted("step", be.step))
    conv_mod.causal_conv1d_triton = counted("conv", conv_mod.causal_conv1d_triton)
    norm_mod.triton_norm.gated_rms_norm = counted("norm", norm_mod.triton_norm.gated_rms_norm)
    return calls


def _script():
    import torch

    from conftest import rel_err
    from mamba2 import Mamba2Config, Mamba2LM

    torch.set_num_threads(2)
    calls = _count_calls()
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=16, headdim=8, chunk_size=16))
    model = model.to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    out = {}

    def run():
        before = dict(calls)
        with torch.no_grad():
            cache = model.empty_cache(2)
            logits = torch.cat([model(ids[:, :6], cache=cache), model(ids[:, 6:], cache=cache)], dim=1)
        return logits, {k: calls[k] - before[k] for k in KINDS}

    logits_auto, out["auto"] = run()                     # CPU tensors: "auto" never takes the kernels
    with kernels("off"):
        logits_off, out["off"] = run()
    with kernels("on"):
        logits_on, out["on"] = run()
        with kernels("off"):                              # nested: the inner mode wins, then the outer returns
            _, out["on_then_off"] = run()
        _, out["on_again"] = run()
    out["on_vs_off"] = rel_err(logits_on, logits_off)
    out["auto_equals_off"] = bool(torch.equal(logits_auto, logits_off))
    out["backward_reads"] = _backward_on_another_thread(model, ids)
    print("RESULTS " + __import__("json").dumps(out))


def _backward_on_another_thread(model, ids):
    """A training step whose forward runs under ``kernels("on")`` and tuning overrides of the SSD's and the conv's
    backward entries, and whose backward runs on a fresh thread (where torch runs a CUDA backward): the tuning
    values every backward kernel launch read, per family and entry."""
    from mamba2.kernels import Tuning as T
    from mamba2.layers.triton.conv import TUNING as conv
    from mamba2.ssd.triton.backend import TUNING as ssd

    reads, real = [], T.__getitem__

    def recorded(self, entry):
        got = real(self, entry)
        reads.append((self.family, entry, dict(got)))
        return got

    model.train()
    with kernels("on"), ssd.tuned(state_bwd=dict(BK=32)), conv.tuned(bwd=dict(BT=8)):   # defaults 64 and 16
        loss = model(ids).float().logsumexp(-1).mean()
    T.__getitem__ = recorded
    raised = []

    def backward():
        try:
            loss.backward()
        except Exception as e:  # reported in the results: a failed backward fails the test with its reason
            raised.append(repr(e)[:2000])

    try:
        t = threading.Thread(target=backward)
        t.start()
        t.join(300)
    finally:
        T.__getitem__ = real
    if raised:
        return {"error": raised[0]}
    return [r for r in reads if (r[0], r[1]) in {("ssd", "state_bwd"), ("conv", "bwd")}]


def test_off_runs_no_triton_and_auto_only_on_cuda(kernel_results):
    """On CPU "auto" takes the torch code even under TRITON_INTERPRET=1; on CUDA it takes every kernel."""
    assert kernel_results["off"] == dict.fromkeys(KINDS, 0), kernel_results["off"]
    assert kernel_results["on_then_off"] == dict.fromkeys(KINDS, 0), kernel_results["on_then_off"]
    if DEVICE == "cpu":
        assert kernel_results["auto"] == dict.fromkeys(KINDS, 0), kernel_results["auto"]
        assert kernel_results["auto_equals_off"]
    else:
        assert all(kernel_results["auto"][k] > 0 for k in KINDS), kernel_results["auto"]


def test_on_runs_every_triton_path_and_agrees(kernel_results):
    for m in ("on", "on_again"):
        assert all(kernel_results[m][k] > 0 for k in KINDS), (m, kernel_results[m])
    assert kernel_results["on_vs_off"] <= 1e-4, kernel_results["on_vs_off"]


def test_backward_kernels_run_with_the_forwards_mode_and_tuning(kernel_results):
    """The backward ran on another thread with no block of its own, and still read the forward's overrides."""
    reads = kernel_results["backward_reads"]
    assert "error" not in reads, reads
    assert {(f, e) for f, e, _ in reads} == {("ssd", "state_bwd"), ("conv", "bwd")}, reads
    assert all(params["BK"] == 32 if f == "ssd" else params["BT"] == 8 for f, _, params in reads), reads


def test_keeps_context_carries_mode_and_tuning_to_a_backward_thread():
    """A Function's backward called on a fresh thread (torch's device thread for CUDA tensors): with the decorator
    it sees the forward's mode and overrides; the same Function without it sees the defaults (what every kernel's
    backward saw on a GPU before)."""
    import torch

    table = Tuning("demo_ctx", {"bwd": dict(BK=32)})

    class Seen(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append((mode(), table["bwd"]["BK"]))
            return g * 2

    Kept = keeps_context(type("Kept", (torch.autograd.Function,), {"forward": Seen.forward,
                                                                    "backward": Seen.backward}))
    assert Kept.keeps_kernel_context and not hasattr(Seen, "keeps_kernel_context")
    for fn in (Seen, Kept):
        seen = []
        x = torch.ones(3, requires_grad=True)
        with kernels("off"), table.tuned(bwd=dict(BK=8)):
            y = fn.apply(x).sum()
        t = threading.Thread(target=y.backward)
        t.start()
        t.join(10)
        assert x.grad.tolist() == [2.0, 2.0, 2.0]
        assert seen == ([("off", 8)] if fn is Kept else [("auto", 32)]), (fn, seen)


def test_every_kernel_function_keeps_its_context():
    """Every custom autograd Function that launches kernels carries :func:`keeps_context`."""
    pytest.importorskip("triton")
    import importlib
    import inspect

    import torch

    found = []
    for name in ("mamba2.ssd.triton.backend", "mamba2.layers.triton.conv", "mamba2.layers.triton.norm",
                 "mamba2.layers.triton.mixer", "mamba2.layers.triton.selective_scan"):
        mod = importlib.import_module(name)
        for cls in vars(mod).values():
            if inspect.isclass(cls) and issubclass(cls, torch.autograd.Function) and cls.__module__ == name:
                found.append((name, cls.__name__, getattr(cls, "keeps_kernel_context", False)))
    assert len(found) == 5 and all(kept for *_, kept in found), found


def test_mode_is_per_thread():
    seen = {}
    inside, release = threading.Event(), threading.Event()

    def worker():
        with kernels("off"):
            seen["worker"] = mode()
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    seen["main"] = mode()
    release.set()
    t.join(10)
    assert seen == {"worker": "off", "main": "auto"}


def test_mode_is_per_asyncio_task():
    async def task(m, log):
        with kernels(m):
            for _ in range(3):
                await asyncio.sleep(0)      # interleave with the other task
                log.append((m, mode()))

    async def both():
        log = []
        await asyncio.gather(task("off", log), task("on", log))
        return log

    log = asyncio.run(both())
    assert len(log) == 6 and all(want == got for want, got in log), log
    assert mode() == "auto"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=r"kernels mode must be one of \('auto', 'off', 'on'\), got 'fast'"):
        with kernels("fast"):
            pass
    assert MODES == ("auto", "off", "on") and mode() == "auto"


def test_tuning_overrides_hold_only_inside_the_block():
    t = Tuning("demo", {"fwd": dict(BM=64, num_warps=4), "bwd": dict(BK=32)})
    assert t["fwd"] == {"BM": 64, "num_warps": 4}
    with t.tuned(fwd=dict(BM=16)):
        assert t["fwd"] == {"BM": 16, "num_warps": 4}
        with t.tuned(fwd=dict(num_warps=8), bwd=dict(BK=8)):
            assert t.current() == {"fwd": {"BM": 16, "num_warps": 8}, "bwd": {"BK": 8}}
        assert t["fwd"] == {"BM": 16, "num_warps": 4} and t["bwd"] == {"BK": 32}
    assert t.current() == {"fwd": {"BM": 64, "num_warps": 4}, "bwd": {"BK": 32}}
    t["fwd"].pop("BM")                                   # a caller's copy: the table is unchanged
    assert t["fwd"]["BM"] == 64
    with pytest.raises(TypeError):
        t.defaults["fwd"]["BM"] = 1                      # the shipped values are read-only
    with pytest.raises(ValueError, match="demo tuning has no entry 'scan'"):
        with t.tuned(scan=dict(BM=1)):
            pass
    with pytest.raises(ValueError, match=r"entry 'fwd' has no parameters \['STRAD'\]"):
        with t.tuned(fwd=dict(STRAD=False)):
            pass


def test_shipped_kernel_tunings_have_no_semantic_switches():
    """Every shipped launch parameter changes speed or memory only; the one that changed results (dx.STRAD) is
    gone. The interpreted kernel tests run the non-default values of the others (saved states off, small blocks,
    heads per program) against the references."""
    pytest.importorskip("triton")
    from mamba2.layers.triton.conv import TUNING as conv
    from mamba2.layers.triton.norm import TUNING as norm
    from mamba2.ssd.triton.backend import TUNING as ssd

    assert "STRAD" not in ssd["dx"]
    assert {t.family for t in (ssd, conv, norm)} == {"ssd", "conv", "norm"}


if __name__ == "__main__":
    _script()
