"""Language-model configuration: Mamba-2 (Dao & Gu 2024, §7 and Appendix; official mamba_ssm defaults), and the
layer layouts that make the same LM a hybrid, Transformer++ or Mamba-1 (§9.2, see :mod:`mamba2.layout`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from mamba2.layout import LayerSpec, evenly_spaced, layer_specs, parse_layout

LEGACY_KEYS: dict[str, Any] = {"extra": {}}
"""Keys that older versions wrote into config.json with this value and that mean nothing now: dropped on load."""


@dataclass(frozen=True)
class Resolved:
    """The optional sizes of a :class:`Mamba2Config` with their defaults filled in (``config.resolved``)."""

    d_ssm: int
    """Channels through the SSM (``d_ssm``, or ``d_inner``)."""
    dt_rank: int
    """Mamba-1 rank of the dt projection (``dt_rank``, or ``ceil(d_model / 16)``)."""
    attn_num_heads: int
    """Attention heads (``attn_num_heads``, or one per 64 channels of d_model)."""
    attn_num_heads_kv: int
    """Key/value heads (``attn_num_heads_kv``, or as many as query heads)."""
    attn_head_dim: int
    """Attention head size (``attn_head_dim``, or ``d_model // heads``)."""
    attn_rotary_dim: int
    """Rotary dimensions per head (``attn_rotary_dim``, or the whole head; 0: none)."""


@dataclass
class Mamba2Config:
    """Sizes and options of a Mamba-2 LM. Validates itself on construction.

    Field names follow the official mamba_ssm ``MambaConfig`` / ``Mamba2`` layer arguments.

    One config type describes every architecture the LM builds (Mamba-2, Mamba-1, Transformer++, hybrids): the
    layout picks each layer's mixer, and each mixer reads its own fields.

    Fields hold what was asked (None for "the default"); ``config.resolved`` (:class:`Resolved`) has the sizes
    with the defaults filled in. Derived sizes: ``d_inner = expand * d_model``; ``resolved.d_ssm`` channels go
    through the SSM, the remaining ``d_mlp = d_inner - d_ssm`` form a gated-MLP branch; ``nheads = d_ssm //
    headdim``.

    Layout: ``layout`` (None: every layer Mamba-2) names each layer's mixer, ``mamba2``, ``mamba1`` or
    ``attention``, optionally ``+mlp`` (a SwiGLU MLP of hidden size ``d_intermediate`` after the mixer); see
    :mod:`mamba2.layout`. Mamba-1 layers share ``d_state``, ``d_conv``, ``expand``, the dt init and the biases
    with Mamba-2 and add ``dt_rank`` (None: ``ceil(d_model / 16)``). Attention layers read the ``attn_*`` fields,
    named after the official ``attn_cfg`` of mamba_ssm's MHA: ``attn_num_heads`` (None: one head per 64
    channels), ``attn_num_heads_kv`` (None: = heads; fewer gives grouped KV heads), ``attn_head_dim`` (None:
    d_model // heads), ``attn_rotary_dim`` (None: the whole head; 0: no rotary), ``attn_d_conv`` (0: no conv on
    qkv). The Mamba-2 constraints are checked only when a layer is Mamba-2, the attention ones only when a
    layer is attention.

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
    layout: tuple[str, ...] | None = None
    d_intermediate: int = 0
    dt_rank: int | None = None
    attn_num_heads: int | None = None
    attn_num_heads_kv: int | None = None
    attn_head_dim: int | None = None
    attn_rotary_dim: int | None = None
    attn_rotary_base: float = 10000.0
    attn_rotary_interleaved: bool = False
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    attn_softmax_scale: float | None = None
    attn_d_conv: int = 0

    def __post_init__(self) -> None:
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        self.A_init_range = tuple(float(v) for v in self.A_init_range)
        if self.dt_rank == "auto":
            self.dt_rank = None
        if self.layout is not None:
            if not isinstance(self.n_layer, int):
                raise ValueError(f"Mamba2Config: n_layer must be a positive integer, got {self.n_layer!r}")
            self.layout = parse_layout(self.layout, self.n_layer)
        self.validate()

    # ----------------------------------------------------------------- derived sizes
    @property
    def resolved(self) -> "Resolved":
        """The optional sizes with their defaults filled in (``d_ssm``, ``dt_rank``, the ``attn_*`` sizes)."""
        heads = max(1, self.d_model // 64) if self.attn_num_heads is None else self.attn_num_heads
        valid = isinstance(heads, int) and heads > 0      # validation reports a bad value before it is used
        head_dim = (self.d_model // heads if valid else 0) if self.attn_head_dim is None else self.attn_head_dim
        return Resolved(
            d_ssm=self.d_inner if self.d_ssm is None else self.d_ssm,
            dt_rank=math.ceil(self.d_model / 16) if self.dt_rank is None else self.dt_rank,
            attn_num_heads=heads,
            attn_num_heads_kv=heads if self.attn_num_heads_kv is None else self.attn_num_heads_kv,
            attn_head_dim=head_dim,
            attn_rotary_dim=head_dim if self.attn_rotary_dim is None else self.attn_rotary_dim)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def d_mlp(self) -> int:
        """Channels of the gated-MLP branch inside the Mamba-2 mixer: ``d_inner - d_ssm``."""
        return self.d_inner - self.resolved.d_ssm

    @property
    def nheads(self) -> int:
        return self.resolved.d_ssm // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.resolved.d_ssm + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return ((self.vocab_size + m - 1) // m) * m

    # ----------------------------------------------------------------- layout
    @property
    def layer_specs(self) -> tuple[LayerSpec, ...]:
        """Per layer: ``LayerSpec(mixer, mlp)``."""
        return layer_specs(self.layout, self.n_layer, self.d_intermediate)

    def uses(self, mixer: str) -> bool:
        """Whether any layer runs this mixer kind."""
        return any(s.mixer == mixer for s in self.layer_specs)

    @property
    def attn_qkv_dim(self) -> int:
        """Rows of the fused attention in_proj: [q (heads·head_dim), k, v (kv_heads·head_dim each)]."""
        r = self.resolved
        return r.attn_head_dim * (r.attn_num_heads + 2 * r.attn_num_heads_kv)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(f"Mamba2Config: {msg}")

        def positive_int(name: str, v: Any) -> None:
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive integer, got {v!r}")

        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim", "ngroups",
                     "chunk_size", "pad_vocab_size_multiple"):
            positive_int(name, getattr(self, name))
        self._validate_layout(need)
        if self.uses("mamba2"):
            if self.d_ssm is not None:
                need(isinstance(self.d_ssm, int) and 0 < self.d_ssm <= self.d_inner,
                     f"d_ssm must be in (0, d_inner={self.d_inner}], got {self.d_ssm!r}")
            d_ssm = self.resolved.d_ssm
            need(d_ssm % self.headdim == 0, f"d_ssm % headdim == 0 required, got d_ssm={d_ssm}, headdim={self.headdim}")
            need(self.nheads % self.ngroups == 0,
                 f"nheads % ngroups == 0 required, got nheads={self.nheads}, ngroups={self.ngroups}")
        if self.uses("mamba1"):
            positive_int("dt_rank", self.resolved.dt_rank)
        if self.uses("attention"):
            self._validate_attention(need, positive_int)
        lo, hi = self.dt_limit
        need(len(self.dt_limit) == 2 and 0.0 <= lo < hi, f"dt_limit must be (lo, hi) with 0 <= lo < hi, got {self.dt_limit}")
        need(0 < self.dt_min <= self.dt_max, f"0 < dt_min <= dt_max required, got dt_min={self.dt_min}, dt_max={self.dt_max}")
        need(self.dt_init_floor > 0, f"dt_init_floor must be > 0, got {self.dt_init_floor}")
        a_lo, a_hi = self.A_init_range
        need(0 < a_lo <= a_hi, f"A_init_range must be (lo, hi) with 0 < lo <= hi, got {self.A_init_range}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(self.initializer_range > 0, f"initializer_range must be > 0, got {self.initializer_range}")

    def _validate_layout(self, need: Callable[[bool, str], None]) -> None:
        need(isinstance(self.d_intermediate, int) and not isinstance(self.d_intermediate, bool)
             and self.d_intermediate >= 0, f"d_intermediate must be an integer >= 0, got {self.d_intermediate!r}")
        if self.layout is None:
            return
        need(len(self.layout) == self.n_layer,
             f"layout has {len(self.layout)} entries but n_layer={self.n_layer}: give exactly one entry per layer")
        mlp_layers = [i for i, s in enumerate(self.layer_specs) if s.mlp]
        need(not mlp_layers or self.d_intermediate > 0,
             f"layers {mlp_layers} have '+mlp' but d_intermediate=0: set the MLP hidden size d_intermediate > 0")
        need(bool(mlp_layers) or self.d_intermediate == 0,
             f"d_intermediate={self.d_intermediate} but no layer in layout has '+mlp': add '+mlp' to the layers "
             f"that should have an MLP, or set d_intermediate=0")

    def _validate_attention(self, need: Callable[[bool, str], None], positive_int: Callable[[str, Any], None]) -> None:
        r = self.resolved
        h, hkv = r.attn_num_heads, r.attn_num_heads_kv
        positive_int("attn_num_heads", h)
        positive_int("attn_num_heads_kv", hkv)
        need(h % hkv == 0, f"attn_num_heads % attn_num_heads_kv == 0 required (each KV head serves a whole group "
                           f"of query heads), got attn_num_heads={h}, attn_num_heads_kv={hkv}")
        if self.attn_head_dim is None:
            need(self.d_model % h == 0, f"d_model % attn_num_heads == 0 required when attn_head_dim is not set, "
                                        f"got d_model={self.d_model}, attn_num_heads={h}")
        positive_int("attn_head_dim", r.attn_head_dim)
        rd = r.attn_rotary_dim
        need(isinstance(rd, int) and 0 <= rd <= r.attn_head_dim and rd % 2 == 0,
             f"attn_rotary_dim must be an even integer in [0, attn_head_dim={r.attn_head_dim}], got {rd!r}")
        need(self.attn_rotary_base > 0, f"attn_rotary_base must be > 0, got {self.attn_rotary_base}")
        need(isinstance(self.attn_d_conv, int) and self.attn_d_conv >= 0,
             f"attn_d_conv must be an integer >= 0 (0: no conv), got {self.attn_d_conv!r}")
        need(self.attn_softmax_scale is None or self.attn_softmax_scale > 0,
             f"attn_softmax_scale must be > 0 or None, got {self.attn_softmax_scale}")

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dt_limit"] = [d["dt_limit"][0], d["dt_limit"][1] if math.isfinite(d["dt_limit"][1]) else "inf"]
        d["A_init_range"] = list(d["A_init_range"])
        if d["layout"] is not None:
            d["layout"] = list(d["layout"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Mamba2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not (k in LEGACY_KEYS and v == LEGACY_KEYS[k])}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Mamba2Config: unknown keys {unknown}")
        d = dict(d)
        if "dt_limit" in d:
            d["dt_limit"] = tuple(float(v) for v in d["dt_limit"])
        return cls(**d)

    @classmethod
    def preset(cls, name: str, arch: str = "mamba2", **overrides: Any) -> "Mamba2Config":
        """A named size: the released mamba2 sizes (``130m`` … ``2.7b``) or small CPU sizes (``tiny``, ``small``),
        built as one of the architectures in :data:`ARCHS` (``mamba2``, ``mamba1``, ``transformer++``, ``hybrid``).

        Explicit ``overrides`` win over both the size and the architecture's choices (e.g. ``n_layer``: the
        transformer++ arch halves the preset's depth unless ``n_layer`` is given).

        Raises:
            ValueError: for an unknown name or arch (the message lists the known ones).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; known architectures: {', '.join(ARCHS)}")
        base = {**PRESETS[name], **overrides}
        return cls(**{**base, **ARCHS[arch](base, set(overrides)), **overrides})


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


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple)) * multiple


