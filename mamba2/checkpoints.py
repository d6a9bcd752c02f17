"""Checkpoint directories: save atomically, load with clear errors.

Layout of a checkpoint directory::

    config.json          Mamba2Config.to_dict()
    model.safetensors    weights (a tied lm_head is stored once, under the embedding's name)
    tokenizer_spec.json  which tokenizer (+ tokenizer.json for a Hugging Face one): a checkpoint keeps its own
    trainer_state.pt     optional: optimizer state, step, RNG states, data position, loss history
    loss_curve.png       optional, written by the trainer

A save writes everything into a hidden temporary directory next to the target and then swaps it in with
renames, so an interrupted save leaves the previous checkpoint (or nothing) in place, never half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import save_model

from mamba2.errors import UserError
from mamba2.models import Mamba2Config
from mamba2.tokenizer import load_tokenizer_from_dir, save_tokenizer

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


def is_checkpoint(path: str | Path) -> bool:
    """True for a directory in our own format (a mamba2 config.json and model.safetensors); transformers and
    official directories can have both files too, so the config's keys decide."""
    from mamba2.interop.formats import detect_format

    path = Path(path)
    if not ((path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()):
        return False
    try:
        return detect_format(json.loads((path / CONFIG_FILE).read_text()), path) == "mamba2"
    except (UserError, ValueError, OSError):
        return False


def _backups(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.old-*"))


def _recover(target: Path) -> None:
    """Finish a swap interrupted between its two renames: put the previous checkpoint back."""
    if not target.exists():
        backups = [b for b in _backups(target) if is_checkpoint(b)]
        if backups:
            os.replace(backups[-1], target)


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
    target = Path(directory)
    _recover(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):   # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not (target.is_dir() and (is_checkpoint(target) or not any(target.iterdir()))):
        raise UserError(f"refusing to overwrite {target}: it exists and is not a mamba2 checkpoint")
    tmp = _make_temp_dir(target)
    try:
        save_model(model, str(tmp / MODEL_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_tokenizer(tokenizer, tmp)
        if optimizer is not None or trainer_state is not None:
            state = dict(trainer_state or {})
            if optimizer is not None:
                state["optimizer"] = optimizer.state_dict()
            torch.save(state, tmp / STATE_FILE)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        _apply_umask(tmp)
        _swap(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write checkpoint {target}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _make_temp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:
        raise UserError(f"cannot write checkpoint {target}: {e.strerror or e}") from None


def ensure_writable(directory: str | Path) -> None:
    """Fail now, not after training, if a checkpoint could not be written at ``directory`` (UserError)."""
    shutil.rmtree(_make_temp_dir(Path(directory)))


def _apply_umask(tmp: Path) -> None:
    """mkdtemp makes a private directory; give the checkpoint the permissions of a normal mkdir/open."""
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~umask)


def _swap(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old)  # an empty directory is replaced by a rename
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def load(directory: str | Path, device: str | torch.device = "cpu", with_trainer_state: bool = True):
    """Load a checkpoint directory.

    Returns:
        ``(model, config, tokenizer, trainer_state)``: the model on ``device`` in eval mode, its
        :class:`Mamba2Config`, its tokenizer, and the trainer-state dict (None if absent or not asked for).
    Raises:
        UserError: the directory is missing or not a checkpoint (naming the missing files), its config is
            invalid, or a stored tensor is missing or has the wrong shape (naming the tensor).
    """
    path = Path(directory)
    _recover(path)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    missing = [f for f in (CONFIG_FILE, MODEL_FILE) if not (path / f).is_file()]
    if missing:
        raise UserError(f"{path} is not a mamba2 checkpoint: missing {' and '.join(missing)}")
    try:
        config = Mamba2Config.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (ValueError, TypeError, OSError) as e:
        raise UserError(f"{path / CONFIG_FILE}: {e}") from None
    tokenizer = load_tokenizer_from_dir(path)
    from mamba2.interop.loading import build_and_load     # the one validated loader, shared with other formats
    from mamba2.interop.weights import WeightFiles

    weights = WeightFiles.open(path)
    model = build_and_load(config, weights, {k: k for k in weights.infos}, device=device)
    state = None
    if with_trainer_state and (path / STATE_FILE).is_file():
        try:
            state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors come in many types
            raise UserError(f"cannot read {path / STATE_FILE}: {str(e).splitlines()[0]}") from None
    return model, config, tokenizer, state
