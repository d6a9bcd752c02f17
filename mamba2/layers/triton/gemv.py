"""``x @ W.T (+ b)`` for a few rows (a decode batch) as one Triton kernel on the CUDA cores (docs/triton_notes.md,
"A GEMV for the decode step").

At batch 1 a decode step's projections are matrix-vector products that read each weight once: their time is the
weight bytes over the memory bandwidth, plus the ramp of one kernel. Each program owns ``BN`` output columns and
streams their ``BN × K`` slice of W in ``BK``-wide tiles (contiguous along K: wide vector loads), multiplying with
all ``M`` rows of x at once (fp32 products kept per lane, one reduction at the end), so W is read exactly once
whatever M is. Layouts: x (M, K), W (N, K) and bias (N,) with any strides, y (M, N) contiguous in x's dtype;
fp32 accumulation. Offsets into W are int64 (an LM head can pass 2³¹ elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import Tuning

# MAX_ROWS: the most rows that take this kernel (0: none, the default until it is timed against cuBLAS on the
# GPU); ELEMS: fp32 product lanes per program (MB·BN·BK), which sets BK.
TUNING = Tuning("gemv", {"linear": dict(MAX_ROWS=0, BN=16, ELEMS=4096, num_warps=4)})


@triton.jit
def gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_xk, s_wn, s_wk, s_b, s_ym,
                MB: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[:, cols] for the BN columns of this program, all M (<= MB) rows."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = offs_n < N
    n64 = offs_n.to(tl.int64)
    offs_m = tl.arange(0, MB)
    mm = offs_m < M
    acc = tl.zeros((MB, BN, BK), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mk = offs_k < K
        w = tl.load(w_ptr + n64[:, None] * s_wn + offs_k.to(tl.int64)[None, :] * s_wk, mask=mn[:, None] & mk[None, :],
                    other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + offs_m[:, None] * s_xm + offs_k[None, :] * s_xk, mask=mm[:, None] & mk[None, :],
                     other=0.0).to(tl.float32)
        acc += xv[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n * s_b, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * s_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mm[:, None] & mn[None, :])


def takes(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear_rows` runs for ``x`` (rows, K) and ``weight`` (N, K): at most the "linear" tuning's
    MAX_ROWS rows, one dtype. Whether kernels run at all is :func:`mamba2.kernels.use_triton`'s choice."""
    return x.dim() == 2 and 0 < x.shape[0] <= TUNING["linear"]["MAX_ROWS"] and weight.dtype == x.dtype


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` for a few rows (see the module docstring): x (M, K), weight (N, K), bias (N,)
    or None, fp32/bf16/fp16 on one device. Returns (M, N) in x's dtype; no autograd."""
    M, K = x.shape
    N = weight.shape[0]
    if M == 0 or N == 0:
        return torch.empty(M, N, device=x.device, dtype=x.dtype)
    c = TUNING["linear"]
    MB = triton.next_power_of_2(M)
    BN = min(c["BN"], triton.next_power_of_2(N))
    BK = max(16, min(triton.next_power_of_2(K), c["ELEMS"] // (MB * BN)))
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    gemv_kernel[(triton.cdiv(N, BN),)](x, weight, bias if bias is not None else weight, y, M, N, K,
                                       *x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
                                       y.stride(0), MB=MB, BN=BN, BK=BK,
                                       HAS_BIAS=bias is not None, num_warps=c["num_warps"])
    return y
