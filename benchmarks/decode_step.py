"""Host time and device time of one decode step of the LM (GPU): how much of a token the Python side costs.

One prefill of ``--prompt`` tokens, then ``--steps`` decode steps of batch ``--batch`` (greedy, the sampled token
fed back on the device). Three figures per step, medians over the steps:

* ``host_ms``: wall time of the Python call alone (the launches; no synchronisation inside the timed call
  unless the code under test makes one);
* ``wall_ms``: wall time of a step including ``torch.cuda.synchronize()`` (what a user waits per token);
* ``gpu_ms``: CUDA-event time of the step's kernels.

Runs any checkout of the package: ``PYTHONPATH=<dir with an older mamba2> python benchmarks/decode_step.py``
measures that version with the same command (the ``check_ids`` argument is passed only where the forward
has it). Prints a table and writes JSON to ``--out``.

    python benchmarks/decode_step.py --preset 130m --batch 1 16 --out $OUT/decode_step.json
"""

from __future__ import annotations

import argparse
import inspect
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="also print where the host time of 20 steps goes "
                    "(cProfile, batch of the first --batch)")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config.preset(a.preset)).to("cuda", torch.bfloat16).eval()
    rows = [measure(model, b, a.prompt, a.steps) for b in a.batch]
    info = {"label": a.label, "package": mamba2.__file__, "preset": a.preset, "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    print(f"decode step, {a.preset} bf16, {info['device']}, {a.label or mamba2.__file__}")
    print(f"{'batch':>5} {'host ms':>8} {'wall ms':>8} {'gpu ms':>7}")
    for r in rows:
        print(f"{r['batch']:>5} {r['host_ms']:>8.2f} {r['wall_ms']:>8.2f} {r['gpu_ms']:>7.2f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(info, f, indent=1)
    if a.profile:
        host_profile(model, a.batch[0], a.prompt)


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
