"""Models: the language model for every layer layout and its inference cache (configuration lives in
:mod:`mamba2.config`)."""

from mamba2.config import ARCHS, PRESETS, Mamba2Config
from mamba2.models.cache import InferenceCache
from mamba2.models.lm import Mamba2LM

__all__ = ["Mamba2Config", "Mamba2LM", "InferenceCache", "PRESETS", "ARCHS"]
