"""Triton kernels of the layers around the SSD: the causal conv1d (:mod:`.conv`) and the grouped gated RMSNorm
(:mod:`.norm`). Needs Triton; which calls run them is decided by :mod:`mamba2.kernels`."""
