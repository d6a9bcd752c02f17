"""Write a model as a directory in our format, the official mamba_ssm one, or transformers'.

Ours: ``config.json`` (``Mamba2Config.to_dict()``) + ``model.safetensors`` (a tied ``lm_head`` stored once) +
the tokenizer. Official: ``config.json`` (MambaConfig keys) + ``pytorch_model.bin`` with every key of the state
dict, the tied ``lm_head.weight`` included (mamba_ssm loads exactly that, strictly); ``weights="safetensors"``
writes ``model.safetensors`` instead (tied head stored once). transformers: ``config.json`` (Mamba2Config keys,
``vocab_size`` = padded rows) + ``model.safetensors`` with ``backbone.embeddings.weight`` (no ``lm_head.weight``
when tied, as ``save_pretrained`` does). A tokenizer is kept as ``tokenizer_spec.json`` (plus a copy of a
``tokenizer.json``), so converting back keeps it; the hf format adds a minimal ``tokenizer_config.json`` and,
for the byte tokenizer, a ``tokenizer.json`` that encodes the same ids, so ``AutoTokenizer`` loads it.

:func:`model_writer` checks that a format can hold a model and returns the function that fills a directory;
:func:`save_pretrained` runs it through :func:`mamba2.fsutil.atomic_dir` (never half a directory), and
:func:`mamba2.checkpoints.save` adds its trainer state to the directory it fills.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import torch

from mamba2 import fsutil
from mamba2.config import Mamba2Config
from mamba2.errors import UserError
from mamba2.interop import hf, official
from mamba2.interop.formats import (BIN, BIN_INDEX, CONFIG_FILE, DTYPE_NAMES, FORMATS, SAFETENSORS,
                                    SAFETENSORS_INDEX, TRAINER_STATE, is_model_dir)
from mamba2.interop.weights import save_bin, save_module, save_safetensors
from mamba2.models.lm import Mamba2LM
from mamba2.tokenizer import HF_FILE, SPEC_FILE, save_tokenizer

_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def save_pretrained(model: Mamba2LM, directory: str | Path, *, format: str = "mamba2", tokenizer: Any = None,
                    dtype: torch.dtype | None = None, weights: str | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (with its ``model.config``) as a directory in ``format``, atomically.

    Args:
        format: ``mamba2`` (ours; needs a tokenizer), ``official`` or ``hf``.
        tokenizer: a :class:`mamba2.tokenizer.ByteTokenizer` / ``HFTokenizer`` to keep with the weights.
        dtype: cast the stored weights (default: the model's dtype). weights: ``bin`` or ``safetensors``
            (official only; default ``bin``, what mamba_ssm reads); ``hf`` and ``mamba2`` always use safetensors.
        overwrite: replace an existing model directory (never a directory that is not one).
    Returns:
        The directory.
    Raises:
        UserError: unknown format, a setting the format cannot express, ``format="mamba2"`` without a
            tokenizer, a target that is a file, a non-empty target without ``overwrite`` or that is not a
            model directory, a training run's directory or a model directory holding entries no model
            directory has (even with ``overwrite``; see :func:`refuse_to_replace`), or a failed write (naming
            the path).
    """
    write = model_writer(model, format=format, tokenizer=tokenizer, dtype=dtype, weights=weights)
    refuse_to_replace(directory)
    return fsutil.atomic_dir(directory, write, is_valid=is_model_dir, overwrite=overwrite, what="model directory")


# What a model directory may hold besides config.json and the weights (ours, official, transformers' and a hub
# download's usual files): anything else in a directory that --overwrite would replace is someone else's.
_MODEL_DIR_FILES = {CONFIG_FILE, SAFETENSORS, SAFETENSORS_INDEX, BIN, BIN_INDEX, SPEC_FILE, HF_FILE,
                    hf.TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "generation_config.json", "vocab.json",
                    "merges.txt", "added_tokens.json", "tokenizer.model", "README.md", ".gitattributes"}
_MODEL_DIR_PATTERN = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)|LICENSE.*")


def refuse_to_replace(directory: str | Path) -> None:
    """Raise UserError if replacing ``directory`` by a model directory would delete more than a model: a training
    run (its ``trainer_state.pt``: optimizer state, metrics and best/ would be lost) or any entry a model
    directory does not hold (:func:`refuse_foreign_entries`). Called by :func:`save_pretrained` and, before the
    long work, by ``train --export``; ``overwrite`` does not lift it.
    """
    directory = Path(directory)
    if (directory / TRAINER_STATE).exists():
        raise UserError(f"refusing to write a model into {directory}: it holds a training run ({TRAINER_STATE}, "
                        f"the state --resume needs), which replacing would delete; write to another folder")
    refuse_foreign_entries(directory)


