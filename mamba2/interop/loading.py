"""Load a model directory in any supported format (ours, official mamba_ssm, transformers) — all or nothing.

Official directories may hold any layout mamba_ssm expresses (Mamba-2, Mamba-1, hybrids with attention, MLP
layers: see :mod:`mamba2.interop.official`); transformers directories are Mamba-2 only.

The model is built on the meta device (no memory, no random init), every stored tensor is checked against it
(names, shapes, dtypes), read and checked again (finite values, tied head), and only then are the weights
assigned. Any problem raises a :class:`UserError` naming the file and the tensor; no partly loaded model is ever
returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mamba2 import fsutil
from mamba2.config import Mamba2Config
from mamba2.errors import UserError
from mamba2.interop import formats, hf, official
from mamba2.interop.weights import WeightFiles, names_preview
from mamba2.models.lm import Mamba2LM
from mamba2.tokenizer import HF_FILE, SPEC_FILE, HFTokenizer, load_tokenizer_from_dir


@dataclass
class Pretrained:
    """What :func:`load` returns: the model (eval mode), its config, its tokenizer (or None) and the format."""

    model: Mamba2LM
    config: Mamba2Config
    tokenizer: Any
    format: str


def load(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         tokenizer: Any = None) -> Pretrained:
    """Load a model directory in our, the official mamba_ssm, or the transformers Mamba2 format.

    A swap that an interrupted :func:`mamba2.interop.save_pretrained` (or checkpoint save) left half done is
    finished first (:func:`mamba2.fsutil.recover`).

    Args:
        path: the directory (``config.json`` + weights; see :mod:`mamba2.interop.weights` for weight files).
        dtype: parameter dtype (weights are cast to it); float32 by default.
        tokenizer: overrides the directory's own (``tokenizer_spec.json``, else ``tokenizer.json``; else None).
    Returns:
        :class:`Pretrained`.
    Raises:
        UserError: no such directory, unknown format, unsupported settings, unreadable/truncated weight files,
            missing, unexpected or wrongly shaped tensors, a tensor holding NaN or infinite values (stored so,
            or overflowing ``dtype``), a tied head that differs from the embedding, a tokenizer larger than the
            vocabulary — each naming the file (and tensor).
    """
    path = Path(path)
    fsutil.recover(path, formats.is_model_dir)
    if path.is_file():
        raise UserError(f"{path} is a file: give the model directory that holds it and its {formats.CONFIG_FILE}")
    if not path.exists():
        raise formats.not_found(path)
    config_file = path / formats.CONFIG_FILE
    cfg = formats.read_json(config_file)
    fmt = formats.detect_format(cfg, config_file)
    tok = tokenizer if tokenizer is not None else load_dir_tokenizer(path)
    weights = WeightFiles.open(path)
    rename = hf.hf_key_to_ours if fmt == "hf" else (lambda k: k)
    stored = {rename(k): k for k in weights.infos}
    if len(stored) != len(weights.infos):
        raise UserError(f"{weights.describe()}: the embedding is stored under both 'embedding' and 'embeddings'")
    if fmt == "mamba2":
        try:
            config = Mamba2Config.from_dict(cfg)
        except (ValueError, TypeError) as e:
            raise UserError(f"{config_file}: {e}") from None
    elif fmt == "official":
        config = official.official_to_config(cfg, config_file)
    else:
        config = hf.hf_to_config(cfg, config_file, has_lm_head="lm_head.weight" in stored,
                                 tokenizer_vocab=getattr(tok, "vocab_size", None))
    if tok is not None and tok.vocab_size > config.padded_vocab_size:
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{config.padded_vocab_size} embedding rows")
    if fmt == "mamba2" and tokenizer is None and tok is not None and tok.vocab_size > config.vocab_size:
        # the directory's own tokenizer, written with its config.json: they must agree
        raise UserError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is "
                        f"{config.vocab_size} (config.json): ids from {config.vocab_size} on could not be read")
    model = build_and_load(config, weights, stored, dtype=dtype, device=device)
    return Pretrained(model, config, tok, fmt)


def from_pretrained(path: str | Path, **kw: Any) -> Mamba2LM:
    """The model of :func:`load` alone (same arguments and errors)."""
    return load(path, **kw).model


def load_dir_tokenizer(path: str | Path):
    """A directory's tokenizer: ours (``tokenizer_spec.json``, read by
    :func:`mamba2.tokenizer.load_tokenizer_from_dir`), else a bare ``tokenizer.json``, else None.

    Raises:
        UserError: an invalid ``tokenizer_spec.json`` or ``tokenizer.json``.
    """
    path = Path(path)
    if (path / SPEC_FILE).is_file():
        return load_tokenizer_from_dir(path)
    if (path / HF_FILE).is_file():
        return HFTokenizer(path / HF_FILE)
    return None


def build_and_load(config: Mamba2Config, weights: WeightFiles, stored: dict[str, str], *,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Mamba2LM:
    """Build ``Mamba2LM(config)`` and fill it from ``weights``; ``stored`` maps our tensor name -> stored name.

    Raises:
        UserError: missing/unexpected/misshaped/non-float tensors, a tensor with NaN or infinite values after the
            cast to ``dtype``, or a tied head that differs from the embedding.
    """
    where = weights.describe()
    with torch.device("meta"):
        model = Mamba2LM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = set(expected) - set(stored) - optional
    if missing:
        raise UserError(f"{where}: missing tensor(s) {names_preview(missing)} (the config expects them: "
                        f"n_layer={config.n_layer}, tie_embeddings={config.tie_embeddings})")
    unexpected = set(stored) - set(expected)
    if unexpected:
        raise UserError(f"{where}: unexpected tensor(s) {names_preview(unexpected)} (made for another model "
                        f"layout or config?)")
    for name, key in stored.items():
        info = weights.infos[key]
        if info.shape != expected[name]:
            raise UserError(f"{info.file}: tensor {key!r} has shape {list(info.shape)} but the config expects "
                            f"{list(expected[name])}{_shape_hint(name, config)}")
        if not info.dtype.is_floating_point:
            raise UserError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, expected a floating-point type")
    ours = {key: name for name, key in stored.items()}
    state = {ours[key]: t.to(device=device, dtype=dtype, copy=True) for key, t in weights.read(list(ours))}
    _check_finite(state, weights, stored)
    if config.tie_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"]):
            raise UserError(f"{weights.infos[stored['lm_head.weight']].file}: tensor 'lm_head.weight' differs from "
                            f"the embedding but the config says the head is tied (tie_embeddings)")
        del state["lm_head.weight"]
    if config.tie_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer the state dict does not hold
        model = Mamba2LM(config).to(device=device, dtype=dtype)
        model.load_state_dict(state, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    return model.eval()


def _check_finite(state: dict[str, torch.Tensor], weights: WeightFiles, stored: dict[str, str]) -> None:
    # One isfinite().all() per tensor and a single host sync for all of them. NaN/inf weights would otherwise
    # surface far from their cause: a NaN loss, NUL bytes from greedy decoding, a sampling failure.
    finite = torch.stack([torch.isfinite(t).all() for t in state.values()]).tolist()
    for (name, t), ok in zip(state.items(), finite):
        if ok:
            continue
        info = weights.infos[stored[name]]
        stored_finite = bool(torch.isfinite(dict(weights.read([info.name]))[info.name]).all())
        cause = (f" after the cast from {info.dtype} to {t.dtype}: load it in a wider dtype" if stored_finite
                 else ": the file is corrupt or the model diverged")
        raise UserError(f"{info.file}: tensor {info.name!r} holds {int(t.isnan().sum())} NaN and "
                        f"{int(t.isinf().sum())} infinite value(s) of {t.numel()}{cause}")


def _shape_hint(name: str, c: Mamba2Config) -> str:
    leaf = name.rsplit(".", 2)[-2:]
    if leaf == ["in_proj", "weight"]:
        return (f" (rows = 2·d_inner + 2·ngroups·d_state + nheads = 2·{c.d_inner} + 2·{c.ngroups}·{c.d_state} + "
                f"{c.nheads}: check ngroups, d_state, headdim, expand)")
    if leaf[0] == "conv1d":
        return f" (channels = d_ssm + 2·ngroups·d_state = {c.resolved.d_ssm} + 2·{c.ngroups}·{c.d_state})"
    if "embedding" in name or name.startswith("lm_head"):
        return (f" (rows = vocab_size {c.vocab_size} padded to a multiple of pad_vocab_size_multiple "
                f"{c.pad_vocab_size_multiple})")
    return ""
