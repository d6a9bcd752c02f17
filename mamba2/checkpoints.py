"""Checkpoint directories: a model directory in our format plus the trainer's state, saved atomically.

Layout of a checkpoint directory::

    config.json          Mamba2Config.to_dict()
    model.safetensors    weights (a tied lm_head is stored once, under the embedding's name)
    tokenizer_spec.json  which tokenizer (+ tokenizer.json for a Hugging Face one): a checkpoint keeps its own
    trainer_state.pt     optional: optimizer state, step, RNG states, data position, loss history
    loss_curve.png       optional, written by the trainer

The model files are written and read by :mod:`mamba2.interop` (format ``mamba2``); this module adds
``trainer_state.pt`` and extra files, and swaps the whole directory in with :func:`mamba2.fsutil.atomic_dir`,
so an interrupted save leaves the previous checkpoint (or nothing) in place, never half a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from mamba2 import fsutil
from mamba2.config import Mamba2Config
from mamba2.errors import UserError
from mamba2.interop import formats
from mamba2.interop.export import model_writer
from mamba2.interop.loading import load as load_model_dir
from mamba2.interop.weights import torch_save
from mamba2.tokenizer import SPEC_FILE


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory in our own format: a mamba2 ``config.json`` and ``model.safetensors``
    (transformers and official directories can have both files too, so the config's keys decide)."""
    path = Path(path)
    return (path / formats.SAFETENSORS).is_file() and formats.dir_format(path) == "mamba2"


def save(directory: str | Path, model: torch.nn.Module, config: Mamba2Config, tokenizer,
         optimizer: torch.optim.Optimizer | None = None, trainer_state: Mapping[str, Any] | None = None,
         extra_files: Mapping[str, Callable[[Path], None]] | None = None) -> Path:
    """Write a checkpoint directory atomically (replacing an older checkpoint there).

    ``trainer_state`` (plain Python values and tensors) is stored with ``optimizer.state_dict()`` under
    ``"optimizer"`` in ``trainer_state.pt``. ``extra_files`` maps a file name to a function that writes it to
    the given path (inside the temporary directory, so it is swapped in with the rest).

    Raises:
        UserError: ``directory`` exists, is not empty and is not a checkpoint (it is never overwritten), or it
            cannot be written (naming the path and the reason).
    """
    write_model = model_writer(model, format="mamba2", tokenizer=tokenizer, config=config)

    def fill(d: Path) -> None:
        write_model(d)
        if optimizer is not None or trainer_state is not None:
            state = dict(trainer_state or {})
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            torch_save(state, d / formats.TRAINER_STATE)
        for name, write in (extra_files or {}).items():
            write(d / name)

    return fsutil.atomic_dir(directory, fill, is_valid=is_checkpoint, overwrite=True, what="mamba2 checkpoint")


def ensure_writable(directory: str | Path) -> None:
    """Fail now, not after training, if :func:`save` would refuse ``directory`` (it exists, is not empty and is
    not a checkpoint) or could not write there (UserError naming it)."""
    fsutil.check_writable(directory, is_valid=is_checkpoint, overwrite=True, what="checkpoint")


def load(directory: str | Path, device: str | torch.device = "cpu", with_trainer_state: bool = True):
    """Load a checkpoint directory.

    Returns:
        ``(model, config, tokenizer, trainer_state)``: the model on ``device`` in eval mode, its
        :class:`Mamba2Config`, its tokenizer, and the trainer-state dict (None if absent or not asked for).
    Raises:
        UserError: the directory is missing or not a checkpoint (naming the missing files, or the format it is
            in), its config is invalid, or a stored tensor is missing or has the wrong shape (naming the tensor).
    """
    path = Path(directory)
    fsutil.recover(path, is_checkpoint)
    if not path.is_dir():
        raise formats.not_found(path)
    missing = [f for f in (formats.CONFIG_FILE, formats.SAFETENSORS, SPEC_FILE) if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} is not a mamba2 checkpoint: missing {', '.join(missing)}")
    config_file = path / formats.CONFIG_FILE
    fmt = formats.detect_format(formats.read_json(config_file), config_file)
    if fmt != "mamba2":
        raise UserError(f"{path} is not a mamba2 checkpoint: its {formats.CONFIG_FILE} is in the {fmt} format "
                        f"(mamba2.interop.load reads it)")
    loaded = load_model_dir(path, device=device)
    return loaded.model, loaded.config, loaded.tokenizer, read_trainer_state(path) if with_trainer_state else None


def read_trainer_state(directory: str | Path) -> dict[str, Any] | None:
    """The ``trainer_state.pt`` of a model directory (loaded with ``weights_only=True``), or None if it has none.

    Raises:
        UserError: the file exists but cannot be read (naming it).
    """
    file = Path(directory) / formats.TRAINER_STATE
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise UserError(f"cannot read {file}: {str(e).splitlines()[0]}") from None
