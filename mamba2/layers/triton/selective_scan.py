"""Triton kernels of the Mamba-1 selective scan (:func:`mamba2.layers.selective_scan.selective_scan` on CUDA):
the recurrence itself, forward and backward, with the state kept in registers and never written per token.

Per channel d and state n, with the processed step ``dt`` (softplus and bias applied by the caller, in torch):

    h_t = r_t · exp(dt_t[d]·A[d, n]) · h_{t-1} + dt_t[d]·u_t[d]·B_t[n],      y_t[d] = Σ_n h_t[d, n]·C_t[n]

where r_t = 0 at a document start (``reset``; the state is cut) and 1 elsewhere. The D skip and the z gate are the
caller's (torch, elementwise). Layouts (``b`` batch, ``L`` tokens, ``d`` channels, ``n`` d_state):

  dt: (b, L, d) fp32 contiguous      u: (b, L, d) any float, any strides      A: (d, n) fp32 contiguous
  B, C: (b, L, n) any float, any strides          reset: (b, L) int8 contiguous (1 at a document start)
  h0, h_final, dh_final, dh0: (b, d, n) fp32 contiguous                       y, dy: (b, L, d) fp32 contiguous
  checkpoints: (b, ceil(L/CH), d, n) fp32: the state before each chunk of CH tokens (forward writes, backward reads)
  scratch: (b, nD, CH, BD, BN) fp32: one chunk's states, recomputed by the backward from its checkpoint

One program owns (batch row, BD channels) × all n and walks the tokens in order: forward h in registers; backward
chunk by chunk from the end, each chunk's states recomputed into its scratch slice, then walked backwards with the
adjoint g_t = dy_t·C_t + r_{t+1}·exp(dt_{t+1}A)·g_{t+1}:

    d dt_t = Σ_n g_t·(A·exp(dt_t A)·h'_{t-1} + u_t·B_t)      du_t = dt_t·Σ_n g_t·B_t        dA += g_t·dt_t·exp(dt_t A)·h'_{t-1}
    dB_t = Σ_d g_t·dt_t·u_t        dC_t = Σ_d dy_t·h_t         (h'_{t-1} = r_t·h_{t-1})

dB and dC sum over channels, i.e. over programs: they are accumulated with fp32 atomic adds (the order, and so the
last bits, can vary from run to run). Offsets that grow with b·L·d are int64 (docs/design.md §5.17).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import Tuning, keeps_context

# BD channels per program: the (BD, BN) state and its companions live in registers, so BD shrinks as d_state grows
# (ELEMS bounds BD·BN); CH tokens per checkpoint (memory of the backward: b·d·n·4 bytes per chunk, plus the scratch).
TUNING = Tuning("selective_scan", {
    "fwd": dict(ELEMS=4096, BD_MAX=64, CH=64, num_warps=4),
    "bwd": dict(ELEMS=2048, BD_MAX=32, num_warps=4),
})


def _blocks(entry: str, d: int, n: int) -> tuple[int, int]:
    p = TUNING[entry]
    BN = triton.next_power_of_2(n)
    BD = max(1, min(p["BD_MAX"], p["ELEMS"] // BN, triton.next_power_of_2(d)))
    return BD, BN


@triton.jit
def _fwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, h0_ptr, y_ptr, hT_ptr, ck_ptr, ends_ptr, docs_ptr,
                L, d, n, s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, s_cb, s_cl, s_cn,
                BD: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, HAS_H0: tl.constexpr,
                HAS_RESET: tl.constexpr, HAS_ENDS: tl.constexpr):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    b64 = pid_b.to(tl.int64)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    md, mn = offs_d < d, offs_n < n
    mdn = md[:, None] & mn[None, :]
    dn = offs_d[:, None].to(tl.int64) * n + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mdn, other=0.0)
    if HAS_H0:
        h = tl.load(h0_ptr + b64 * d * n + dn, mask=mdn, other=0.0)
    else:
        h = tl.zeros((BD, BN), dtype=tl.float32)
    nck = tl.cdiv(L, CH)
    for t in range(0, L):
        if t % CH == 0:
            tl.store(ck_ptr + (b64 * nck + t // CH) * d * n + dn, h, mask=mdn)
        t64 = tl.cast(t, tl.int64)          # t · stride passes 2^31 on wide, long rows
        row = b64 * L + t64
        dt = tl.load(dt_ptr + row * d + offs_d, mask=md, other=0.0)
        u = tl.load(u_ptr + b64 * s_ub + t64 * s_ul + offs_d * s_ud, mask=md, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + b64 * s_bb + t64 * s_bl + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + b64 * s_cb + t64 * s_cl + offs_n * s_cn, mask=mn, other=0.0).to(tl.float32)
        decay = tl.exp(dt[:, None] * A)
        if HAS_RESET:
            keep = 1.0 - tl.load(reset_ptr + row).to(tl.float32)
            decay = decay * keep
        h = decay * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        tl.store(y_ptr + row * d + offs_d, y, mask=md)
        if HAS_ENDS:
            k = tl.load(ends_ptr + row)
            if k >= 0:
                tl.store(docs_ptr + k.to(tl.int64) * d * n + dn, h, mask=mdn)
    tl.store(hT_ptr + b64 * d * n + dn, h, mask=mdn)


@triton.jit
def _bwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, ck_ptr, dy_ptr, dhT_ptr, scratch_ptr,
                ddt_ptr, du_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                L, d, n, s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, s_cb, s_cl, s_cn,
                BD: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, HAS_DHT: tl.constexpr,
                HAS_RESET: tl.constexpr):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    b64 = pid_b.to(tl.int64)
    nD = tl.num_programs(1)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    md, mn = offs_d < d, offs_n < n
    mdn = md[:, None] & mn[None, :]
    dn = offs_d[:, None].to(tl.int64) * n + offs_n[None, :]
    tile = tl.arange(0, BD)[:, None] * BN + offs_n[None, :]
    scratch = scratch_ptr + ((b64 * nD + pid_d) * CH) * BD * BN
    A = tl.load(A_ptr + dn, mask=mdn, other=0.0)
    if HAS_DHT:
        g = tl.load(dhT_ptr + b64 * d * n + dn, mask=mdn, other=0.0)
    else:
        g = tl.zeros((BD, BN), dtype=tl.float32)
    dA = tl.zeros((BD, BN), dtype=tl.float32)
    nck = tl.cdiv(L, CH)
    for cr in range(0, nck):
        c = nck - 1 - cr
        start = c * CH
        end = tl.minimum(start + CH, L)
        h_start = tl.load(ck_ptr + (b64 * nck + c) * d * n + dn, mask=mdn, other=0.0)
        h = h_start
        for t in range(start, end):          # the chunk's states again, into this program's scratch
            t64 = tl.cast(t, tl.int64)          # t · stride passes 2^31 on wide, long rows
            row = b64 * L + t64
            dt = tl.load(dt_ptr + row * d + offs_d, mask=md, other=0.0)
            u = tl.load(u_ptr + b64 * s_ub + t64 * s_ul + offs_d * s_ud, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b64 * s_bb + t64 * s_bl + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
            decay = tl.exp(dt[:, None] * A)
            if HAS_RESET:
                decay = decay * (1.0 - tl.load(reset_ptr + row).to(tl.float32))
            h = decay * h + (dt * u)[:, None] * Bt[None, :]
            tl.store(scratch + (t - start) * BD * BN + tile, h)
        for tr in range(start, end):
            t = end - 1 - (tr - start)
            t64 = tl.cast(t, tl.int64)          # t · stride passes 2^31 on wide, long rows
            row = b64 * L + t64
            dt = tl.load(dt_ptr + row * d + offs_d, mask=md, other=0.0)
            u = tl.load(u_ptr + b64 * s_ub + t64 * s_ul + offs_d * s_ud, mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + b64 * s_bb + t64 * s_bl + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + b64 * s_cb + t64 * s_cl + offs_n * s_cn, mask=mn, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * d + offs_d, mask=md, other=0.0)
            h = tl.load(scratch + (t - start) * BD * BN + tile)
            if t > start:
                h_prev = tl.load(scratch + (t - 1 - start) * BD * BN + tile)
            else:
                h_prev = h_start
            decay = tl.exp(dt[:, None] * A)
            if HAS_RESET:
                keep = 1.0 - tl.load(reset_ptr + row).to(tl.float32)
                decay = decay * keep            # also zeroes h_prev's terms below: h'_{t-1} = keep·h_{t-1}
            g += dy[:, None] * Ct[None, :]
            tl.atomic_add(dC_ptr + row * n + offs_n, tl.sum(tl.where(mdn, dy[:, None] * h, 0.0), axis=0), mask=mn)
            gh = g * decay * h_prev
            tl.store(ddt_ptr + row * d + offs_d, tl.sum(gh * A + g * (u[:, None] * Bt[None, :]), axis=1), mask=md)
            tl.store(du_ptr + row * d + offs_d, dt * tl.sum(g * Bt[None, :], axis=1), mask=md)
            tl.atomic_add(dB_ptr + row * n + offs_n, tl.sum(tl.where(mdn, g * (dt * u)[:, None], 0.0), axis=0),
                          mask=mn)
            dA += gh * dt[:, None]
            g = g * decay
    tl.store(dh0_ptr + b64 * d * n + dn, g, mask=mdn)
    tl.atomic_add(dA_ptr + dn, dA, mask=mdn)


def _strides(u: Tensor, B: Tensor, C: Tensor) -> tuple[int, ...]:
    return (*u.stride(), *B.stride(), *C.stride())


@keeps_context
class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, reset: Tensor | None,
                h0: Tensor | None, ends: Tensor | None, num_docs: int):
        b, L, d = u.shape
        n = A.shape[1]
        dt_dtype, A_dtype = dt.dtype, A.dtype
        dt, A = dt.float().contiguous(), A.float().contiguous()
        h0c = None if h0 is None else h0.float().contiguous()
        BD, BN = _blocks("fwd", d, n)
        p = TUNING["fwd"]
        CH = p["CH"]
        y = torch.empty(b, L, d, device=u.device, dtype=torch.float32)
        hT = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
        ck = torch.empty(b, math.ceil(L / CH), d, n, device=u.device, dtype=torch.float32)
        per_doc = torch.zeros(num_docs, d, n, device=u.device, dtype=torch.float32)
        _fwd_kernel[(b, triton.cdiv(d, BD))](
            dt, u, A, B, C, reset, h0c, y, hT, ck, ends, per_doc, L, d, n, *_strides(u, B, C),
            BD=BD, BN=BN, CH=CH, HAS_H0=h0 is not None, HAS_RESET=reset is not None, HAS_ENDS=ends is not None,
            num_warps=p["num_warps"])
        ctx.mark_non_differentiable(per_doc)
        ctx.save_for_backward(dt, u, A, B, C, reset, ck)
        ctx.has_h0, ctx.CH, ctx.dtypes = h0 is not None, CH, (dt_dtype, A_dtype, None if h0 is None else h0.dtype)
        return y, hT, per_doc

    @staticmethod
    def backward(ctx, dy: Tensor | None, dhT: Tensor | None, _: Tensor | None):
        dt, u, A, B, C, reset, ck = ctx.saved_tensors
        b, L, d = u.shape
        n = A.shape[1]
        BD, BN = _blocks("bwd", d, n)
        nD = triton.cdiv(d, BD)
        CH = ctx.CH
        dy = torch.zeros(b, L, d, device=u.device) if dy is None else dy.float().contiguous()
        dhT = None if dhT is None else dhT.float().contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        ddt, du = torch.empty(b, L, d, **f32), torch.empty(b, L, d, **f32)
        dA, dB, dC = torch.zeros(d, n, **f32), torch.zeros(b, L, n, **f32), torch.zeros(b, L, n, **f32)
        dh0 = torch.empty(b, d, n, **f32)
        scratch = torch.empty(b, nD, CH, BD, BN, **f32)
        _bwd_kernel[(b, nD)](
            dt, u, A, B, C, reset, ck, dy, dhT, scratch, ddt, du, dA, dB, dC, dh0, L, d, n, *_strides(u, B, C),
            BD=BD, BN=BN, CH=CH, HAS_DHT=dhT is not None, HAS_RESET=reset is not None,
            num_warps=TUNING["bwd"]["num_warps"])
        dt_dtype, A_dtype, h0_dtype = ctx.dtypes
        return (ddt.to(dt_dtype), du.to(u.dtype), dA.to(A_dtype), dB.to(B.dtype), dC.to(C.dtype), None,
                dh0.to(h0_dtype) if ctx.has_h0 else None, None, None)


def selective_scan_triton(dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, reset: Tensor | None = None,
                          h0: Tensor | None = None, ends: Tensor | None = None,
                          num_docs: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The scan of the module docstring: ``(y (b, L, d) fp32 without the D skip or gate, h_final (b, d, n) fp32,
    per_doc (K, d, n) fp32)``, differentiable in dt, u, A, B, C and h0. ``reset``: (b, L) bool, True where a
    document starts. ``ends``: (1, L) int32, document k < ``num_docs`` at its last token and −1 elsewhere
    (:attr:`mamba2.ssd.varlen.Documents.ends`): ``per_doc[k]`` is the state there (zero for a document without
    tokens; no gradient); without ``ends`` it has no rows."""
    if reset is not None:
        reset = reset.to(torch.int8).contiguous()
    return _Scan.apply(dt, u, A, B, C, reset, h0, None if ends is None else ends.contiguous(), num_docs)
