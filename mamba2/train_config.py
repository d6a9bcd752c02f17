"""Settings of a training run (a plain dataclass: importing it costs nothing, so ``--help`` stays fast)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from mamba2.errors import UserError


TRAIN_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class TrainConfig:
    """Optimisation settings. ``steps`` counts optimizer steps; each sees ``batch_size * grad_accum`` rows of
    ``seq_len`` tokens. Held-out evaluation runs at the start, every ``eval_every`` steps and at the end (0: only
    at the start and the end, the two figures a run reports); ``save_every`` of 0 saves only at the end.
    ``max_minutes`` (None: no limit) stops early, evaluating and saving first. ``keep_best`` also saves the
    weights of the evaluation with the lowest held-out loss so far (only with ``eval_every`` > 0: otherwise the
    last one is the only candidate).

    ``dtype`` is the compute dtype of the forward and backward under autocast (the weights, the optimizer state and
    the SSM states stay float32): ``auto`` is bfloat16 on CUDA and float32 on CPU; ``float16`` adds loss scaling.

    ``lora_rank`` > 0 trains low-rank adapters of that rank on the linear layers named ``lora_targets`` instead of
    every weight (:mod:`mamba2.lora`); ``lora_alpha`` (None: 2 × rank) scales them by ``alpha / rank``;
    ``save_adapter`` also writes the adapter alone in peft's format into each checkpoint.
    """

    steps: int = 600
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_tokens: int = 16384
    save_every: int = 0
    seed: int = 0
    max_minutes: float | None = None
    keep_best: bool = True
    dtype: str = "auto"
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = ("in_proj", "out_proj")
    lora_dropout: float = 0.0
    save_adapter: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.lora_targets = tuple(self.lora_targets)
        self.validate()

    def validate(self) -> None:
        """Raises UserError naming the first bad value."""
        checks = [
            ("steps", self.steps >= 1, "≥ 1"),
            ("batch_size", self.batch_size >= 1, "≥ 1"),
            ("seq_len", self.seq_len >= 1, "≥ 1"),
            ("grad_accum", self.grad_accum >= 1, "≥ 1"),
            # far above 1 an AdamW run only diverges (a clear error); near 1e38 torch's fp32 math overflows
            ("lr", 0 < self.lr <= 1e6, "a number in (0, 1e6]"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("warmup", self.warmup >= 0, "≥ 0"),
            ("weight_decay", self.weight_decay >= 0, "≥ 0"),
            ("betas", all(0 <= b < 1 for b in self.betas), "in [0, 1)"),
            ("grad_clip", self.grad_clip >= 0, "≥ 0 (0 disables clipping)"),
            ("eval_every", self.eval_every >= 0, "≥ 0"),
            ("eval_tokens", self.eval_tokens >= 1, "≥ 1"),
            ("save_every", self.save_every >= 0, "≥ 0"),
            ("seed", 0 <= self.seed < 2 ** 64, "an integer in [0, 2**64)"),   # numpy's data order takes 64 bits
            ("max_minutes", self.max_minutes is None or (self.max_minutes > 0 and math.isfinite(self.max_minutes)),
             "a finite number > 0"),
            ("dtype", self.dtype in TRAIN_DTYPES, f"one of {', '.join(TRAIN_DTYPES)}"),
            ("lora_rank", self.lora_rank >= 0, "≥ 0 (0: no adapters, every weight trains)"),
            ("lora_alpha", self.lora_alpha is None or (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)),
             "a finite number > 0"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("save_adapter", not self.save_adapter or self.lora_rank > 0, "used with --lora-rank"),
        ]
        for name, ok, need in checks:
            if not ok:
                raise UserError(f"{name} (--{name.replace('_', '-')}) must be {need}, got {getattr(self, name)!r}")

    @property
    def init_seed(self) -> int:
        """The seed for torch's generator (initial weights, dropout): ``seed`` itself below 2³², else a hash of it
        to 32 bits — torch's CPU generator keeps only a seed's low 32 bits, so seeds 2³² apart would otherwise
        start from the same weights. The data order (:class:`mamba2.data.PackedLoader`) takes all 64 bits."""
        if self.seed < 2 ** 32:
            return self.seed
        import hashlib

        return int.from_bytes(hashlib.blake2b(self.seed.to_bytes(8, "little"), digest_size=4).digest(), "little")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