def _transformer_pp(base: dict[str, Any], pinned: set[str]) -> dict[str, Any]:
    """Transformer++ (§9.2): attention + SwiGLU MLP + RMSNorm + rotary, no biases; half as many layers unless
    ``n_layer`` is pinned, as the paper's parameter-matched baselines (one attention+MLP layer ≈ two Mamba
    layers); MLP width ≈ 8/3·d_model."""
    n = base.get("n_layer", 24) if "n_layer" in pinned else max(1, base.get("n_layer", 24) // 2)
    d = base.get("d_model", 768)
    return dict(n_layer=n, layout=("attention+mlp",) * n, d_intermediate=_round_up(8 * d / 3, 64))


def _mamba1(base: dict[str, Any], pinned: set[str]) -> dict[str, Any]:
    """Mamba-1 (Gu & Dao 2023): every layer a selective-scan mixer, d_state 16 (its released models)."""
    return dict(layout=("mamba1",) * base.get("n_layer", 24), d_state=16)


def _hybrid(base: dict[str, Any], pinned: set[str]) -> dict[str, Any]:
    """Mamba-2 with about 10% attention layers spread through the stack (§9.2.3, mamba2attn)."""
    n = base.get("n_layer", 24)
    attn = set(evenly_spaced(n, max(1, round(n / 10))))
    return dict(layout=tuple("attention" if i in attn else "mamba2" for i in range(n)))


ARCHS: dict[str, Callable[[dict[str, Any], set[str]], dict[str, Any]]] = {
    "mamba2": lambda base, pinned: {},
    "mamba1": _mamba1,
    "transformer++": _transformer_pp,
    "hybrid": _hybrid,
}
"""Architectures buildable from any preset size: ``fn(fields, pinned)`` → field overrides, computed from the
preset's fields merged with the caller's overrides (``pinned``: the names the caller set explicitly)."""
