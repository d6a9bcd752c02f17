"""Language modelling at matched size (Dao & Gu 2024, §9.2, Fig. 9 / Table 3, at small scale).

Mamba-2, Transformer++ (attention + SwiGLU MLP, rotary, RMSNorm, no biases, half the layers), Mamba-1 and a hybrid
(Mamba-2 with ~10% attention layers) are built at each size from the same fields by
:data:`mamba2.config.ARCHS` — the same builders as ``mamba2 train --arch`` — and trained on the same tokens: the
Python standard library's source (the embedded ``stdlib`` corpus, split into train and held-out by file), UTF-8
bytes as tokens, AdamW β (0.9, 0.95), weight decay 0.1, linear warmup then cosine to 10%, clip 1.0
(:class:`mamba2.training.Trainer`). The learning rate is swept per architecture at the smallest size and scaled to
the larger ones by the usual width rule, lr × d_small / d.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba2.errors import UserError
from mamba2.experiments import grid

NAME = "lm"
TIMED = False       # its results are accuracies and losses: runs may share the device and a folder two devices
FIELDS = {"arch": (str,), "size": (str,), "d_model": (int,), "lr": grid.NUMBER, "stage": (str,), "device": (str,),
          "eval_loss": grid.OPTIONAL_NUMBER, "bits_per_byte": grid.OPTIONAL_NUMBER,
          "parameters_non_embedding": (int,), "tokens_per_s": (int, type(None)),
          "curve": (list,)}     # what the report reads of a record (grid.merged)


@dataclass(frozen=True)
class Setting:
    """Architectures × sizes (name → (d_model, n_layer of the Mamba-2 model)) and one training budget for all."""
    archs: tuple[str, ...]
    sizes: tuple[tuple[str, int, int], ...]
    lrs: tuple[float, ...]
    steps: int
    batch_size: int
    seq_len: int
    evals: int
    eval_tokens: int
    d_state: int
    headdim: int
    chunk_size: int


ARCHS = ("mamba2", "transformer++", "mamba1", "hybrid")
FULL = Setting(archs=ARCHS, sizes=(("5M", 256, 12), ("15M", 384, 16), ("40M", 512, 24)),
               lrs=(1e-3, 2e-3, 4e-3, 8e-3), steps=1200, batch_size=32, seq_len=512, evals=6,
               eval_tokens=262_144, d_state=64, headdim=32, chunk_size=128)
TINY = Setting(archs=ARCHS, sizes=(("tiny", 32, 2), ("tiny2", 48, 2)), lrs=(3e-3, 1e-2), steps=8,
               batch_size=4, seq_len=64, evals=2, eval_tokens=512, d_state=16, headdim=16, chunk_size=32)


def model_config(arch: str, d_model: int, n_layer: int, setting: Setting):
    """The Mamba2Config of ``arch`` at a size (byte vocabulary), through the ``--arch`` builders."""
    from mamba2.config import ARCHS as BUILDERS
    from mamba2.config import Mamba2Config

    base = dict(d_model=d_model, n_layer=n_layer, vocab_size=256, d_state=setting.d_state, headdim=setting.headdim,
                chunk_size=setting.chunk_size)
    return Mamba2Config(**{**base, **BUILDERS[arch](base, set())})


def _run(arch: str, size: tuple[str, int, int], lr: float, device: str, setting: Setting, stage: str):
    name, d_model, n_layer = size
    return {"key": f"{arch}/{name}/lr{lr:g}", "arch": arch, "size": name, "d_model": d_model, "n_layer": n_layer,
            "lr": lr, "stage": stage, "device": device, "setting": dataclasses.asdict(setting)}


def describe(record: dict[str, Any]) -> str:
    loss = _loss(record)
    return f"{record['key']}: " + ("diverged" if loss == math.inf else f"held-out {loss:.4f}")


def _loss(record: dict[str, Any]) -> float:
    """A record's held-out loss; infinite where it diverged (None or NaN: never the best)."""
    loss = record["eval_loss"]
    return loss if loss is not None and math.isfinite(loss) else math.inf


