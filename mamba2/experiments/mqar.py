"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"; Dao & Gu 2024, §9.1 and Fig. 8).

An example of length T with K key-value pairs: the K pairs first (key, value, key, value, …; keys drawn without
replacement from ``[1, V/2)``, values from ``[V/2, V)``), then T − 2K positions of random tokens among which each
key appears once more as a query, at an even offset of the query region drawn with a power law that favours short
gaps (weight of slot g ∝ a·g^(a−1), a = ``power_a`` = 0.01). The target at a query's position is the value paired
with its key; every other position is ignored (−100). Accuracy is the share of queries whose argmax is the value.
The paper's "harder" setting has K = T/4 (every query slot holds a query).

Grid (:data:`FULL`): Mamba-2 with d_state 16, 64, 256, Mamba-1 with d_state 16 and attention, two layers each
(sequence mixers only, no MLP), widths 32…256, T ∈ {256, 512, 1024}, each model trained on a curriculum of T/4,
T/2 and T (K = length/4, one length per step in turn: training on T alone generalises worse), with the learning
rate swept over four values and the best kept. Each training batch is drawn fresh (seeded by the step), the test
set is 256 examples at T drawn from seeds no training batch uses.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba2.errors import UserError
from mamba2.experiments import grid

IGNORE = -100
NAME = "mqar"
TIMED = False       # its results are accuracies and losses: runs may share the device and a folder two devices
TEST_SEED = 2**40      # test examples use seeds from here on; training batches use seeds below 2**32
FIELDS = {"model": (str,), "width": (int,), "length": (int,), "lr": grid.NUMBER, "accuracy": grid.NUMBER,
          "device": (str,)}     # what the report reads of a record (grid.merged)


