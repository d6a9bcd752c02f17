"""mamba2: Mamba-2 (Dao & Gu 2024, "Transformers are SSMs") from scratch in PyTorch.

The public names load on first use (:mod:`mamba2.lazy`): every ``mamba2`` command, ``--help`` included, starts
without torch until it needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mamba2.lazy import make_lazy

__version__ = "0.1.0"
__all__ = ["Mamba2Config", "Mamba2LM", "InferenceCache", "PRESETS", "ssd", "ssd_step", "__version__"]

if TYPE_CHECKING:
    from mamba2.config import PRESETS, Mamba2Config
    from mamba2.models import InferenceCache, Mamba2LM
    from mamba2.ssd import ssd, ssd_step

make_lazy(__name__, {"Mamba2Config": "mamba2.config", "PRESETS": "mamba2.config", "Mamba2LM": "mamba2.models",
                     "InferenceCache": "mamba2.models", "ssd": "mamba2.ssd", "ssd_step": "mamba2.ssd"})
