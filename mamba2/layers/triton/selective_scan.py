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
  scratch: (b, nD, CH/BT, BD, BN) fp32: the state before each block of a chunk, recomputed by the backward

One program owns (batch row, BD channels) × all n and walks the tokens in blocks of BT: a block's (BT, BD, BN)
decays a_t = r_t·exp(dt_t·A) and inputs x_t = dt_t·u_t·B_t are combined by a parallel scan over the block
(``tl.associative_scan`` with (a₁, x₁) ∘ (a₂, x₂) = (a₁a₂, a₂x₁ + x₂)), so h_t = X_t + P_t·h_in with the block's
running products P and sums X, and the state carried to the next block is the last row: one step of latency per
block instead of per token. The backward goes chunk by chunk from the end: the states entering the chunk's blocks
are recomputed into the scratch, then each block, last first, recomputes its h_t and runs the adjoint

    G_t = dy_t·C_t + r_{t+1}·exp(dt_{t+1}A)·G_{t+1}       (G after the block: carried in as r_e·exp(dt_e A)·G_e)

as a reverse scan over the block, and

    d dt_t = Σ_n G_t·(A·(h_t − x_t) + u_t·B_t)      du_t = dt_t·Σ_n G_t·B_t      dA += Σ_t G_t·dt_t·(h_t − x_t)
    dB_t = Σ_d G_t·dt_t·u_t        dC_t = Σ_d dy_t·h_t

using h_t − x_t = r_t·exp(dt_t A)·h_{t-1} (no shifted state needed). dB and dC sum over channels, i.e. over
programs: each program stores its (BT, n) partial sums into a (b, programs, L, n) buffer that torch then sums
(plain stores, and the same bits every run), unless that buffer would pass ``PART_BYTES``; then they are
accumulated with fp32 atomic adds (the order, and so the last bits, can vary from run to run). dA always is.
Offsets that grow with b·L·d are int64 (docs/design.md §5.17).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import Tuning, keeps_context

# BT tokens per block and BD channels per program: the (BT, BD, BN) tiles live in registers, so BD shrinks as
# d_state grows (ELEMS bounds BT·BD·BN); CH tokens per checkpoint (a multiple of BT; memory of the backward:
# b·d·n·4 bytes per chunk). PART_BYTES: the largest dB + dC partial-sum buffer of the backward (b·programs·L·n·8
# bytes) used instead of atomics (plain stores: the same bits every run; 10% faster at the MQAR shape). The "bwd"
# blocks were chosen by a sweep at N = 16 (docs/triton_notes.md, "Timed"): 2.4× faster than BT 16, ELEMS 2048.
TUNING = Tuning("selective_scan", {
    "fwd": dict(BT=16, ELEMS=4096, BD_MAX=32, CH=64, num_warps=8),
    "bwd": dict(BT=8, ELEMS=4096, BD_MAX=32, num_warps=4, PART_BYTES=1 << 30),
})