def mqar_batch(batch: int, seq_len: int, num_kv_pairs: int, *, vocab_size: int = 8192, power_a: float = 0.01,
               seed: int = 0, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` MQAR examples, a pure function of the arguments, drawn on ``device`` (with that device's random
    number generator: the same seed gives other examples on a GPU than on the CPU; on a GPU drawing them takes
    well under a millisecond where the CPU needs several).

    Returns:
        (inputs, targets), both (batch, seq_len) int64 on ``device``; targets are the value at each query position
        and −100 elsewhere.
    Raises:
        ValueError: 4·num_kv_pairs > seq_len (the queries would not fit), or num_kv_pairs ≥ vocab_size/2 − 1 (not
            enough distinct keys), or power_a outside (0, 1].
    """
    K, T, V = num_kv_pairs, seq_len, vocab_size
    if K < 1 or 4 * K > T:
        raise ValueError(f"MQAR needs 1 <= num_kv_pairs and 4 * num_kv_pairs <= seq_len, got {K} pairs, length {T}")
    if K > V // 2 - 1:
        raise ValueError(f"MQAR needs num_kv_pairs <= vocab_size // 2 - 1 distinct keys, got {K} and {V}")
    if not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a}")
    g = torch.Generator(device).manual_seed(seed)
    half = V // 2
    kw = dict(generator=g, device=device)
    keys = torch.rand(batch, half - 1, **kw).argsort(dim=1)[:, :K] + 1               # distinct, in [1, V/2)
    values = torch.rand(batch, V - half, **kw).argsort(dim=1)[:, :K] + half          # distinct, in [V/2, V)
    inputs = torch.randint(0, V, (batch, T), **kw)
    inputs[:, 0:2 * K:2], inputs[:, 1:2 * K:2] = keys, values
    slots = (T - 2 * K) // 2
    weight = power_a * torch.arange(1, slots + 1, dtype=torch.float64, device=device) ** (power_a - 1)
    gaps = torch.multinomial(weight.expand(batch, slots), K, replacement=False, generator=g)   # distinct slots
    where = 2 * K + 2 * gaps
    inputs.scatter_(1, where, keys)
    targets = torch.full((batch, T), IGNORE, dtype=torch.int64, device=device)
    targets.scatter_(1, where, values)
    return inputs, targets


@torch.no_grad()
def accuracy(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch: int = 64,
             device: str | torch.device = "cpu") -> float:
    """Share of the positions with a target (≠ −100) where the argmax of ``model(inputs)`` equals it."""
    from mamba2.evaluation import autocast_to

    device = torch.device(device)
    right = total = 0
    for i in range(0, len(inputs), batch):
        x, y = inputs[i:i + batch].to(device), targets[i:i + batch].to(device)
        with autocast_to(device, None):
            pred = model(x).argmax(-1)
        mask = y != IGNORE
        right += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return right / max(total, 1)


@dataclass(frozen=True)
class Setting:
    """A grid: models × widths × lengths × learning rates, and the training budget of each run."""
    models: tuple[str, ...]
    widths: tuple[int, ...]
    lengths: tuple[int, ...]
    lrs: tuple[float, ...]
    vocab_size: int
    steps: int
    batch_size: int
    test_examples: int
    chunk_size: int
    headdim: int


FULL = Setting(models=("mamba2-N16", "mamba2-N64", "mamba2-N256", "mamba1-N16", "attention"),
               widths=(32, 64, 128, 256), lengths=(256, 512, 1024), lrs=(1e-3, 3.2e-3, 1e-2, 3.2e-2),
               vocab_size=8192, steps=2000, batch_size=64, test_examples=256, chunk_size=64, headdim=32)
TINY = Setting(models=("mamba2-N16", "mamba1-N16", "attention"), widths=(16, 32), lengths=(32,),
               lrs=(3.2e-3, 1e-2), vocab_size=64, steps=30, batch_size=16, test_examples=32, chunk_size=16,
               headdim=16)


def model_config(model: str, width: int, setting: Setting):
    """The Mamba2Config of a grid model name (``mamba2-N<d_state>``, ``mamba1-N<d_state>``, ``attention``) at
    ``width``: two sequence-mixing layers, no MLP. Raises UserError for an unknown name."""
    from mamba2.config import Mamba2Config

    common = dict(d_model=width, n_layer=2, vocab_size=setting.vocab_size, chunk_size=setting.chunk_size,
                  headdim=min(setting.headdim, 2 * width))
    kind, _, n = model.partition("-N")
    if kind in ("mamba2", "mamba1") and n.isdigit():
        return Mamba2Config(**common, d_state=int(n), layout=(kind,) * 2)
    if model == "attention":
        return Mamba2Config(**common, layout=("attention",) * 2, attn_num_heads=max(1, width // 32))
    raise UserError(f"unknown MQAR model {model!r}: mamba2-N<d_state>, mamba1-N<d_state> or attention")


def describe(record: dict[str, Any]) -> str:
    return f"{record['key']}: accuracy {record['accuracy']:.3f}"


def runs(setting: Setting, device: str,
         done: list[dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run of the grid, and no runs waiting on others: shortest sequences first (a grid stopped early has whole
    tables for them), widest models first within a length (so workers balance)."""
    out = []
    for length in sorted(setting.lengths):
        for width in sorted(setting.widths, reverse=True):
            for model in setting.models:
                for lr in setting.lrs:
                    out.append({"key": f"{model}/w{width}/T{length}/lr{lr:g}", "model": model, "width": width,
                                "length": length, "lr": lr, "device": device,
                                "setting": dataclasses.asdict(setting)})
    return out, []


def curriculum(length: int) -> list[tuple[int, int]]:
    """(sequence length, key-value pairs) of the training batches, taken in turn: T/4, T/2 and T with K = T/4 each."""
    return [(t, t // 4) for t in (length // 4, length // 2, length) if t >= 4]


def train_one(run: dict[str, Any]) -> dict[str, Any]:
    """Train one model of the grid and measure its test accuracy at the run's length (the grid's ``fn``)."""
    from mamba2.evaluation import autocast_to
    from mamba2.models import Mamba2LM
    from mamba2.train_config import TrainConfig
    from mamba2.training import lr_at, param_groups

    setting = grid.setting_of(Setting, run)
    device = torch.device(run["device"])
    torch.manual_seed(0)
    config = model_config(run["model"], run["width"], setting)
    model = Mamba2LM(config).to(device).train()
    schedule = TrainConfig(steps=setting.steps, lr=run["lr"], warmup=max(1, setting.steps // 10), min_lr_ratio=0.0)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=run["lr"], betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    stages = curriculum(run["length"])
    t0 = time.perf_counter()
    losses = []
    for step in range(setting.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        seq_len, pairs = stages[step % len(stages)]
        x, y = mqar_batch(setting.batch_size, seq_len, pairs, vocab_size=setting.vocab_size, seed=step,
                          device=device)
        with autocast_to(device, None):
            loss = model.loss(x, y, check_ids=False, labelled_only=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == setting.steps - 1:
            losses.append((step, float(loss.detach())))
    train_s = time.perf_counter() - t0
    model.eval()
    x, y = mqar_batch(setting.test_examples, run["length"], run["length"] // 4, vocab_size=setting.vocab_size,
                      seed=TEST_SEED + run["length"], device=device)
    acc = accuracy(model, x, y, device=device)
    final = losses[-1][1]
    return {"accuracy": acc, "final_loss": final if math.isfinite(final) else None, "loss_curve": losses,
            "parameters": model.num_parameters(), "d_state": config.d_state, "train_s": round(train_s, 2)}


def best_per_cell(records: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, Any]]:
    """(model, width, length) → the record of the learning rate with the highest accuracy (a NaN one, diverged, is
    the worst)."""
    best: dict[tuple[str, int, int], dict[str, Any]] = {}
    for r in records:
        cell = (r["model"], r["width"], r["length"])
        if cell not in best or _score(r) > _score(best[cell]):
            best[cell] = r
    return best


def _score(record: dict[str, Any]) -> float:
    return record["accuracy"] if math.isfinite(record["accuracy"]) else -math.inf


def report(out: Path) -> str:
    """Merge every results file in ``out`` into ``mqar.json``, ``mqar.md`` (one table per length: best accuracy
    over the learning rates, and that rate) and ``mqar.png``; return the markdown.
    While runs of the grid are missing, the markdown opens with how many are there, and a cell whose rates are
    not all run says how many are (:func:`grid.on_plan`, :func:`grid.rates_note`).

    Raises:
        UserError: no results in ``out``, or results of different settings.
    """
    records = grid.merged(out, NAME, FIELDS)
    if not records:
        raise UserError(f"no MQAR results in {out} (files {NAME}.part*.jsonl)")
    setting = grid.setting_of(Setting, records[0])
    records, note = grid.on_plan(out, records, runs(setting, records[0]["device"]))
    if not records:
        raise UserError(f"no results of this grid's runs in {out} (files {NAME}.part*.jsonl)")
    best = best_per_cell(records)
    tried = Counter((r["model"], r["width"], r["length"]) for r in records)
    present = {r["model"] for r in records}
    models = [m for m in records[0]["setting"]["models"] if m in present]     # the grid's order: stable colours
    widths = sorted({r["width"] for r in records})
    lengths = sorted({r["length"] for r in records})
    parts = []
    for length in lengths:
        rows = []
        for m in models:
            row: list[Any] = [m]
            for w in widths:
                r = best.get((m, w, length))
                rates = f"{r['lr']:g}{grid.rates_note(tried[m, w, length], len(setting.lrs))}" if r else ""
                row.append(None if r is None else f"{r['accuracy']:.3f} ({rates})" if math.isfinite(_score(r))
                           else f"diverged ({rates})")
            rows.append(row)
        parts.append(f"**T = {length}, {length // 4} key-value pairs** — test accuracy, best over learning rates "
                     f"(that rate)\n\n" + grid.markdown_table(["model"] + [f"width {w}" for w in widths], rows))
    return grid.write_report(out, NAME, note + "\n\n".join(parts) + "\n", records,
                             _plot(best, models, widths, lengths))


def _plot(best, models, widths, lengths):
    """Accuracy against width, a panel per length; a model keeps its colour in every panel, and the legend names
    every model drawn in any panel."""
    from matplotlib.lines import Line2D

    fig, axes = grid.figure(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), dpi=110, sharey=True,
                             squeeze=False)
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    drawn: set[str] = set()
    for ax, length in zip(axes[0], lengths):
        for m in models:
            pts = [(w, best[(m, w, length)]["accuracy"]) for w in widths if (m, w, length) in best]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[m])
                drawn.add(m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"sequence length {length}")
        ax.set_xlabel("model width (d_model)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MQAR accuracy")
    axes[0][-1].legend(handles=[Line2D([], [], color=colors[m], marker="o", label=m) for m in models if m in drawn],
                       fontsize=8)
    return fig
