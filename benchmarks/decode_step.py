"""Host and device time of one decode step of the LM (GPU), with the fused Mamba-2 decode kernel and without.

How much of a token the Python side costs, and what the fused decode kernel (mamba2/layers/triton/decode.py:
in_proj, one kernel, out_proj per layer) saves against the unfused kernels.

Modes (``--modes``), each over batch sizes ``--batch`` and ``--steps`` greedy steps (the sampled token fed back on
the device):

* ``forward``: one prefill of ``--prompt`` tokens, then ``model(ids, cache=...)`` one token at a time (the plain
  cached forward; it does not use the slot-pool step, so it has one variant only);
* ``pool``: ``model.decode_step`` on a slot pool (the serving engine's step), eager;
* ``graph``: the same step replayed from a CUDA graph (what the engine runs on a GPU).

``pool`` and ``graph`` run once per variant (``--variants``): ``fused`` (the default code path: in_proj, one
fused kernel, out_proj per layer), ``unfused`` (the previous path: conv update, SSD step and gated norm kernels,
selected by the tuning ``mixer=dict(FUSED=False)``), and ``fused BP=<n>`` for each ``--fused-bp n`` (the fused
kernel with n channels of a head per program instead of the automatic choice). Figures per step, medians:

* ``host_ms``: wall time of the Python call alone (the launches, or the graph replay call);
* ``wall_ms``: wall time of a step including ``torch.cuda.synchronize()`` (what a user waits per token);
* ``gpu_ms``: CUDA-event time of one step (graph: one replay);
* ``loop_ms``: wall time per step of ``--steps`` steps issued back to back, one synchronisation at the end
  (throughput when the host runs ahead); ``us_layer``: gpu_ms per layer in µs.

Before timing, a check per batch size (unless ``--no-check``): from the same random pool (rows in permuted order)
four steps with the fused kernel and with the unfused kernels (relative error of logits and states), the fused
step replayed from a CUDA graph against the same step run eagerly (bitwise equal expected: the kernel has no
float atomics), and the fused kernel's arrival counters zero afterwards. These exercise the kernel's
cross-program ordering on a real GPU, which the interpreted tests cannot.

Runs any checkout of the package: ``PYTHONPATH=<dir with an older mamba2> python benchmarks/decode_step.py``
measures that version with the same command (the ``check_ids`` argument is passed only where the forward
has it; without the fused kernel there is one variant, ``default``). Prints a table and writes JSON to ``--out``.

    python benchmarks/decode_step.py --preset 130m --batch 1 16 --out $OUT/decode_step.json
    python benchmarks/decode_step.py --preset 130m 2.7b --modes graph --batch 1 16 64 --fused-bp 16 32 \\
        --out $OUT/decode_fused.json
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import statistics
import time

import torch

import mamba2
from mamba2 import Mamba2Config, Mamba2LM


def measure(model: Mamba2LM, batch: int, prompt: int, steps: int) -> dict:
    fast = "check_ids" in inspect.signature(model.forward).parameters
    kw = {"check_ids": False} if fast else {}
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, prompt), device="cuda")
    host, wall, gpu = [], [], []
    with torch.inference_mode():
        cache = model.empty_cache(batch)
        nxt = model(ids, cache=cache, logits_to_keep=1)[:, -1, :V].argmax(-1)   # never a padded row
        for i in range(steps + 5):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            nxt = model(nxt[:, None], cache=cache, **kw)[:, -1, :V].argmax(-1)
            end.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 5:   # warm-up steps dropped
                host.append((t1 - t0) * 1e3)
                wall.append((t2 - t0) * 1e3)
                gpu.append(start.elapsed_time(end))
    return {"batch": batch, "prompt": prompt, "steps": steps, "check_ids_arg": fast,
            "host_ms": statistics.median(host), "wall_ms": statistics.median(wall),
            "gpu_ms": statistics.median(gpu)}


def variants(fused_bp: list[int]) -> list[tuple[str, object]]:
    """(name, context-manager factory) of each decode-step code path to time; one ``default`` where this checkout
    of the package has no fused decode kernel."""
    try:
        from mamba2.layers.triton.decode import TUNING
    except ImportError:
        return [("default", contextlib.nullcontext)]
    out = [("unfused", lambda: TUNING.tuned(mixer=dict(FUSED=False))),
           ("fused", lambda: TUNING.tuned(mixer=dict(FUSED=True)))]
    for bp in fused_bp:
        out.append((f"fused BP={bp}", lambda bp=bp: TUNING.tuned(mixer=dict(FUSED=True), fused=dict(BP=bp))))
    return out


def random_pool(model: Mamba2LM, rows: int, seed: int = 0):
    """A slot pool of ``rows`` rows holding random states (decode work does not depend on the values; the check
    needs non-zero ones)."""
    pool = model.empty_cache(rows)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for st in pool.layers:
        for name in ("conv", "ssm"):
            t = getattr(st, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_(torch.randn(t.shape, generator=gen, device="cuda") * 0.5)
    return pool


def _capture(step):
    """A CUDA graph of ``step()`` (warmed up on a side stream first, as the serving engine does)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def measure_pool(model: Mamba2LM, batch: int, steps: int, graph: bool, ctx) -> dict:
    """``decode_step`` on a slot pool (one scratch row more than the batch, like the engine's), eager or replayed
    from a CUDA graph, under the variant context ``ctx``."""
    V = model.config.vocab_size
    host, wall, gpu = [], [], []
    with torch.inference_mode(), ctx():
        pool = random_pool(model, batch + 1)
        slots = torch.arange(batch, device="cuda")
        ids = torch.randint(0, V, (batch,), device="cuda")

        def step():
            ids.copy_(model.decode_step(ids, pool, slots)[:, :V].argmax(-1))

        if graph:
            call = _capture(step).replay
        else:
            for _ in range(3):
                step()
            call = step
        for i in range(steps + 5):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            call()
            end.record()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 5:
                host.append((t1 - t0) * 1e3)
                wall.append((t2 - t0) * 1e3)
                gpu.append(start.elapsed_time(end))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            call()
        torch.cuda.synchronize()
        loop = (time.perf_counter() - t0) * 1e3 / steps
    return {"batch": batch, "steps": steps, "host_ms": statistics.median(host), "wall_ms": statistics.median(wall),
            "gpu_ms": statistics.median(gpu), "loop_ms": loop}


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_fused(model: Mamba2LM, batch: int, n: int = 4) -> dict | None:
    """Fused kernel against the unfused kernels on the GPU, and its graph replay against its eager step (module
    docstring); None where this checkout has no fused kernel."""
    vs = dict(variants([]))
    if "fused" not in vs:
        return None
    V = model.config.vocab_size
    rows = batch + 3
    gen = torch.Generator(device="cuda").manual_seed(1)
    slots = torch.randperm(rows, generator=gen, device="cuda")[:batch]       # permuted, some rows left out
    seq = torch.randint(0, V, (n, batch), generator=gen, device="cuda")
    out = {}
    with torch.inference_mode():
        for name in ("unfused", "fused"):
            pool = random_pool(model, rows, seed=2)
            with vs[name]():
                logits = torch.stack([model.decode_step(seq[t], pool, slots) for t in range(n)]).float()
            out[name] = (logits, pool)
        pool = random_pool(model, rows, seed=2)
        ids = seq[0].clone()
        res = torch.empty(n, batch, model.lm_head.out_features, device="cuda", dtype=model.lm_head.weight.dtype)
        t_buf = torch.zeros(1, dtype=torch.int64, device="cuda")
        with vs["fused"]():
            graph = _capture(lambda: res.index_copy_(0, t_buf, model.decode_step(ids, pool, slots)[None]))
        fresh = random_pool(model, rows, seed=2)                               # undo the warm-up steps
        for a, b in zip(pool.layers, fresh.layers):
            a.conv.copy_(b.conv)
            a.ssm.copy_(b.ssm)
        del fresh
        for t in range(n):
            ids.copy_(seq[t])
            t_buf.fill_(t)
            graph.replay()
        torch.cuda.synchronize()
    (lu, pu), (lf, pf) = out["unfused"], out["fused"]
    counters = [c for blk in model.backbone.layers
                for c in getattr(blk.mixer, "__dict__", {}).get("_fused_decode_counters", {}).values()]
    return {"batch": batch,
            "logits_fused_vs_unfused": _rel(lf, lu),
            "ssm_fused_vs_unfused": max(_rel(a.ssm, b.ssm) for a, b in zip(pf.layers, pu.layers)),
            "conv_fused_vs_unfused": max(_rel(a.conv.float(), b.conv.float()) for a, b in zip(pf.layers, pu.layers)),
            "graph_equals_eager": bool(torch.equal(res.float(), lf)),
            "graph_vs_eager_max_abs": (res.float() - lf).abs().max().item(),
            "graph_states_equal_eager": all(torch.equal(a.ssm, b.ssm) and torch.equal(a.conv, b.conv)
                                            for a, b in zip(pool.layers, pf.layers)),
            "counters_zero": bool(counters) and not any(bool(c.any()) for c in counters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["130m"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--modes", nargs="+", choices=["forward", "pool", "graph"], default=["forward", "pool", "graph"])
    ap.add_argument("--variants", nargs="+", default=None,
                    help="decode-step variants for the pool/graph modes (default: unfused, fused and the --fused-bp "
                    "ones)")
    ap.add_argument("--fused-bp", type=int, nargs="*", default=[],
                    help="also time the fused kernel with these fixed BP (channels of a head per program)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-check", action="store_true", help="skip the fused-vs-unfused / graph-vs-eager check")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also print where the host time of 20 steps goes "
                    "(cProfile, batch of the first --batch)")
    a = ap.parse_args()
    vs = variants(a.fused_bp)
    if a.variants is not None:
        unknown = sorted(set(a.variants) - {n for n, _ in vs})
        if unknown:
            ap.error(f"unknown variants {unknown}; this package has {[n for n, _ in vs]}")
        vs = [(n, c) for n, c in vs if n in a.variants]
    try:
        from mamba2.layers.triton.decode import TUNING as DECODE_TUNING
        tuning = DECODE_TUNING.current()
    except ImportError:
        tuning = None
    info = {"label": a.label, "package": mamba2.__file__, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "decode_tuning": tuning,
            "rows": [], "checks": []}
    for preset in a.preset:
        torch.manual_seed(0)
        model = Mamba2LM(Mamba2Config.preset(preset)).to("cuda", torch.bfloat16).eval()
        n_layer = model.config.n_layer
        if not a.no_check and ("pool" in a.modes or "graph" in a.modes):
            for b in a.batch:
                chk = check_fused(model, b)
                if chk is not None:
                    info["checks"].append({"preset": preset, **chk})
        for mode in a.modes:
            for name, ctx in ([("default", contextlib.nullcontext)] if mode == "forward" else vs):
                for b in a.batch:
                    r = (measure(model, b, a.prompt, a.steps) if mode == "forward"
                         else measure_pool(model, b, a.steps, mode == "graph", ctx))
                    r.update(preset=preset, mode=mode, variant=name, us_layer=r["gpu_ms"] * 1e3 / n_layer)
                    r.setdefault("loop_ms", None)
                    info["rows"].append(r)
        if a.profile:
            host_profile(model, a.batch[0], a.prompt)
        del model
        torch.cuda.empty_cache()
    print(f"decode step, bf16, {info['device']}, {a.label or mamba2.__file__}")
    print(f"{'preset':>6} {'mode':>7} {'variant':>12} {'batch':>5} {'host ms':>8} {'wall ms':>8} {'gpu ms':>7} "
          f"{'loop ms':>8} {'us/layer':>8}")
    for r in info["rows"]:
        loop = "-" if r["loop_ms"] is None else f"{r['loop_ms']:.3f}"
        print(f"{r['preset']:>6} {r['mode']:>7} {r['variant']:>12} {r['batch']:>5} {r['host_ms']:>8.3f} "
              f"{r['wall_ms']:>8.3f} {r['gpu_ms']:>7.3f} {loop:>8} {r['us_layer']:>8.2f}")
    for c in info["checks"]:
        print(f"check {c['preset']} batch {c['batch']}: fused vs unfused logits {c['logits_fused_vs_unfused']:.2e}, "
              f"ssm {c['ssm_fused_vs_unfused']:.2e}, conv {c['conv_fused_vs_unfused']:.2e}; graph == eager "
              f"{c['graph_equals_eager']} (max |diff| {c['graph_vs_eager_max_abs']:.2e}, states "
              f"{c['graph_states_equal_eager']}); counters zero {c['counters_zero']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)


def host_profile(model: Mamba2LM, batch: int, prompt: int, steps: int = 20) -> None:
    import cProfile
    import pstats

    kw = {"check_ids": False} if "check_ids" in inspect.signature(model.forward).parameters else {}
    V = model.config.vocab_size
    with torch.inference_mode():
        cache = model.empty_cache(batch)
        nxt = model(torch.randint(0, V, (batch, prompt), device="cuda"), cache=cache)[:, -1, :V].argmax(-1)
        for _ in range(3):
            nxt = model(nxt[:, None], cache=cache, **kw)[:, -1, :V].argmax(-1)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            nxt = model(nxt[:, None], cache=cache, **kw)[:, -1, :V].argmax(-1)
        torch.cuda.synchronize()
        prof.disable()
    print(f"--- host profile of {steps} decode steps (batch {batch}), by own time")
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
