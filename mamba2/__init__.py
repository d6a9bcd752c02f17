"""mamba2: Mamba-2 (Dao & Gu 2024, "Transformers are SSMs") from scratch in PyTorch."""

from mamba2.config import PRESETS, Mamba2Config
from mamba2.models import InferenceCache, Mamba2LM
from mamba2.ssd import ssd, ssd_step

__version__ = "0.1.0"
__all__ = ["Mamba2Config", "Mamba2LM", "InferenceCache", "PRESETS", "ssd", "ssd_step", "__version__"]
