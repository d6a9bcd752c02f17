"""The transformers ``Mamba2ForCausalLM`` format: its ``Mamba2Config`` to and from ours, its tensor names
(``backbone.embeddings.weight`` where ours say ``embedding``) and the tokenizer files its ``AutoTokenizer`` reads.

Every mapping is exact or refused: a setting transformers cannot express raises :class:`UserError` naming it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mamba2.config import Mamba2Config
from mamba2.errors import UserError
from mamba2.tokenizer import HF_FILE, ByteTokenizer, HFTokenizer

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# layer-layout fields transformers' Mamba2 cannot express (MLP layers; hybrids come through ``layout``)
_LAYOUT_FIELDS = {"d_intermediate": 0}

# transformers Mamba2Config key -> ours, and its class defaults (transformers 5.x configuration_mamba2.py)
_HF_TO_OURS = {"hidden_size": "d_model", "num_hidden_layers": "n_layer", "state_size": "d_state",
               "conv_kernel": "d_conv", "expand": "expand", "head_dim": "headdim", "n_groups": "ngroups",
               "chunk_size": "chunk_size", "use_bias": "bias", "use_conv_bias": "conv_bias",
               "layer_norm_epsilon": "norm_eps", "residual_in_fp32": "residual_in_fp32", "time_step_min": "dt_min",
               "time_step_max": "dt_max", "time_step_floor": "dt_init_floor", "time_step_limit": "dt_limit",
               "initializer_range": "initializer_range", "rescale_prenorm_residual": "rescale_prenorm_residual"}
_HF_DEFAULTS: dict[str, Any] = dict(num_heads=128, head_dim=64, vocab_size=32768, hidden_size=4096, state_size=128,
                                    num_hidden_layers=64, layer_norm_epsilon=1e-5, expand=2, conv_kernel=4,
                                    n_groups=8, use_bias=False, use_conv_bias=True, hidden_act="silu",
                                    initializer_range=0.1, residual_in_fp32=True, time_step_min=0.001,
                                    time_step_max=0.1, time_step_floor=1e-4, time_step_limit=[0.0, math.inf],
                                    rescale_prenorm_residual=False, chunk_size=256)
_PAD_TOKENS = ("<|padding|>", "<pad>", "[PAD]")


def _config(path: Path, **kw: Any) -> Mamba2Config:
    try:
        return Mamba2Config(**kw)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None


def _non_uniform_layout(c: Mamba2Config) -> str | None:
    """Why the layout is not "every layer Mamba-2" (transformers' Mamba2 has no other layer), or None."""
    kinds = sorted({s.mixer for s in c.layer_specs} - {"mamba2"})
    return f"layers of kind {kinds} (transformers' Mamba2ForCausalLM has Mamba-2 layers only)" if kinds else None


def hf_to_config(cfg: dict[str, Any], path: Path, *, has_lm_head: bool, tokenizer_vocab: int | None) -> Mamba2Config:
    """Map a transformers ``Mamba2Config`` dict to ours (transformers' class defaults for missing keys).

    transformers' ``vocab_size`` is the number of embedding rows. With a tokenizer of ``tokenizer_vocab`` <= rows
    tokens, ours gets ``vocab_size = tokenizer_vocab`` and a ``pad_vocab_size_multiple`` that reproduces the
    rows, so the padded rows are never sampled. ``tie_word_embeddings`` missing: tied iff no ``lm_head.weight``.
    transformers always gates before its grouped norm and always uses RMSNorm, whatever the legacy keys
    ``norm_before_gate`` / ``rms_norm`` say; ours follows what it computes.

    Raises:
        UserError: ``num_heads * head_dim != expand * hidden_size``, an activation other than silu, a tokenizer
            larger than the embedding, or values our config rejects.
    """
    c = {**_HF_DEFAULTS, **cfg}
    if c["hidden_act"] != "silu":
        raise UserError(f"{path}: hidden_act={c['hidden_act']!r}: only silu is supported")
    if c["num_heads"] * c["head_dim"] != c["expand"] * c["hidden_size"]:
        raise UserError(f"{path}: num_heads * head_dim ({c['num_heads']} * {c['head_dim']}) must equal "
                        f"expand * hidden_size ({c['expand']} * {c['hidden_size']})")
    kw = {ours: c[hf] for hf, ours in _HF_TO_OURS.items()}
    kw["dt_limit"] = tuple(float(v) for v in kw["dt_limit"])
    kw["tie_embeddings"] = bool(cfg.get("tie_word_embeddings", not has_lm_head))
    rows = int(c["vocab_size"])
    vocab, multiple = rows, 1
    if tokenizer_vocab is not None and tokenizer_vocab != rows:
        if tokenizer_vocab > rows:
            raise UserError(f"{path}: the tokenizer has {tokenizer_vocab} tokens but the model only {rows} "
                            f"embedding rows")
        vocab = tokenizer_vocab
        multiple = next(m for m in range(1, rows + 1) if rows % m == 0 and -(-vocab // m) * m == rows)
    return _config(path, vocab_size=vocab, pad_vocab_size_multiple=multiple, **kw)


def config_to_hf(config: Mamba2Config, *, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 dtype: str = "float32") -> dict[str, Any]:
    """Our config as a transformers ``Mamba2ForCausalLM`` ``config.json`` (``vocab_size`` = padded rows).

    ``rescale_prenorm_residual`` is written as false: it only steers initialisation, and transformers (5.24)
    applies it to loaded weights too, which would silently rescale every ``out_proj``.

    Raises:
        UserError: a setting transformers' Mamba2 cannot compute: a gated-MLP branch (``d_ssm < d_inner``),
            per-channel D, ``norm_before_gate``, ``rmsnorm=False``, MLP layers, or Mamba-1/attention layers.
    """
    c = config
    refuse = [(c.d_mlp > 0, f"d_ssm={c.d_ssm} < d_inner={c.d_inner} (gated-MLP branch)"),
              (c.D_has_hdim, "D_has_hdim=True (per-channel D)"),
              (c.norm_before_gate, "norm_before_gate=True (transformers always gates before the norm)"),
              (not c.rmsnorm, "rmsnorm=False (transformers always applies the gated RMSNorm)")]
    refuse += [(getattr(c, k) != d, f"{k}={getattr(c, k)!r} (MLP layers)") for k, d in _LAYOUT_FIELDS.items()]
    why = _non_uniform_layout(c)
    refuse.append((why is not None, why or ""))
    reasons = [msg for bad, msg in refuse if bad]
    if reasons:
        raise UserError(f"cannot export to the transformers format: {'; '.join(reasons)}")
    out: dict[str, Any] = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2"}
    out.update({hf: getattr(c, ours) for hf, ours in _HF_TO_OURS.items()})
    out["time_step_limit"] = list(c.dt_limit)
    if tuple(c.dt_limit) == (0.0, math.inf):   # transformers' default; omitted so config.json stays strict JSON
        del out["time_step_limit"]
    # init-only, but transformers 5.24 re-applies it to *loaded* out_proj weights (divides them by sqrt(n_layer))
    out["rescale_prenorm_residual"] = False
    out.update(num_heads=c.nheads, vocab_size=c.padded_vocab_size, hidden_act="silu",
               tie_word_embeddings=c.tie_embeddings, use_cache=True, bos_token_id=eos_token_id,
               eos_token_id=eos_token_id, pad_token_id=pad_token_id, dtype=dtype)
    return out


def hf_key_to_ours(name: str) -> str:
    """A transformers tensor name as ours (``backbone.embeddings.*`` -> ``backbone.embedding.*``)."""
    return "backbone.embedding." + name[len("backbone.embeddings."):] if name.startswith("backbone.embeddings.") else name


def ours_key_to_hf(name: str) -> str:
    """Our tensor name as transformers' (``backbone.embedding.*`` -> ``backbone.embeddings.*``)."""
    return "backbone.embeddings." + name[len("backbone.embedding."):] if name.startswith("backbone.embedding.") else name


def pad_token_id(tokenizer: Any) -> int | None:
    """The id of a Hugging Face tokenizer's padding token (``<|padding|>``, ``<pad>`` or ``[PAD]``), else None."""
    if not isinstance(tokenizer, HFTokenizer):
        return None
    return next((i for i in map(tokenizer._tok.token_to_id, _PAD_TOKENS) if i is not None), None)


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte (``bytes_to_unicode``): entry ``b`` is the character the
    ``ByteLevel`` pre-tokenizer turns byte ``b`` into."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def byte_tokenizer_json(path: Path) -> None:
    """Write a ``tokenizer.json`` equal to :class:`~mamba2.tokenizer.ByteTokenizer`: id ``b`` is byte ``b``.

    ``ByteLevel`` (no regex split, no prefix space) turns each byte into one character and a merge-less BPE
    looks that character up. ``ByteLevel.alphabet()`` lists those characters in another order, hence the
    explicit byte-ordered vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_level_alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path))


def write_hf_tokenizer(tokenizer: Any, directory: Path) -> None:
    """Write what transformers' ``AutoTokenizer`` needs beside our tokenizer files: a minimal
    ``tokenizer_config.json``, and for a :class:`~mamba2.tokenizer.ByteTokenizer` the ``tokenizer.json``
    (:func:`byte_tokenizer_json`) that a Hugging Face tokenizer already has. Nothing for other tokenizers."""
    if isinstance(tokenizer, ByteTokenizer):
        byte_tokenizer_json(directory / HF_FILE)
        eos = None
    elif isinstance(tokenizer, HFTokenizer):
        eos = tokenizer._tok.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
    else:
        return
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
          "model_max_length": 1_000_000_000}
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tc, indent=2) + "\n")
