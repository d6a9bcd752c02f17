"""A decode step's projections with their RMSNorm as the prologue, one launch each (issue 10; docs/design.md §7.1,
docs/triton_notes.md "Norm + projection"):

    add:    residual' = residual + h;  out = RMSNorm(residual') @ Wᵀ (+ bias)      (block pre-norm → in_proj,
                                                                                    norm_f → lm_head)
    gated:  out = GatedRMSNorm(y, z) @ Wᵀ (+ bias), statistics per group          (mixer norm → out_proj)

With a few rows (decode batches) the cost of a projection is reading W once; the norm needs a whole row, which
every program recomputes from the row (a few KB, read from L2) instead of a separate kernel writing it out and the
GEMM reading it back. The normalised values are rounded to W's dtype before the product, as the unfused path's
norm output is, and the product accumulates in fp32: the same result up to the order of the sums.

Layouts: residual, h, y, z: (M, K), last dim contiguous (rows may be strided: z is a slice of the in_proj output);
W: (N, K) contiguous (``nn.Linear.weight``); out: (M, N) contiguous in W's dtype; residual': (M, K) contiguous in
residual's dtype. Grid (cdiv(N, BN), cdiv(M, BM)); each program loops over the groups of K, twice per group (sum
of squares, then normalise and multiply). Program column 0 also writes residual'. Row offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import INTERPRET, Tuning

DTYPES = (torch.bfloat16, torch.float16)
"""W dtypes the kernel takes (fp32 weights keep cuBLAS: tl.dot would round them to tf32)."""

# Triton's interpreter multiplies bf16 operands of tl.dot wrongly (as in mamba2/ssd/triton/kernels.py): there
# the operands, already rounded to W's dtype, are upcast (the same products, exact fp32 math).
_UPCAST = tl.constexpr(INTERPRET)

# FUSE: use these kernels in the decode step (off until timed against cuBLAS on a GPU: docs/triton_notes.md).
# MAX_M: more rows than this take the unfused path (a GEMM with enough rows is cuBLAS's ground).
TUNING = Tuning("norm_linear", {
    "decode": dict(FUSE=False, MAX_M=64, BN=16, BK=128, num_warps=4, num_stages=2),
})


@triton.jit
def _row_values(v_ptr, h_ptr, z_ptr, r64, mr, g, GS, k0, s_vm, s_hm, s_zm, BK: tl.constexpr,
                HAS_H: tl.constexpr, HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr, R_TY: tl.constexpr):
    """Columns [k0, k0 + BK) of group g: (their offsets in K, their mask, the (BM, BK) fp32 values that are
    normalised: residual + h rounded to the residual's dtype, or y · silu(z) when the gate comes before the norm,
    or y)."""
    kk = k0 + tl.arange(0, BK)
    mk = kk < GS
    ks = g * GS + kk
    m = mr[:, None] & mk[None, :]
    v = tl.load(v_ptr + r64[:, None] * s_vm + ks[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_H:
        hv = tl.load(h_ptr + r64[:, None] * s_hm + ks[None, :], mask=m, other=0.0).to(R_TY).to(tl.float32)
        v = (v + hv).to(R_TY).to(tl.float32)
    if HAS_Z:
        if GATE_FIRST:
            zv = tl.load(z_ptr + r64[:, None] * s_zm + ks[None, :], mask=m, other=0.0).to(tl.float32)
            v = v * (zv * tl.sigmoid(zv))
    return ks, mk, v


@triton.jit
def norm_linear_kernel(v_ptr, h_ptr, z_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, rout_ptr,
                       M, N, K, GS, eps, s_vm, s_hm, s_zm, s_rom,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_H: tl.constexpr,
                       HAS_Z: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr,
                       STORE_R: tl.constexpr):
    """out[rows, cols] = norm(v[rows]) @ W[cols]ᵀ (+ bias) for BM rows × BN output columns."""
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    mr = rows < M
    r64 = rows.to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    mn = cols < N
    c64 = cols.to(tl.int64)
    R_TY = rout_ptr.dtype.element_ty
    W_TY = w_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for g in range(0, K // GS):
        ss = tl.zeros((BM,), dtype=tl.float32)
        for k0 in range(0, GS, BK):
            ks, mk, v = _row_values(v_ptr, h_ptr, z_ptr, r64, mr, g, GS, k0, s_vm, s_hm, s_zm, BK, HAS_H, HAS_Z,
                                    GATE_FIRST, R_TY)
            if STORE_R:
                if pid_n == 0:
                    tl.store(rout_ptr + r64[:, None] * s_rom + ks[None, :], v.to(R_TY),
                             mask=mr[:, None] & mk[None, :])
            ss += tl.sum(v * v, axis=1)
        rstd = tl.rsqrt(ss / GS + eps)
        for k0 in range(0, GS, BK):
            ks, mk, v = _row_values(v_ptr, h_ptr, z_ptr, r64, mr, g, GS, k0, s_vm, s_hm, s_zm, BK, HAS_H, HAS_Z,
                                    GATE_FIRST, R_TY)
            nw = tl.load(nw_ptr + ks, mask=mk, other=0.0).to(tl.float32)
            x = v * rstd[:, None] * nw[None, :]
            if HAS_Z:
                if not GATE_FIRST:
                    zv = tl.load(z_ptr + r64[:, None] * s_zm + ks[None, :], mask=mr[:, None] & mk[None, :],
                                 other=0.0).to(tl.float32)
                    x = x * (zv * tl.sigmoid(zv))
            w = tl.load(w_ptr + c64[None, :] * K + ks[:, None], mask=mn[None, :] & mk[:, None], other=0.0)
            if _UPCAST:
                acc += tl.dot(x.to(W_TY).to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(x.to(W_TY), w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mn, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + r64[:, None] * N + c64[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mr[:, None] & mn[None, :])


def supports(rows: Tensor, weight: Tensor, *vectors: Tensor | None) -> bool:
    """Whether the kernel takes a projection of ``rows`` (M, K) by ``weight`` (N, K) in the decode step: 16-bit W,
    contiguous and K wide, at most the tuning's MAX_M rows, last dims contiguous, and ``vectors`` (the norm weight,
    the bias; None: absent) contiguous: the kernel reads all of them with stride 1."""
    return (weight.dtype in DTYPES and weight.is_contiguous() and rows.dim() == 2 and weight.dim() == 2
            and weight.shape[1] == rows.shape[1] and rows.shape[0] <= TUNING["decode"]["MAX_M"]
            and rows.stride(-1) == 1 and all(v is None or v.is_contiguous() for v in vectors))


def _launch(v: Tensor, h: Tensor | None, z: Tensor | None, norm_weight: Tensor, weight: Tensor,
            bias: Tensor | None, rout: Tensor | None, *, group_size: int, eps: float, gate_first: bool) -> Tensor:
    M, K = v.shape
    N = weight.shape[0]
    out = torch.empty(M, N, device=v.device, dtype=weight.dtype)
    p = TUNING["decode"]
    BM = max(16, triton.next_power_of_2(M))
    grid = (triton.cdiv(N, p["BN"]), triton.cdiv(M, BM))
    norm_linear_kernel[grid](
        v, h if h is not None else v, z if z is not None else v, norm_weight, weight,
        bias if bias is not None else weight, out, rout if rout is not None else v,
        M, N, K, group_size, eps, v.stride(0), h.stride(0) if h is not None else 0,
        z.stride(0) if z is not None else 0, rout.stride(0) if rout is not None else 0,
        BM=BM, BN=p["BN"], BK=max(16, min(p["BK"], triton.next_power_of_2(group_size))), HAS_H=h is not None,
        HAS_Z=z is not None, GATE_FIRST=gate_first, HAS_BIAS=bias is not None, STORE_R=rout is not None,
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out


def add_rms_norm_linear(h: Tensor | None, residual: Tensor, norm_weight: Tensor, weight: Tensor,
                        bias: Tensor | None, *, eps: float) -> tuple[Tensor, Tensor]:
    """``residual' = residual + h`` (h cast to residual's dtype; None: no add) and
    ``F.linear(RMSNorm(residual').to(weight.dtype), weight, bias)`` in one launch; no autograd.

    Args:
        h, residual: (M, K), last dim contiguous; norm_weight: (K,); weight: (N, K) bf16/fp16, contiguous.
    Returns:
        (out (M, N) in weight's dtype, residual' (M, K) in residual's dtype).
    """
    rout = torch.empty(residual.shape, device=residual.device, dtype=residual.dtype)
    out = _launch(residual, h, None, norm_weight, weight, bias, rout, group_size=residual.shape[1], eps=eps,
                  gate_first=False)
    return out, rout


def gated_rms_norm_linear(y: Tensor, z: Tensor, norm_weight: Tensor, weight: Tensor, bias: Tensor | None, *,
                          group_size: int, eps: float, norm_before_gate: bool) -> Tensor:
    """``F.linear(GatedRMSNorm(y, z).to(weight.dtype), weight, bias)`` in one launch (the norm of
    :class:`mamba2.layers.norm.GatedRMSNorm`: per group of ``group_size`` channels, the gate silu(z) before the
    statistics unless ``norm_before_gate``); no autograd.

    Args:
        y, z: (M, K), last dim contiguous (rows may be strided); norm_weight: (K,); weight: (N, K) bf16/fp16.
    Returns:
        (M, N) in weight's dtype.
    """
    return _launch(y, None, z, norm_weight, weight, bias, None, group_size=group_size, eps=eps,
                   gate_first=not norm_before_gate)
