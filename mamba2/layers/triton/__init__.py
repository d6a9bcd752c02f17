"""Triton kernels of the layers around the SSD: the causal conv1d (:mod:`.conv`), the grouped gated RMSNorm
(:mod:`.norm`), the fused Mamba-2 mixer for training (:mod:`.mixer`) and the Mamba-1 selective scan
(:mod:`.selective_scan`). Needs Triton; which calls run them is decided by :mod:`mamba2.kernels`."""
