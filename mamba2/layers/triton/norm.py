"""Triton kernels for the grouped gated RMSNorm of the Mamba-2 block (docs/design.md §2 step 4) and the plain RMSNorm.

    gate off (z None):           out = y · rstd · w
    norm after gate (default):   out = (y · silu z) · rstd · w,   rstd = 1 / sqrt(mean_group((y · silu z)²) + eps)
    norm before gate:            out = y · rstd · w · silu z,     rstd = 1 / sqrt(mean_group(y²) + eps)

Statistics are taken per (row, group) of ``group_size`` contiguous channels (docs/design.md §5.4). Layouts (``R``
rows = all leading dims flattened, ``d`` channels, ``G = d / group_size`` groups):
  y, z, dout: (R, d) any strides          out, dy, dz: (R, d) contiguous, in y's / z's dtype
  w: (d,) contiguous                      rstd: (G, R) fp32, saved by the forward for the backward
  dw_part: (P, d) fp32, one row of partial sums of dw per row-program of the backward (summed in torch)

Forward grid (cdiv(R, BR), G): one block of BR rows × one group, in one pass (load, fp32 math, store).
Backward grid (P, G): each program walks a contiguous range of row blocks, writes dy (and dz) and keeps its
partial dw in registers; no atomics, so the result is deterministic. The rest of the forward (gate, x̂) is
recomputed from y, z and rstd. Row offsets are int64 (docs/design.md §5.17); all math is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import KERNEL_DTYPES as _DTYPES
from mamba2.kernels import Tuning, keeps_context

# the largest group one program holds in registers (the one-pass design); larger groups take the torch code
MAX_GROUP = 16384

# Launch parameters. ELEMS: target BR·BN elements per program (BR grows for small groups, up to MAX_BR);
# BR / PROGS: fixed row block / number of backward row-programs (None = chosen from the shape and the GPU).
TUNING = Tuning("norm", {
    "fwd": dict(ELEMS=4096, MAX_BR=64, BR=None),
    "add": dict(num_warps=4),
    "bwd": dict(ELEMS=4096, MAX_BR=64, BR=None, PROGS_PER_SM=4, PROGS=None),
})


@triton.jit
def gated_rmsnorm_fwd_kernel(y_ptr, z_ptr, w_ptr, out_ptr, rstd_ptr, R, GS, eps,
                             s_yr, s_yc, s_zr, s_zc, s_or, s_oc,
                             BR: tl.constexpr, BN: tl.constexpr, HAS_Z: tl.constexpr,
                             NORM_BEFORE_GATE: tl.constexpr, STORE_RSTD: tl.constexpr):
    """out[rows, group] for BR rows and one group (BN >= GS columns, masked); rstd[group, rows] if STORE_RSTD."""
    g = tl.program_id(1)
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BN)
    mr = rows < R
    mc = cols < GS
    m = mr[:, None] & mc[None, :]
    r64 = rows.to(tl.int64)
    ch = (g * GS + cols).to(tl.int64)
    h = tl.load(y_ptr + r64[:, None] * s_yr + ch[None, :] * s_yc, mask=m, other=0.0).to(tl.float32)
    if HAS_Z:
        zv = tl.load(z_ptr + r64[:, None] * s_zr + ch[None, :] * s_zc, mask=m, other=0.0).to(tl.float32)
        gate = zv * tl.sigmoid(zv)
        if not NORM_BEFORE_GATE:
            h = h * gate
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / GS + eps)
    w = tl.load(w_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    o = h * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            o = o * gate
    tl.store(out_ptr + r64[:, None] * s_or + ch[None, :] * s_oc, o.to(out_ptr.dtype.element_ty), mask=m)
    if STORE_RSTD:
        tl.store(rstd_ptr + g.to(tl.int64) * R + r64, rstd, mask=mr)


@triton.jit
def gated_rmsnorm_bwd_kernel(dout_ptr, y_ptr, z_ptr, w_ptr, rstd_ptr, dy_ptr, dz_ptr, dwp_ptr,
                             R, GS, D, BPP,
                             s_dr, s_dc, s_yr, s_yc, s_zr, s_zc, s_dyr, s_dyc, s_dzr, s_dzc,
                             BR: tl.constexpr, BN: tl.constexpr, HAS_Z: tl.constexpr,
                             NORM_BEFORE_GATE: tl.constexpr, STORE_DZ: tl.constexpr):
    """Row blocks [pid·BPP, (pid+1)·BPP) of one group: dy, dz (if STORE_DZ), and this program's partial dw.

    With x̂ = h·rstd (h the normalised input) and dx̂ = ∂L/∂x̂:  dh = rstd · (dx̂ − x̂ · mean_group(dx̂ · x̂)).
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, BN)
    mc = cols < GS
    ch = (g * GS + cols).to(tl.int64)
    w = tl.load(w_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((BN,), dtype=tl.float32)
    start = pid * BPP
    end = tl.minimum(start + BPP, tl.cdiv(R, BR))
    for blk in range(start, end):
        rows = blk * BR + tl.arange(0, BR)
        mr = rows < R
        m = mr[:, None] & mc[None, :]
        r64 = rows.to(tl.int64)
        yv = tl.load(y_ptr + r64[:, None] * s_yr + ch[None, :] * s_yc, mask=m, other=0.0).to(tl.float32)
        do = tl.load(dout_ptr + r64[:, None] * s_dr + ch[None, :] * s_dc, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + g.to(tl.int64) * R + r64, mask=mr, other=0.0)
        if HAS_Z:
            zv = tl.load(z_ptr + r64[:, None] * s_zr + ch[None, :] * s_zc, mask=m, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            gate = zv * sig
            dgate = sig * (1.0 + zv * (1.0 - sig))      # silu'(z)
            if NORM_BEFORE_GATE:
                xhat = yv * rstd[:, None]
                dw += tl.sum(do * xhat * gate, axis=0)
                dxhat = do * gate * w[None, :]
                dz = do * xhat * w[None, :] * dgate
            else:
                xhat = yv * gate * rstd[:, None]
                dw += tl.sum(do * xhat, axis=0)
                dxhat = do * w[None, :]
        else:
            xhat = yv * rstd[:, None]
            dw += tl.sum(do * xhat, axis=0)
            dxhat = do * w[None, :]
        dh = (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / GS)[:, None]) * rstd[:, None]
        if HAS_Z:
            if NORM_BEFORE_GATE:
                dyv = dh
            else:
                dyv = dh * gate
                dz = dh * yv * dgate
            if STORE_DZ:
                tl.store(dz_ptr + r64[:, None] * s_dzr + ch[None, :] * s_dzc, dz.to(dz_ptr.dtype.element_ty),
                         mask=m)
        else:
            dyv = dh
        tl.store(dy_ptr + r64[:, None] * s_dyr + ch[None, :] * s_dyc, dyv.to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dwp_ptr + pid.to(tl.int64) * D + ch, dw, mask=mc)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------

def _blocks(group_size: int, rows: int, c: dict) -> tuple[int, int, int]:
    """(BR, BN, num_warps): BN covers the group; BR rows per block so that BR·BN ≈ ELEMS (≥ 1, ≤ MAX_BR, not far
    past the row count); one warp per 512 elements of the block (≤ 16 elements per thread up to 16 warps)."""
    BN = triton.next_power_of_2(group_size)
    BR = c["BR"] or max(1, min(c["MAX_BR"], c["ELEMS"] // BN, triton.next_power_of_2(max(rows, 1))))
    num_warps = min(16, max(1, BR * BN // 512))
    return BR, BN, num_warps


def _bwd_programs(nblk: int, ngroups: int, device: torch.device) -> int:
    c = TUNING["bwd"]
    if c["PROGS"]:
        want = c["PROGS"]
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, c["PROGS_PER_SM"] * sms // ngroups)
    else:
        want = 4
    return max(1, min(nblk, want))


def _forward(y: Tensor, z: Tensor | None, w: Tensor, group_size: int, eps: float, norm_before_gate: bool,
             store_rstd: bool) -> tuple[Tensor, Tensor | None]:
    R, d = y.shape
    G = d // group_size
    out = torch.empty((R, d), device=y.device, dtype=y.dtype)
    rstd = torch.empty((G, R), device=y.device, dtype=torch.float32) if store_rstd else None
    if R == 0:
        return out, rstd
    BR, BN, num_warps = _blocks(group_size, R, TUNING["fwd"])
    zz = z if z is not None else y
    gated_rmsnorm_fwd_kernel[(triton.cdiv(R, BR), G)](
        y, zz, w, out, rstd if rstd is not None else out, R, group_size, float(eps),
        *y.stride(), *zz.stride(), *out.stride(), BR=BR, BN=BN, HAS_Z=z is not None,
        NORM_BEFORE_GATE=bool(norm_before_gate), STORE_RSTD=store_rstd, num_warps=num_warps)
    return out, rstd


def _backward(dout: Tensor, y: Tensor, z: Tensor | None, w: Tensor, rstd: Tensor, group_size: int,
              norm_before_gate: bool, need_dz: bool, dz_out: Tensor | None = None
              ) -> tuple[Tensor, Tensor | None, Tensor]:
    """dy, dz (written into ``dz_out``, an (R, d) view of z's dtype, when given) and the fp32 dweight."""
    R, d = y.shape
    G = d // group_size
    dy = torch.empty((R, d), device=y.device, dtype=y.dtype)
    dz = None
    if z is not None and need_dz:
        dz = dz_out if dz_out is not None else torch.empty((R, d), device=y.device, dtype=z.dtype)
    if R == 0:
        return dy, dz, torch.zeros(d, device=y.device, dtype=torch.float32)
    BR, BN, num_warps = _blocks(group_size, R, TUNING["bwd"])
    nblk = triton.cdiv(R, BR)
    P = _bwd_programs(nblk, G, y.device)
    bpp = triton.cdiv(nblk, P)
    P = triton.cdiv(nblk, bpp)          # no program without rows
    dw_part = torch.empty((P, d), device=y.device, dtype=torch.float32)
    zz = z if z is not None else y
    dzz = dz if dz is not None else dy
    gated_rmsnorm_bwd_kernel[(P, G)](
        dout, y, zz, w, rstd, dy, dzz, dw_part, R, group_size, d, bpp,
        *dout.stride(), *y.stride(), *zz.stride(), *dy.stride(), *dzz.stride(),
        BR=BR, BN=BN, HAS_Z=z is not None, NORM_BEFORE_GATE=bool(norm_before_gate), STORE_DZ=dz is not None,
        num_warps=num_warps)
    return dy, dz, dw_part.sum(0)


@keeps_context
class _GatedRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, group_size, eps, norm_before_gate):
        d = y.shape[-1]
        y2 = y.reshape(-1, d)
        z2 = z.reshape(-1, d) if z is not None else None
        w = weight.contiguous()
        need = any(ctx.needs_input_grad[:3])
        out, rstd = _forward(y2, z2, w, group_size, eps, norm_before_gate, store_rstd=need)
        if need:
            ctx.save_for_backward(y2, z2, w, rstd)
        ctx.cfg = (y.shape, None if z is None else z.shape, group_size, norm_before_gate)
        return out.view(y.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        y2, z2, w, rstd = ctx.saved_tensors
        y_shape, z_shape, group_size, norm_before_gate = ctx.cfg
        need_y, need_z, need_w = ctx.needs_input_grad[:3]
        dy, dz, dw = _backward(dout.reshape(-1, y2.shape[-1]), y2, z2, w, rstd, group_size, norm_before_gate,
                               need_dz=need_z)
        return (dy.view(y_shape) if need_y else None, dz.view(z_shape) if need_z else None,
                dw.to(w.dtype) if need_w else None, None, None, None)


def supports(y: Tensor, z: Tensor | None, weight: Tensor, group_size: int) -> bool:
    """Whether the kernels take these inputs: fp32/bf16/fp16 tensors on one device, a group that fits one
    program (``group_size <= MAX_GROUP``). Which devices run kernels is :func:`mamba2.kernels.use_triton`'s
    choice."""
    ok = y.dtype in _DTYPES and weight.dtype in _DTYPES and weight.device == y.device
    if z is not None:
        ok = ok and z.dtype in _DTYPES and z.device == y.device
    return ok and 0 < group_size <= MAX_GROUP


def gated_rms_norm(y: Tensor, z: Tensor | None, weight: Tensor, *, group_size: int, eps: float,
                   norm_before_gate: bool = False) -> Tensor:
    """Grouped gated RMSNorm as Triton kernels (forward and backward); the same results as
    :class:`mamba2.layers.norm.GatedRMSNorm` (and, with ``z=None`` and ``group_size=d``, :class:`RMSNorm`).

    Args:
        y: (..., d) any leading dims and strides, fp32/bf16/fp16.
        z: (..., d) like y (any float dtype of those three), or None for no gate.
        weight: (d,).
        group_size: channels per group; d % group_size == 0, group_size <= MAX_GROUP.
        eps: added to the mean square.
        norm_before_gate: ``RMSNorm(y) · silu(z)`` instead of ``RMSNorm(y · silu(z))``.
    Returns:
        (..., d) in y's dtype. Gradients flow to y, z and weight (dweight in weight's dtype, deterministic).
    Raises:
        ValueError: shapes that do not fit, a group larger than MAX_GROUP, a dtype other than fp32/bf16/fp16.
    """
    for name, t in (("y", y), ("z", z), ("weight", weight)):
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"gated_rms_norm (Triton) takes {name} in float32/bfloat16/float16, got {t.dtype}")
    if y.dim() < 1:
        raise ValueError(f"gated_rms_norm: y must be (..., d), got shape {tuple(y.shape)}")
    d = y.shape[-1]
    if group_size <= 0 or d % group_size != 0:
        raise ValueError(f"gated_rms_norm: d % group_size == 0 required, got d={d}, group_size={group_size}")
    if group_size > MAX_GROUP:
        raise ValueError(f"gated_rms_norm: group_size <= {MAX_GROUP} required, got {group_size}")
    if weight.shape != (d,):
        raise ValueError(f"gated_rms_norm: weight must have shape ({d},), got {tuple(weight.shape)}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"gated_rms_norm: z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    return _GatedRMSNormTriton.apply(y, z, weight, group_size, eps, norm_before_gate)



@triton.jit
def add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, rout_ptr, D, eps, s_xr, s_rr, s_or, s_ror,
                       BN: tl.constexpr, HAS_X: tl.constexpr):
    """Row r: residual' = residual (+ x); out = residual' · rstd · w. One program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BN)
    m = cols < D
    h = tl.load(r_ptr + row * s_rr + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_X:
        h += tl.load(x_ptr + row * s_xr + cols, mask=m, other=0.0).to(rout_ptr.dtype.element_ty).to(tl.float32)
        h = h.to(rout_ptr.dtype.element_ty).to(tl.float32)
    tl.store(rout_ptr + row * s_ror + cols, h.to(rout_ptr.dtype.element_ty), mask=m)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * s_or + cols, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: Tensor | None, residual: Tensor, weight: Tensor, *, eps: float,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``residual' = residual + x`` (x cast to residual's dtype first) and ``RMSNorm(residual')`` in one launch,
    the pre-norm residual step of a decode step (docs/design.md §7.1); no autograd.

    Args:
        x: (R, d) or None (then residual' = residual); residual: (R, d), last dim contiguous; weight: (d,).
        out_dtype: dtype of the normalised output.
    Returns:
        (out (R, d) in out_dtype, residual' (R, d) in residual's dtype) — what
        :meth:`mamba2.layers.norm.RMSNorm.add_forward` returns.
    """
    R, d = residual.shape
    out = torch.empty(R, d, device=residual.device, dtype=out_dtype)
    rout = torch.empty_like(residual)
    xx = x if x is not None else residual
    weight = weight.contiguous()               # the kernel reads it with stride 1 (a view loaded by assign=True)
    add_rmsnorm_kernel[(R,)](xx, residual, weight, out, rout, d, eps, xx.stride(0), residual.stride(0),
                             out.stride(0), rout.stride(0), BN=triton.next_power_of_2(d), HAS_X=x is not None,
                             num_warps=TUNING["add"]["num_warps"])
    return out, rout
