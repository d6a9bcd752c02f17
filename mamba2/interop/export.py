"""Write a model in our format (through :mod:`mamba2.checkpoints`), the official mamba_ssm one, or transformers'.

Official: ``config.json`` (MambaConfig keys) + ``pytorch_model.bin`` with every key of the state dict, the tied
``lm_head.weight`` included (mamba_ssm loads exactly that, strictly); ``weights="safetensors"`` writes
``model.safetensors`` instead (tied head stored once). transformers: ``config.json`` (Mamba2Config keys,
``vocab_size`` = padded rows) + ``model.safetensors`` with ``backbone.embeddings.weight`` (no ``lm_head.weight``
when tied, as ``save_pretrained`` does). A tokenizer is copied as ``tokenizer.json`` (plus a minimal
``tokenizer_config.json`` for transformers) and ``tokenizer_spec.json``, so converting back keeps it.

Writes go to a temporary directory next to the target, renamed into place at the end: never half a directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mamba2.errors import UserError
from mamba2.interop import formats
from mamba2.interop.weights import BIN, SAFETENSORS, save_bin, save_safetensors
from mamba2.models.lm import Mamba2LM

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_pretrained(model: Mamba2LM, directory: str | Path, *, format: str = "mamba2", tokenizer: Any = None,
                    dtype: torch.dtype | None = None, weights: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (with its ``model.config``) as a directory in ``format``.

    Args:
        format: ``mamba2`` (ours, via :func:`mamba2.checkpoints.save`; needs a tokenizer), ``official`` or ``hf``.
        tokenizer: a :class:`mamba2.tokenizer.ByteTokenizer` / ``HFTokenizer`` to keep with the weights.
        dtype: cast the stored weights (default: the model's dtype). weights: ``bin`` or ``safetensors``
            (official only; default ``bin``, what mamba_ssm reads); ``hf`` and ``mamba2`` always use safetensors.
        overwrite: replace an existing model directory (never a directory that is not one).
    Returns:
        The directory.
    Raises:
        UserError: unknown format, a setting the format cannot express, a non-empty target without
            ``overwrite``, ``format="mamba2"`` without a tokenizer.
    """
    if format not in formats.FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of {', '.join(formats.FORMATS)}")
    target = Path(directory)
    _check_target(target, overwrite)
    config = model.config
    if format == "mamba2":
        if weights not in (None, "safetensors"):
            raise UserError("the mamba2 format always stores model.safetensors")
        return _save_ours(model, target, tokenizer, dtype)
    dtype = dtype or model.lm_head.weight.dtype
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    tied = config.tie_embeddings
    if tied:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if format == "official":
        weights = weights or "bin"
        if weights not in ("bin", "safetensors"):
            raise UserError(f"weights must be 'bin' or 'safetensors', got {weights!r}")
        cfg = formats.config_to_official(config)
        if weights == "safetensors" and tied:
            del state["lm_head.weight"]
        write = (lambda d: save_bin(state, d / BIN)) if weights == "bin" else \
            (lambda d: save_safetensors(state, d / SAFETENSORS))
    else:
        if weights not in (None, "safetensors"):
            raise UserError("the hf format always stores model.safetensors")
        cfg = formats.config_to_hf(config, eos_token_id=eos, pad_token_id=_pad_id(tokenizer),
                                   dtype=str(dtype).replace("torch.", ""))
        if tied:
            del state["lm_head.weight"]
        hf_state = {formats.ours_key_to_hf(k): v for k, v in state.items()}
        write = lambda d: save_safetensors(hf_state, d / SAFETENSORS)  # noqa: E731

    def fill(d: Path) -> None:
        (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        write(d)
        _write_tokenizer(tokenizer, d, hf=format == "hf")

    return _atomic_dir(target, fill)


def _save_ours(model: Mamba2LM, target: Path, tokenizer: Any, dtype: torch.dtype | None) -> Path:
    from mamba2 import checkpoints

    if tokenizer is None:
        raise UserError("the mamba2 format keeps the model's tokenizer: give one (a tokenizer.json, or 'bytes')")
    if dtype is not None and dtype != model.lm_head.weight.dtype:
        model = _cast_copy(model, dtype)
    if target.exists() and not checkpoints.is_checkpoint(target):
        return _atomic_dir(target, lambda d: checkpoints.save(d / "ckpt", model, model.config, tokenizer),
                           inner="ckpt")
    return checkpoints.save(target, model, model.config, tokenizer)


def _cast_copy(model: Mamba2LM, dtype: torch.dtype) -> Mamba2LM:
    with torch.device("meta"):
        copy = Mamba2LM(model.config)
    copy.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()},
                         strict=True, assign=True)
    if model.config.tie_embeddings:
        copy.lm_head.weight = copy.backbone.embedding.weight
    return copy


def _pad_id(tokenizer: Any) -> int | None:
    tok = getattr(tokenizer, "_tok", None)
    if tok is None:
        return None
    return next((i for i in (tok.token_to_id(t) for t in ("<|padding|>", "<pad>", "[PAD]")) if i is not None), None)


def _write_tokenizer(tokenizer: Any, d: Path, *, hf: bool) -> None:
    from mamba2.tokenizer import HFTokenizer, save_tokenizer

    if tokenizer is None:
        return
    save_tokenizer(tokenizer, d)  # tokenizer_spec.json (+ tokenizer.json)
    if hf and isinstance(tokenizer, HFTokenizer):
        eos = tokenizer._tok.id_to_token(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else None
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "model_max_length": 1_000_000_000}
        (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists():
        if not target.is_dir():
            raise UserError(f"refusing to write to {target}: it is a file")
        if any(target.iterdir()):
            if not overwrite:
                raise UserError(f"refusing to overwrite {target}: it exists and is not empty "
                                f"(pass overwrite=True, or --overwrite on the command line)")
            if not (target / "config.json").is_file():
                raise UserError(f"refusing to overwrite {target}: it has no config.json, so is not a model directory")


def _atomic_dir(target: Path, fill, inner: str | None = None) -> Path:
    """Build the directory in a temporary sibling with ``fill(tmp)``, then swap it in (old one removed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        fill(tmp)
        src = tmp / inner if inner else tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old)
        os.replace(src, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
