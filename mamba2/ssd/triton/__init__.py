"""Triton backend of the SSD: the kernels (``kernels.py``, pure ``@triton.jit``) and their launchers and autograd
(``backend.py``). Needs Triton; :mod:`mamba2.ssd` registers it when Triton imports."""
