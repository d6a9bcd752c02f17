"""The three model-directory formats, how to tell them apart, and the file names they share.

* ``mamba2``: ours (``config.json`` = ``Mamba2Config.to_dict()``, ``model.safetensors``, ``tokenizer_spec.json``).
* ``official``: state-spaces/mamba_ssm ``MambaLMHeadModel`` (``config.json`` with ``d_model``, ``n_layer``,
  ``ssm_cfg`` …; ``pytorch_model.bin``); its mapping is :mod:`mamba2.interop.official`.
* ``hf``: transformers ``Mamba2ForCausalLM`` (``model_type: mamba2``; ``backbone.embeddings.weight``); its
  mapping is :mod:`mamba2.interop.hf`.

Tokenizer file names (``tokenizer.json``, ``tokenizer_spec.json``) belong to :mod:`mamba2.tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mamba2.errors import UserError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""The dtypes a model directory can be written in."""

FORMATS = ("mamba2", "official", "hf")

CONFIG_FILE = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TRAINER_STATE = "trainer_state.pt"   # a training run's resumable state (mamba2.checkpoints)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object; accepts ``Infinity`` and transformers' ``{"__float__": "Infinity"}`` encoding.

    Raises:
        UserError: the file is missing, unreadable, not JSON, or not an object (naming it).
    """
    def hook(d: dict) -> Any:
        return float(d["__float__"]) if set(d) == {"__float__"} else d

    try:
        obj = json.loads(path.read_text(), object_hook=hook)
    except FileNotFoundError:
        raise UserError(f"{path.parent}: no {CONFIG_FILE} (not a model directory)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({' '.join(str(e).split())})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def detect_format(cfg: dict[str, Any], path: Path) -> str:
    """``mamba2``, ``official`` or ``hf`` from the keys of a ``config.json`` (``path`` is only for messages).

    Raises:
        UserError: another model type (e.g. ``mamba`` v1, ``falcon_h1``) or an unrecognised config.
    """
    model_type = cfg.get("model_type")
    if model_type is not None:
        if model_type != "mamba2":
            raise UserError(f"{path}: model_type {model_type!r} is not Mamba-2 (only 'mamba2' loads here)")
        return "hf"
    if "hidden_size" in cfg and "num_hidden_layers" in cfg:
        return "hf"
    # ours keeps d_state and headdim at the top level, mamba_ssm inside ssm_cfg: an unknown key in one of ours is
    # then named by Mamba2Config, not taken for a mamba_ssm config
    if "ssm_cfg" not in cfg and {"d_model", "n_layer", "d_state", "headdim"} <= set(cfg):
        return "mamba2"
    if "d_model" in cfg or "ssm_cfg" in cfg:
        return "official"
    raise UserError(f"{path}: not a Mamba-2 config (expected mamba_ssm keys d_model/n_layer/ssm_cfg, transformers "
                    f"model_type 'mamba2', or a mamba2 checkpoint config)")


def dir_format(path: str | Path) -> str | None:
    """The format of the model directory ``path`` (from its ``config.json``), or None when it is not one: no
    directory, no or unreadable ``config.json``, or a config of no known format. Never raises."""
    path = Path(path)
    try:
        return detect_format(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
    except UserError:
        return None


def is_model_dir(path: str | Path) -> bool:
    """True for a directory with a ``config.json`` in one of :data:`FORMATS` (see :func:`dir_format`)."""
    return dir_format(path) is not None


def not_found(path: Path) -> UserError:
    """The error for a model directory that does not exist; a Hugging Face hub id (``owner/name``) is not
    downloaded by this package (it never uses the network): say so, and how to get and convert the files."""
    parts = path.parts
    if parts[:1] == ("runs",):        # where mamba2 train writes (runs/demo by default): a local run not made yet
        return UserError(f"checkpoint not found: {path} (train one first, e.g. 'mamba2 train --out {path}')")
    if len(parts) == 2 and not path.is_absolute() and not str(path).startswith(".") and not path.parent.exists():
        return UserError(f"checkpoint not found: {path} (a Hugging Face hub id? mamba2 reads local directories "
                         f"and never downloads: fetch it first, e.g. 'huggingface-cli download {path} --local-dir "
                         f"{parts[1]}', then pass {parts[1]}; without a tokenizer.json there, add one once with "
                         f"'mamba2 convert {parts[1]} runs/{parts[1]} --to mamba2 --tokenizer tokenizer.json')")
    return UserError(f"checkpoint not found: {path}")