def refuse_foreign_entries(directory: str | Path, *, also: frozenset[str] = frozenset(),
                           what: str = "model directory") -> None:
    """Raise UserError if the model directory ``directory`` (one with a config.json) holds an entry that neither
    a model directory (config, weights, shards, tokenizer files, a hub download's README / LICENSE and its
    ``.cache/huggingface`` bookkeeping) nor the names in ``also`` account for: a nested folder (another model, a
    ``.git``) or a file of the user's, which replacing the directory whole would delete. Names them."""
    directory = Path(directory)
    if not directory.is_dir() or not (directory / CONFIG_FILE).is_file():
        return

    def ours(e: Path) -> bool:
        if e.name in also:
            return True
        if e.name == ".cache" and e.is_dir():          # huggingface-cli download --local-dir's metadata only
            return all(f.is_dir() or (f.is_file() and (f == e / "huggingface/.gitignore" or (
                (e / "huggingface/download") in f.parents and f.suffix in (".metadata", ".lock"))))
                for f in e.rglob("*"))
        return e.is_file() and (e.name in _MODEL_DIR_FILES or bool(_MODEL_DIR_PATTERN.fullmatch(e.name)))

    foreign = sorted(e.name + ("/" if e.is_dir() else "") for e in directory.iterdir() if not ours(e))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"refusing to replace the {what} {directory}: it also holds {shown}, which replacing it "
                        f"would delete (only a model's own files are replaced); move them out or write to another "
                        f"folder")


def model_writer(model: Mamba2LM, *, format: str = "mamba2", tokenizer: Any = None, dtype: torch.dtype | None = None,
                 weights: str | None = None, config: Mamba2Config | None = None) -> Callable[[Path], None]:
    """Check that ``format`` can hold ``model`` and return ``write(directory)``, which writes the model files
    into an existing directory (plain writes: make it atomic with :func:`mamba2.fsutil.atomic_dir`).

    Arguments as for :func:`save_pretrained`; ``config`` is the config stored with the weights (default
    ``model.config``).

    Raises:
        UserError: unknown format, a setting the format cannot express, ``format="mamba2"`` without a tokenizer.
    """
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    config = config or model.config
    if format == "mamba2":
        return _ours(model, config, tokenizer, dtype, weights)
    dtype = dtype or model.lm_head.weight.dtype
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    tied = config.tie_embeddings
    if tied:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    if format == "official":
        weights = weights or "bin"
        if weights not in ("bin", "safetensors"):
            raise UserError(f"weights must be 'bin' or 'safetensors', got {weights!r}")
        cfg = official.config_to_official(config)
        if weights == "safetensors" and tied:
            del state["lm_head.weight"]
        write = (lambda d: save_bin(state, d / BIN)) if weights == "bin" else \
            (lambda d: save_safetensors(state, d / SAFETENSORS))
    else:
        if weights not in (None, "safetensors"):
            raise UserError("the hf format always stores model.safetensors")
        cfg = hf.config_to_hf(config, eos_token_id=getattr(tokenizer, "eos_token_id", None),
                              pad_token_id=hf.pad_token_id(tokenizer), dtype=str(dtype).replace("torch.", ""))
        if tied:
            del state["lm_head.weight"]
        hf_state = {hf.ours_key_to_hf(k): v for k, v in state.items()}
        write = lambda d: save_safetensors(hf_state, d / SAFETENSORS)  # noqa: E731

    def fill(d: Path) -> None:
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
        write(d)
        if tokenizer is not None:
            save_tokenizer(tokenizer, d)  # tokenizer_spec.json (+ tokenizer.json)
            if format == "hf":
                hf.write_hf_tokenizer(tokenizer, d)

    return fill


def _ours(model: Mamba2LM, config: Mamba2Config, tokenizer: Any, dtype: torch.dtype | None,
          weights: str | None) -> Callable[[Path], None]:
    if weights not in (None, "safetensors"):
        raise UserError("the mamba2 format always stores model.safetensors")
    if tokenizer is None:
        raise UserError("the mamba2 format keeps the model's tokenizer: give one (a tokenizer.json, or 'bytes')")
    if dtype is not None and dtype != model.lm_head.weight.dtype:
        model = _cast_copy(model, config, dtype)

    def fill(d: Path) -> None:
        (d / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_module(model, d / SAFETENSORS)   # a tied head is stored once
        save_tokenizer(tokenizer, d)

    return fill


def _cast_copy(model: Mamba2LM, config: Mamba2Config, dtype: torch.dtype) -> Mamba2LM:
    with torch.device("meta"):
        copy = Mamba2LM(config)
    copy.load_state_dict({k: v.detach().to(dtype, copy=True) for k, v in model.state_dict().items()},
                         strict=True, assign=True)
    if config.tie_embeddings:
        copy.lm_head.weight = copy.backbone.embedding.weight
    return copy
