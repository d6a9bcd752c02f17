"""Layers: the causal conv, norms and the Mamba-2 mixer."""

from mamba2.layers.conv import CausalConv1d
from mamba2.layers.mamba2 import Mamba2LayerState, Mamba2Mixer
from mamba2.layers.norm import GatedRMSNorm, RMSNorm

__all__ = ["CausalConv1d", "GatedRMSNorm", "RMSNorm", "Mamba2Mixer", "Mamba2LayerState"]
