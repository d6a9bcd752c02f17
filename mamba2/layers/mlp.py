"""SwiGLU MLP (Shazeer 2020), laid out like mamba_ssm's ``GatedMLP`` so official checkpoints load."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GatedMLP(nn.Module):
    """``fc2(value · silu(gate))`` where ``[value, gate] = fc1(x)`` (value first, as in mamba_ssm).

    Parameters: ``fc1.weight`` (2·d_intermediate, d_model), ``fc2.weight`` (d_model, d_intermediate); no
    biases unless ``bias``. Unlike mamba_ssm, ``d_intermediate`` is used as given (mamba_ssm rounds it up to a
    multiple of 128; :func:`mamba2.interop.official.config_from_mamba_ssm` applies that rounding).

    Raises:
        ValueError: a non-positive size.
    """

    def __init__(self, d_model: int, d_intermediate: int, bias: bool = False):
        super().__init__()
        if d_model <= 0 or d_intermediate <= 0:
            raise ValueError(f"GatedMLP needs d_model > 0 and d_intermediate > 0, got {d_model}, {d_intermediate}")
        self.fc1 = nn.Linear(d_model, 2 * d_intermediate, bias=bias)
        self.fc2 = nn.Linear(d_intermediate, d_model, bias=bias)
        self.tp = None   # tensor-parallel hooks (mamba2.distributed.tensor_parallel.shard_mlp); None on one device

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_model) → (..., d_model), same dtype."""
        if self.tp is not None:
            value, gate = self.tp.column_parallel(self.fc1, x).chunk(2, dim=-1)
            return self.tp.row_parallel(self.fc2, value * F.silu(gate))
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(value * F.silu(gate))