def runs(setting: Setting, device: str, done: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The learning-rate sweep at the smallest size, then every larger size of each architecture whose sweep is
    complete in ``done`` (at its best rate, scaled by width). Returns (runs, the keys of the runs still waiting for
    their sweep, ``ARCH/SIZE/lr?``: their rate is not known yet)."""
    small = setting.sizes[0]
    out = [_run(a, small, lr, device, setting, "sweep") for a in setting.archs for lr in setting.lrs]
    finished = {r["key"]: r for r in done}
    waiting = []
    for arch in setting.archs:
        sweep = [finished.get(f"{arch}/{small[0]}/lr{lr:g}") for lr in setting.lrs]
        if any(r is None for r in sweep):
            waiting += [f"{arch}/{size[0]}/lr?" for size in setting.sizes[1:]]
            continue
        best = min(sweep, key=_loss)
        for size in setting.sizes[1:]:
            out.append(_run(arch, size, best["lr"] * small[1] / size[1], device, setting, "scaled"))
    return out, waiting


@functools.lru_cache(maxsize=1)
def _corpus():
    from mamba2.data import load_corpus
    from mamba2.tokenizer import ByteTokenizer

    return ByteTokenizer(), *load_corpus(None, ByteTokenizer())


def train_one(run: dict[str, Any]) -> dict[str, Any]:
    """Train one model of the grid; held-out loss at ``evals`` points, tokens/s of the training steps alone."""
    from mamba2.models import Mamba2LM
    from mamba2.train_config import TrainConfig
    from mamba2.training import Trainer

    setting = grid.setting_of(Setting, run)
    tokenizer, train, val = _corpus()
    torch.manual_seed(0)
    config = model_config(run["arch"], run["d_model"], run["n_layer"], setting)
    model = Mamba2LM(config)
    cfg = TrainConfig(steps=setting.steps, batch_size=setting.batch_size, seq_len=setting.seq_len, lr=run["lr"],
                      warmup=max(1, setting.steps // 20), eval_every=0, eval_tokens=setting.eval_tokens,
                      keep_best=False)
    trainer = Trainer(model, config, tokenizer, train, val, cfg, device=run["device"], progress=False,
                      log=lambda msg: None)
    tokens_per_step = setting.batch_size * setting.seq_len
    every = max(1, setting.steps // setting.evals)
    curve, train_s, timed, diverged = [], 0.0, 0, None
    # the first steps of a process compile kernels and fill caches: left out of tokens/s, or whichever architecture
    # runs first in a worker would look slower than it is
    warm = min(5, setting.steps // 4)
    try:
        while trainer.step < setting.steps:
            t0 = time.perf_counter()
            trainer.train_step()       # returns the loss as a float: the step has finished on the device
            if trainer.step > warm:
                train_s += time.perf_counter() - t0
                timed += 1
            if trainer.step % every == 0 or trainer.step == setting.steps:
                curve.append((trainer.step * tokens_per_step, trainer.evaluate().loss))
    except UserError as e:           # diverged at this learning rate: a result of the sweep, not a failure
        diverged = str(e)
    final = curve[-1][1] if curve and diverged is None else None
    return {"eval_loss": final, "perplexity": None if final is None else math.exp(final),
            "bits_per_byte": None if final is None else final / math.log(2), "curve": curve, "diverged": diverged,
            "parameters_non_embedding": model.num_parameters(exclude_embedding=True),
            "tokens": trainer.step * tokens_per_step,
            "tokens_per_s": round(timed * tokens_per_step / train_s) if train_s else None}


def report(out: Path) -> str:
    """Merge the results in ``out`` into ``lm.json``, ``lm.md`` (held-out loss per architecture and size, the sweep)
    and ``lm.png`` (held-out loss against training tokens); return the markdown.
    While runs of the grid are missing, the markdown opens with how many are there, and a cell at the smallest
    size whose sweep is not all run says how many rates are (:func:`grid.on_plan`, :func:`grid.rates_note`); one
    whose best rate is the largest or smallest of its complete sweep says so (the optimum may lie beyond it).

    Raises:
        UserError: no results in ``out``, or results of different settings.
    """
    records = grid.merged(out, NAME, FIELDS)
    if not records:
        raise UserError(f"no language-model results in {out} (files {NAME}.part*.jsonl)")
    setting = grid.setting_of(Setting, records[0])
    records, note = grid.on_plan(out, records, runs(setting, records[0]["device"], records))
    if not records:
        raise UserError(f"no results of this grid's runs in {out} (files {NAME}.part*.jsonl)")
    swept = Counter(r["arch"] for r in records if r["stage"] == "sweep")
    present = {r["arch"] for r in records}
    archs = [a for a in records[0]["setting"]["archs"] if a in present]     # the grid's order: stable colours
    sizes = list(dict.fromkeys(r["size"] for r in sorted(records, key=lambda r: r["d_model"])))
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        cell = (r["arch"], r["size"])
        if cell not in best or _loss(r) < _loss(best[cell]):
            best[cell] = r

    edges = {max(setting.lrs): "top", min(setting.lrs): "bottom"}
    at_edge: list[str] = []

    def cell(a: str, s: str):
        r = best.get((a, s))
        if r is None:
            return None
        rates = grid.rates_note(swept[a], len(setting.lrs)) if r["stage"] == "sweep" else ""
        if r["stage"] == "sweep" and not rates and _loss(r) < math.inf and len(setting.lrs) > 1 and r["lr"] in edges:
            rates = f"; {edges[r['lr']]} of the sweep"
            at_edge.append(a)
        if _loss(r) == math.inf:
            return f"diverged (lr {r['lr']:g}{rates})"
        speed = "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,}"
        share = " shared" if (r.get("workers") or 1) > 1 else ""
        return (f"{r['eval_loss']:.4f} ({r['bits_per_byte']:.3f} bpb; {r['parameters_non_embedding'] / 1e6:.2f}M; "
                f"lr {r['lr']:g}{rates}; {speed} tok/s{share})")       # the rate as in the run's key

    main = grid.markdown_table(["architecture"] + sizes, [[a] + [cell(a, s) for s in sizes] for a in archs])
    sweep = sorted((r for r in records if r["stage"] == "sweep"), key=lambda r: (r["arch"], r["lr"]))
    sweep_rows = [[r["arch"], f"{r['lr']:g}", r["eval_loss"] if _loss(r) < math.inf else "diverged"] for r in sweep]
    if at_edge:
        main += (f"\n\nThe best rate of {', '.join(at_edge)} is at an edge of the sweep: the optimum may lie beyond it, "
                 f"and the larger sizes inherit it (scaled by width).")
    shared = max(((r.get("workers") or 1) for r in best.values()), default=1)
    if shared > 1:
        note += (f"Training tokens/s marked shared were measured with up to {shared} runs sharing the device at "
                 f"once: that run's share, not its speed alone.\n\n")
    devices = sorted({r["device"] for r in best.values()})
    if len(devices) > 1:
        note += (f"Training tokens/s were measured on {len(devices)} devices ({', '.join(devices)}): compare rates "
                 f"of one device only (each run's device is in {NAME}.json).\n\n")
    text = (note + "Held-out loss (nats/byte) after the same tokens, best learning rate per cell (bits per byte; "
            "non-embedding parameters; learning rate; training tokens/s)\n\n" + main +
            "\n\nLearning-rate sweep at the smallest size\n\n" +
            grid.markdown_table(["architecture", "lr", "held-out loss"], sweep_rows) + "\n")
    return grid.write_report(out, NAME, text, records, _plot(best, archs, sizes))


def _plot(best, archs, sizes):
    """Held-out loss against tokens: a colour per architecture, a line style per size (the legend names both)."""
    from matplotlib.lines import Line2D

    fig, ax = grid.figure(figsize=(7, 4.5), dpi=110)
    colors = dict(zip(archs, [f"C{i}" for i in range(10)]))
    styles = dict(zip(sizes, itertools.cycle(["-", "--", ":", "-."])))
    drawn: set[tuple[str, str]] = set()
    for a in archs:
        for s in sizes:
            r = best.get((a, s))
            if r is not None and r["curve"] and _loss(r) < math.inf:
                tokens, losses = zip(*r["curve"])
                ax.plot(tokens, losses, styles[s], marker="o", markersize=3, color=colors[a])
                drawn.add((a, s))
    handles = [Line2D([], [], color=colors[a], marker="o", linestyle="none", label=a)
               for a in archs if a in {d[0] for d in drawn}]
    handles += [Line2D([], [], color="0.3", linestyle=styles[s], label=f"size {s}")
                for s in sizes if s in {d[1] for d in drawn}]
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.set_title("Matched-size language models on the stdlib corpus")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, ncol=2)
    return fig