def _blocks(entry: str, d: int, n: int) -> tuple[int, int, int]:
    p = TUNING[entry]
    BT, BN = p["BT"], triton.next_power_of_2(n)
    BD = max(1, min(p["BD_MAX"], p["ELEMS"] // (BT * BN), triton.next_power_of_2(d)))
    return BT, BD, BN


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _row(t, i, BT: tl.constexpr):
    """Row ``i`` of a (BT, BD, BN) tile as (BD, BN)."""
    return tl.sum(tl.where(tl.arange(0, BT)[:, None, None] == i, t, 0.0), axis=0)


@triton.jit
def _decay(dt_ptr, reset_ptr, A, b64, t64, mt, md, offs_d, L, d, HAS_RESET: tl.constexpr):
    """A block's dt (BT, BD) and decays a = r·exp(dt·A) (BT, BD, BN); masked tokens give dt = 0, a = 1."""
    row = b64 * L + t64
    dt = tl.load(dt_ptr + row[:, None] * d + offs_d[None, :], mask=mt[:, None] & md[None, :], other=0.0)
    a = tl.exp(dt[:, :, None] * A[None, :, :])
    if HAS_RESET:
        keep = 1.0 - tl.load(reset_ptr + row, mask=mt, other=0).to(tl.float32)
        a = a * keep[:, None, None]
    return dt, a


@triton.jit
def _block(dt_ptr, u_ptr, B_ptr, reset_ptr, A, b64, t64, mt, md, mn, offs_d, offs_n, L, d,
           s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, HAS_RESET: tl.constexpr):
    """A block's dt, u (BT, BD) and B (BT, BN), its decays a and inputs x (BT, BD, BN); masked tokens give a = 1,
    x = 0 (they leave the state as it is)."""
    dt, a = _decay(dt_ptr, reset_ptr, A, b64, t64, mt, md, offs_d, L, d, HAS_RESET)
    u = tl.load(u_ptr + b64 * s_ub + t64[:, None] * s_ul + offs_d[None, :] * s_ud, mask=mt[:, None] & md[None, :],
                other=0.0).to(tl.float32)
    Bt = tl.load(B_ptr + b64 * s_bb + t64[:, None] * s_bl + offs_n[None, :] * s_bn, mask=mt[:, None] & mn[None, :],
                 other=0.0).to(tl.float32)
    x = (dt * u)[:, :, None] * Bt[:, None, :]
    return dt, u, Bt, a, x


@triton.jit
def _fwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, h0_ptr, y_ptr, hT_ptr, ck_ptr, ends_ptr, docs_ptr,
                L, d, n, s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, s_cb, s_cl, s_cn,
                BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, HAS_H0: tl.constexpr,
                HAS_RESET: tl.constexpr, HAS_ENDS: tl.constexpr):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    b64 = pid_b.to(tl.int64)
    offs_t = tl.arange(0, BT)
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
    for start in range(0, L, BT):
        if start % CH == 0:
            tl.store(ck_ptr + (b64 * nck + start // CH) * d * n + dn, h, mask=mdn)
        t64 = (start + offs_t).to(tl.int64)          # t · stride passes 2^31 on wide, long rows
        mt = t64 < L
        _, _, _, a, x = _block(dt_ptr, u_ptr, B_ptr, reset_ptr, A, b64, t64, mt, md, mn, offs_d, offs_n, L, d,
                               s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, HAS_RESET)
        P, X = tl.associative_scan((a, x), 0, _combine)
        hs = X + P * h[None, :, :]
        Ct = tl.load(C_ptr + b64 * s_cb + t64[:, None] * s_cl + offs_n[None, :] * s_cn,
                     mask=mt[:, None] & mn[None, :], other=0.0).to(tl.float32)
        row = b64 * L + t64
        tl.store(y_ptr + row[:, None] * d + offs_d[None, :], tl.sum(hs * Ct[:, None, :], axis=2),
                 mask=mt[:, None] & md[None, :])
        if HAS_ENDS:
            k = tl.load(ends_ptr + row, mask=mt, other=-1)
            tl.store(docs_ptr + k.to(tl.int64)[:, None, None] * d * n + dn[None, :, :], hs,
                     mask=(k >= 0)[:, None, None] & mdn[None, :, :])
        h = _row(hs, BT - 1, BT)            # masked tail tokens carry the last real state
    tl.store(hT_ptr + b64 * d * n + dn, h, mask=mdn)


@triton.jit
def _bwd_kernel(dt_ptr, u_ptr, A_ptr, B_ptr, C_ptr, reset_ptr, ck_ptr, dy_ptr, dhT_ptr, scratch_ptr,
                ddt_ptr, du_ptr, dA_ptr, dB_ptr, dC_ptr, dh0_ptr,
                L, d, n, s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, s_cb, s_cl, s_cn,
                BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, HAS_DHT: tl.constexpr,
                HAS_RESET: tl.constexpr, PARTIAL: tl.constexpr):
    pid_b, pid_d = tl.program_id(0), tl.program_id(1)
    b64 = pid_b.to(tl.int64)
    nD = tl.num_programs(1)
    offs_t = tl.arange(0, BT)
    offs_d = pid_d * BD + tl.arange(0, BD)
    offs_n = tl.arange(0, BN)
    md, mn = offs_d < d, offs_n < n
    mdn = md[:, None] & mn[None, :]
    dn = offs_d[:, None].to(tl.int64) * n + offs_n[None, :]
    tile = tl.arange(0, BD)[:, None] * BN + offs_n[None, :]
    scratch = scratch_ptr + ((b64 * nD + pid_d) * (CH // BT)) * BD * BN
    A = tl.load(A_ptr + dn, mask=mdn, other=0.0)
    if HAS_DHT:
        carry = tl.load(dhT_ptr + b64 * d * n + dn, mask=mdn, other=0.0)     # r_e·exp(dt_e A)·G_e after a block
    else:
        carry = tl.zeros((BD, BN), dtype=tl.float32)
    dA = tl.zeros((BD, BN), dtype=tl.float32)
    nck = tl.cdiv(L, CH)
    for cr in range(0, nck):
        c = nck - 1 - cr
        start = c * CH
        end = tl.minimum(start + CH, L)
        h = tl.load(ck_ptr + (b64 * nck + c) * d * n + dn, mask=mdn, other=0.0)
        for bs in range(start, end, BT):       # the states entering the chunk's blocks, into the scratch
            tl.store(scratch + ((bs - start) // BT) * BD * BN + tile, h)
            t64 = (bs + offs_t).to(tl.int64)
            _, _, _, a, x = _block(dt_ptr, u_ptr, B_ptr, reset_ptr, A, b64, t64, t64 < end, md, mn, offs_d, offs_n,
                                   L, d, s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, HAS_RESET)
            P, X = tl.associative_scan((a, x), 0, _combine)
            h = _row(X + P * h[None, :, :], BT - 1, BT)
        # the scratch is written by the threads that own a state element and read by every thread that holds a
        # copy of it: each pass must see the other's writes (and the next chunk must not overwrite them early)
        tl.debug_barrier()
        nb = tl.cdiv(end - start, BT)
        for br in range(0, nb):
            i = nb - 1 - br
            bs = start + i * BT
            h_in = tl.load(scratch + i * BD * BN + tile)
            t64 = (bs + offs_t).to(tl.int64)
            mt = t64 < end
            dt, u, Bt, a, x = _block(dt_ptr, u_ptr, B_ptr, reset_ptr, A, b64, t64, mt, md, mn, offs_d, offs_n, L, d,
                                     s_ub, s_ul, s_ud, s_bb, s_bl, s_bn, HAS_RESET)
            P, X = tl.associative_scan((a, x), 0, _combine)
            hs = X + P * h_in[None, :, :]
            row = b64 * L + t64
            mtd = mt[:, None] & md[None, :]
            mtn = mt[:, None] & mn[None, :]
            Ct = tl.load(C_ptr + b64 * s_cb + t64[:, None] * s_cl + offs_n[None, :] * s_cn, mask=mtn,
                         other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row[:, None] * d + offs_d[None, :], mask=mtd, other=0.0)
            # the next token's decay inside the block (1 at the block's last row and past the chunk: the carry
            # brings what lies after)
            nxt = offs_t < BT - 1
            _, a_next = _decay(dt_ptr, reset_ptr, A, b64, t64 + 1, nxt & (t64 + 1 < end), md, offs_d, L, d, HAS_RESET)
            Q, S = tl.associative_scan((a_next, dy[:, :, None] * Ct[:, None, :]), 0, _combine, reverse=True)
            G = S + Q * carry[None, :, :]
            hb = hs - x                         # r_t·exp(dt_t A)·h_{t-1}
            tl.store(ddt_ptr + row[:, None] * d + offs_d[None, :],
                     tl.sum(G * (A[None, :, :] * hb + u[:, :, None] * Bt[:, None, :]), axis=2), mask=mtd)
            tl.store(du_ptr + row[:, None] * d + offs_d[None, :], dt * tl.sum(G * Bt[:, None, :], axis=2), mask=mtd)
            dB_t, dC_t = tl.sum(G * (dt * u)[:, :, None], axis=1), tl.sum(dy[:, :, None] * hs, axis=1)
            if PARTIAL:                 # this program's own (L, n) slice of the (b, programs, L, n) buffers
                mine = ((b64 * nD + pid_d) * L + t64)[:, None] * n + offs_n[None, :]
                tl.store(dB_ptr + mine, dB_t, mask=mtn)
                tl.store(dC_ptr + mine, dC_t, mask=mtn)
            else:
                tl.atomic_add(dB_ptr + row[:, None] * n + offs_n[None, :], dB_t, mask=mtn)
                tl.atomic_add(dC_ptr + row[:, None] * n + offs_n[None, :], dC_t, mask=mtn)
            dA += tl.sum(G * dt[:, :, None] * hb, axis=0)
            carry = _row(a * G, 0, BT)
        tl.debug_barrier()
    tl.store(dh0_ptr + b64 * d * n + dn, carry, mask=mdn)
    tl.atomic_add(dA_ptr + dn, dA, mask=mdn)


def _check_chunk(CH: int, bt_fwd: int, bt_bwd: int) -> None:
    if CH % bt_fwd or CH % bt_bwd:
        raise ValueError(f"selective_scan tuning: the checkpoint interval CH must be a multiple of the forward and "
                         f"backward token blocks BT, got CH={CH}, BT={bt_fwd} (fwd) and {bt_bwd} (bwd)")


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
        BT, BD, BN = _blocks("fwd", d, n)
        p = TUNING["fwd"]
        CH = p["CH"]
        _check_chunk(CH, BT, _blocks("bwd", d, n)[0])
        y = torch.empty(b, L, d, device=u.device, dtype=torch.float32)
        hT = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
        ck = torch.empty(b, math.ceil(L / CH), d, n, device=u.device, dtype=torch.float32)
        per_doc = torch.zeros(num_docs, d, n, device=u.device, dtype=torch.float32)
        _fwd_kernel[(b, triton.cdiv(d, BD))](
            dt, u, A, B, C, reset, h0c, y, hT, ck, ends, per_doc, L, d, n, *_strides(u, B, C),
            BT=BT, BD=BD, BN=BN, CH=CH, HAS_H0=h0 is not None, HAS_RESET=reset is not None, HAS_ENDS=ends is not None,
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
        BT, BD, BN = _blocks("bwd", d, n)
        nD = triton.cdiv(d, BD)
        CH = ctx.CH
        _check_chunk(CH, BT, BT)
        dy = torch.zeros(b, L, d, device=u.device) if dy is None else dy.float().contiguous()
        dhT = None if dhT is None else dhT.float().contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        ddt, du = torch.empty(b, L, d, **f32), torch.empty(b, L, d, **f32)
        dA, dh0 = torch.zeros(d, n, **f32), torch.empty(b, d, n, **f32)
        partial = 2 * b * nD * L * n * 4 <= TUNING["bwd"]["PART_BYTES"]
        if partial:             # every element is stored: each program covers every token of its row
            dB, dC = torch.empty(b, nD, L, n, **f32), torch.empty(b, nD, L, n, **f32)
        else:
            dB, dC = torch.zeros(b, L, n, **f32), torch.zeros(b, L, n, **f32)
        scratch = torch.empty(b, nD, CH // BT, BD, BN, **f32)
        _bwd_kernel[(b, nD)](
            dt, u, A, B, C, reset, ck, dy, dhT, scratch, ddt, du, dA, dB, dC, dh0, L, d, n, *_strides(u, B, C),
            BT=BT, BD=BD, BN=BN, CH=CH, HAS_DHT=dhT is not None, HAS_RESET=reset is not None, PARTIAL=partial,
            num_warps=TUNING["bwd"]["num_warps"])
        if partial:
            dB, dC = dB.sum(1), dC.sum(1)
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
