"""Mamba-2 language-model configuration (Dao & Gu 2024, §7 and Appendix; official mamba_ssm defaults)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Mamba2Config:
    """Sizes and options of a Mamba-2 LM. Validates itself on construction.

    Field names follow the official mamba_ssm ``MambaConfig`` / ``Mamba2`` layer arguments.

    Derived sizes: ``d_inner = expand * d_model``; ``d_ssm`` (defaults to d_inner) channels go through the SSM,
    the remaining ``d_inner - d_ssm`` form a gated-MLP branch; ``nheads = d_ssm // headdim``.

    Raises:
        ValueError: naming the broken constraint and its values (e.g. ``d_ssm % headdim``).
    """

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    d_ssm: int | None = None
    chunk_size: int = 256
    D_has_hdim: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    conv_bias: bool = True
    bias: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        self.A_init_range = tuple(float(v) for v in self.A_init_range)
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def d_ssm_(self) -> int:
        """The number of channels that go through the SSM (``d_ssm`` or ``d_inner``)."""
        return self.d_inner if self.d_ssm is None else self.d_ssm

    @property
    def d_mlp(self) -> int:
        return self.d_inner - self.d_ssm_

    @property
    def nheads(self) -> int:
        return self.d_ssm_ // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_ssm_ + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"Mamba2Config: {msg}")

        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups",
                     "chunk_size", "pad_vocab_size_multiple"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        if self.d_ssm is not None:
            need(isinstance(self.d_ssm, int) and 0 < self.d_ssm <= self.d_inner,
                 f"d_ssm must be in (0, d_inner={self.d_inner}], got {self.d_ssm!r}")
        need(self.d_ssm_ % self.headdim == 0,
             f"d_ssm % headdim == 0 required, got d_ssm={self.d_ssm_}, headdim={self.headdim}")
        need(self.nheads % self.ngroups == 0,
             f"nheads % ngroups == 0 required, got nheads={self.nheads}, ngroups={self.ngroups}")
        lo, hi = self.dt_limit
        need(len(self.dt_limit) == 2 and 0.0 <= lo < hi, f"dt_limit must be (lo, hi) with 0 <= lo < hi, got {self.dt_limit}")
        need(0 < self.dt_min <= self.dt_max, f"0 < dt_min <= dt_max required, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        need(self.dt_init_floor > 0, f"dt_init_floor must be > 0, got {self.dt_init_floor}")
        a_lo, a_hi = self.A_init_range
        need(0 < a_lo <= a_hi, f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dt_limit"] = [d["dt_limit"][0], d["dt_limit"][1] if math.isfinite(d["dt_limit"][1]) else "inf"]
        d["A_init_range"] = list(d["A_init_range"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mamba2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Mamba2Config: unknown keys {unknown}")
        d = dict(d)
        if "dt_limit" in d:
            d["dt_limit"] = tuple(float(v) for v in d["dt_limit"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Mamba2Config":
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Mamba2Config":
        """A named size: the released mamba2 sizes (``130m`` … ``2.7b``) or small CPU sizes (``tiny``, ``small``).

        Raises:
            ValueError: for an unknown name (the message lists the known ones).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_RELEASED = dict(vocab_size=50277, d_state=128, headdim=64, expand=2, ngroups=1)
PRESETS: dict[str, dict[str, Any]] = {
    # CPU sizes, byte vocabulary: for tests and the quick-start demo.
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=32),
    "small": dict(d_model=128, n_layer=4, vocab_size=256, d_state=32, headdim=32, chunk_size=64),
    "base-cpu": dict(d_model=256, n_layer=6, vocab_size=256, d_state=64, headdim=32, chunk_size=64),
    # Released mamba2 checkpoints (state-spaces/mamba2-*).
    "130m": dict(d_model=768, n_layer=24, **_RELEASED),
    "370m": dict(d_model=1024, n_layer=48, **_RELEASED),
    "780m": dict(d_model=1536, n_layer=48, **_RELEASED),
    "1.3b": dict(d_model=2048, n_layer=48, **_RELEASED),
    "2.7b": dict(d_model=2560, n_layer=64, **_RELEASED),
}
