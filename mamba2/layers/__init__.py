"""Layers: the causal conv, norms, the Mamba-2 mixer, and the mixers hybrids mix in (attention, Mamba-1, MLP)."""

from mamba2.layers.attention import Attention, AttentionLayerState
from mamba2.layers.conv import CausalConv1d
from mamba2.layers.mamba1 import Mamba1LayerState, Mamba1Mixer
from mamba2.layers.mamba2 import Mamba2LayerState, Mamba2Mixer
from mamba2.layers.mixer import MIXERS, Mixer
from mamba2.layers.mlp import GatedMLP
from mamba2.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["Attention", "AttentionLayerState", "CausalConv1d", "GatedMLP", "GatedRMSNorm", "RMSNorm",
           "Mamba1Mixer", "Mamba1LayerState", "Mamba2Mixer", "Mamba2LayerState", "MIXERS", "Mixer"]
