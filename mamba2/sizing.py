"""Up-front estimates of a training run's peak memory and step time, so that a preset too large for the machine is
refused (or announced) before minutes of loading and a swap storm.

Memory (bytes): ``16·params`` (fp32 weights, gradients, AdamW's two moments) + activations kept for the backward +
``12·tokens·vocab`` for the logits, their fp32 copy and gradient, + the ≈0.4 GB a process with torch loaded holds.
Activations: where the kernels train the layers (:func:`mamba2.kernels.use_triton`, a GPU), the fused Mamba-2 layer
keeps the fp32 residual, the in_proj input and the in_proj output per token and layer (11,324 bytes at the 130m
shape in bf16, ``benchmarks/saved_activations.py``), taken 1.3× for what the backward holds while it runs; elsewhere
(the torch code) ≈250 bytes per token per layer per d_model channel in fp32, measured on CPU (tiny to 130m presets:
230–300), scaled by the compute dtype's size. Step time: ``6·params·tokens`` FLOPs at 40% of the rate this device
reaches on a 1024² matmul (measured here in ~0.1 s). Measured on a quiet 2-core CPU (batch 8 × 256): base-cpu 0.6
s/step (estimate 0.95 s), 130m with the byte vocabulary 12.9 s/step (estimate 10 s); tiny models are overhead-bound
and run ~10× slower than their FLOPs say, and a shared machine is slower too: the step time is an order of
magnitude, the memory figure within ~1.5× on the CPU presets measured.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

ACT_BYTES = 250          # per token, layer and d_model channel, fp32, torch code
KERNEL_ACT_MARGIN = 1.3  # × what the fused layers keep: the backward's transient buffers
BASE_BYTES = 400 * 2**20
REFUSE_ABOVE = 1.25      # × available memory: cannot fit
WARN_ABOVE = 0.8


@dataclass(frozen=True)
class Estimate:
    peak_bytes: int
    available_bytes: int | None
    step_s: float
    model_bytes: int = 0      # weights, gradients and AdamW state (16 bytes per parameter)

    @property
    def fits(self) -> bool:
        return self.available_bytes is None or self.peak_bytes <= REFUSE_ABOVE * self.available_bytes

    @property
    def tight(self) -> bool:
        return self.available_bytes is not None and self.peak_bytes > WARN_ABOVE * self.available_bytes

    def __str__(self) -> str:
        avail = "" if self.available_bytes is None else f" of {self.available_bytes / 2**30:.1f} GiB available"
        return f"peak memory ~{self.peak_bytes / 2**30:.1f} GiB{avail}, ~{_duration(self.step_s)} per step"


def _duration(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min"


def available_memory(device: torch.device) -> int | None:
    """Free memory of ``device`` in bytes (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def matmul_flops(device: torch.device, seconds: float = 0.1) -> float:
    """FLOP/s of fp32 1024 × 1024 matmuls on ``device``, measured for about ``seconds``."""
    a = torch.randn(1024, 1024, device=device)
    b = torch.randn(1024, 1024, device=device)
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while True:
        a @ b
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * 1024**3 * n / elapsed


def activation_bytes(config, device: torch.device, dtype_bytes: int) -> int:
    """Bytes kept for the backward per token and layer (see the module docstring)."""
    from mamba2 import kernels

    try:
        fused = kernels.use_triton(torch.empty(0, device=device, dtype=torch.bfloat16))
    except RuntimeError:        # kernels("on") where they cannot run: the run itself will say so
        fused = False
    if fused:
        return int(KERNEL_ACT_MARGIN * (4 * config.d_model + dtype_bytes * (config.d_model + config.d_in_proj)))
    return config.d_model * ACT_BYTES * dtype_bytes // 4


def estimate_training(config, params: int, batch_size: int, seq_len: int, device: torch.device,
                      dtype_bytes: int = 4) -> Estimate:
    """:class:`Estimate` of one training step of a model of ``config`` with ``params`` parameters on
    ``batch_size`` rows of ``seq_len`` tokens, computing in a dtype of ``dtype_bytes`` bytes."""
    tokens = batch_size * seq_len
    act = tokens * config.n_layer * activation_bytes(config, device, dtype_bytes)
    peak = 16 * params + act + 12 * tokens * config.padded_vocab_size + BASE_BYTES
    step = 6 * params * tokens / (0.4 * matmul_flops(device))
    return Estimate(int(peak), available_memory(device), step, 16 * params)
