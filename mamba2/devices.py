"""The ``--device`` of every command: parsed, checked to exist and to be usable, before anything is loaded."""

from __future__ import annotations

import torch

from mamba2.errors import UserError


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", ...; None: :func:`default_device`) as a device that can hold tensors and
    draw random numbers (what loading a model, training and sampling need).

    Raises:
        UserError: a name torch does not know, CUDA asked for on a machine without it, or a device that cannot
            be used (e.g. ``meta``, which holds no data), named with torch's reason.
    """
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"bad --device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    try:
        torch.empty(1, device=device).cpu()
        torch.Generator(device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        raise UserError(f"--device {name} cannot be used here: {str(e).splitlines()[0]}") from None
    return device
