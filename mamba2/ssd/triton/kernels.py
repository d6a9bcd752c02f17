"""Triton kernels of the chunked SSD (Dao & Gu 2024, §6): forward, backward and the decode step.

Layouts (``b`` batch, ``L`` tokens, ``h`` heads, ``p`` headdim, ``g`` groups, ``n`` d_state, ``Q`` chunk, ``nc`` chunks):
  x, z, y, dy, dx: (b, L, h, p) any strides     B, C, dB, dC: (b, L, g, n) any strides
  dtp, acs, ddt, off, stf: (b, h, nc, Q) fp32 contiguous (processed dt, within-chunk cumsum of dt·A, ...)
  runs: (b, L) int32 contiguous, monotone document ids (a new id wherever seq_idx changes)
  states, gstates: (b, nc + 1, h, p, n) contiguous: states[:, c] enters chunk c, states[:, nc] is the final one;
      gstates[:, c] is the gradient w.r.t. the state that leaves chunk c
  cb: (b, nc, g, Q, Q) contiguous, cb[t, s] = C_t · B_s
Every offset that can grow with b·L·h·p is computed in int64 (docs/design.md §5.17). Cumsums, exponentials and
the running state are fp32; matrix products take operands in the input dtype (bf16/fp16) and accumulate in fp32; fp32
operands multiply to fp32 accuracy (tf32x3) or in one tf32 product, as the launcher says (it follows torch's
float32 matmul precision; docs/design.md §4). Segment-sum exponents are clamped to <= 0 (docs/design.md §1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mamba2.kernels import INTERPRET

# Triton's interpreter (3.9) multiplies bf16 operands of tl.dot wrongly: upcast them there (exact fp32 math).
_UPCAST = tl.constexpr(INTERPRET)


@triton.jit
def _mm(a, b, FP32_DOTS: tl.constexpr):
    if _UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif FP32_DOTS:   # fp32 operands to fp32 accuracy on the tensor cores (three tf32 products), not one tf32 product
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _softplus(v):
    """torch's softplus (threshold 20) as log1p(e^v), accurate to fp32 rounding for every v: log(1 + e) alone
    loses the digits of small e (6% at v = -15, where 1 + e rounds to 1 + 2^-22 steps), so it is corrected by
    e / ((1 + e) - 1), the factor by which 1 + e rounded (Kahan); where 1 + e rounds to 1, log1p(e) = e."""
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(v > 20.0, v, lp)


# ----------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def cumsum_fwd_kernel(dt_ptr, A_ptr, bias_ptr, dtp_ptr, acs_ptr, L, H, NC, s_db, s_dl, s_dh, lo, hi,
                      HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                      Q: tl.constexpr, BH: tl.constexpr):
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.program_id(2) * BH + tl.arange(0, BH)
    offs_q = tl.arange(0, Q)
    t = c * Q + offs_q
    mask_h = offs_h < H
    mask = (t < L)[:, None] & mask_h[None, :]
    v = tl.load(dt_ptr + b * s_db + t[:, None].to(tl.int64) * s_dl + offs_h[None, :] * s_dh, mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = _softplus(v)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    v = tl.where(mask, v, 0.0)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    acs = tl.cumsum(v * A[None, :], axis=0)
    off = ((b * H + offs_h[None, :]) * NC + c) * Q + offs_q[:, None]
    tl.store(dtp_ptr + off, v, mask=mask_h[None, :])
    tl.store(acs_ptr + off, acs, mask=mask_h[None, :])


@triton.jit
def cb_kernel(C_ptr, B_ptr, cb_ptr, L, NC, G, N, s_cb, s_cl, s_cg, s_cn, s_bb, s_bl, s_bg, s_bn,
              Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """cb[b, c, g, t, s] = C_t · B_s for the blocks on or below the diagonal."""
    pid = tl.program_id(0)
    nk: tl.constexpr = Q // BK
    pm = pid // nk
    pk = pid % nk
    if pk * BK < (pm + 1) * BM:
        pid_bc = tl.program_id(1)
        b = (pid_bc // NC).to(tl.int64)
        c = pid_bc % NC
        g = tl.program_id(2)
        offs_m = pm * BM + tl.arange(0, BM)
        offs_k = pk * BK + tl.arange(0, BK)
        tm = c * Q + offs_m
        tk = c * Q + offs_k
        offs_n = tl.arange(0, BN)
        mn = offs_n < N
        Cm = tl.load(C_ptr + b * s_cb + tm[:, None].to(tl.int64) * s_cl + g * s_cg + offs_n[None, :] * s_cn,
                     mask=(tm < L)[:, None] & mn[None, :], other=0.0)
        Bk = tl.load(B_ptr + b * s_bb + tk[:, None].to(tl.int64) * s_bl + g * s_bg + offs_n[None, :] * s_bn,
                     mask=(tk < L)[:, None] & mn[None, :], other=0.0)
        cb = _mm(Cm, tl.trans(Bk), FP32_DOTS)
        base = ((b * NC + c) * G + g) * Q * Q
        tl.store(cb_ptr + base + offs_m[:, None] * Q + offs_k[None, :], cb.to(cb_ptr.dtype.element_ty))


@triton.jit
def state_fwd_kernel(x_ptr, dtp_ptr, acs_ptr, B_ptr, init_ptr, st_ptr, fin_ptr, run_ptr,
                     L, H, NC, P, N, R,
                     s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn,
                     Q: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """Chunk states and their passing in one sequential sweep over chunks per (b, h, p-block, n-block)."""
    h = tl.program_id(0)
    nnb = tl.cdiv(N, BN)
    pp = tl.program_id(1) // nnb
    pn = tl.program_id(1) % nnb
    b = tl.program_id(2).to(tl.int64)
    g = h // R
    offs_p = pp * BP + tl.arange(0, BP)
    offs_n = pn * BN + tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    pn_off = offs_p[:, None] * N + offs_n[None, :]
    if HAS_INIT:
        S = tl.load(init_ptr + (b * H + h) * P * N + pn_off, mask=mpn, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BP, BN), dtype=tl.float32)
    prev_last = 0
    if HAS_SEQ:
        prev_last = tl.load(run_ptr + b * L)
    x_base = x_ptr + b * s_xb + h * s_xh
    B_base = B_ptr + b * s_bb + g * s_bg
    for c in range(NC):
        tl.store(st_ptr + ((b * (NC + 1) + c) * H + h) * P * N + pn_off, S.to(st_ptr.dtype.element_ty), mask=mpn)
        dbase = ((b * H + h) * NC + c) * Q
        acs_last = tl.load(acs_ptr + dbase + Q - 1)
        last = 0
        if HAS_SEQ:
            last = tl.load(run_ptr + b * L + tl.minimum(L, (c + 1) * Q) - 1)
        s_acc = tl.zeros((BP, BN), dtype=tl.float32)
        for k0 in range(0, Q, BK):
            offs_k = k0 + tl.arange(0, BK)
            ts = c * Q + offs_k
            ms = ts < L
            acs_k = tl.load(acs_ptr + dbase + offs_k)
            dt_k = tl.load(dtp_ptr + dbase + offs_k)
            w = tl.exp(tl.minimum(acs_last - acs_k, 0.0)) * dt_k
            if HAS_SEQ:
                run_k = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
                w = tl.where(run_k == last, w, 0.0)
            ts64 = ts.to(tl.int64)
            xT = tl.load(x_base + ts64[None, :] * s_xl + offs_p[:, None] * s_xp, mask=mp[:, None] & ms[None, :],
                         other=0.0)
            Bk = tl.load(B_base + ts64[:, None] * s_bl + offs_n[None, :] * s_bn, mask=ms[:, None] & mn[None, :],
                         other=0.0)
            s_acc += _mm((xT * w[None, :]).to(Bk.dtype), Bk, FP32_DOTS)
        dec = tl.exp(acs_last)
        if HAS_SEQ:
            dec = tl.where(last == prev_last, dec, 0.0)
            prev_last = last
        S = S * dec + s_acc
    tl.store(st_ptr + ((b * (NC + 1) + NC) * H + h) * P * N + pn_off, S.to(st_ptr.dtype.element_ty), mask=mpn)
    tl.store(fin_ptr + (b * H + h) * P * N + pn_off, S, mask=mpn)


@triton.jit
def varlen_states_kernel(x_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, init_ptr, cu_ptr, out_ptr,
                         H, P, N, R, lo, hi, s_xl, s_xh, s_xp, s_dl, s_dh, s_bl, s_bg, s_bn,
                         BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr,
                         SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, HAS_INIT: tl.constexpr,
                         FP32_DOTS: tl.constexpr = False):
    """The state after each document of one packed row (docs/design.md §7): per (head, p/n block, document), one
    sweep over the document's tokens in blocks of BK from its own first token (a grid per document),
    S ← exp(Σ dA) · S + (x · exp(cs_last − cs) · dt)ᵀ B per block. dt is processed here (bias, softplus, clamp)."""
    h = tl.program_id(0)
    nnb = tl.cdiv(N, BN)
    pp = tl.program_id(1) // nnb
    pn = tl.program_id(1) % nnb
    k = tl.program_id(2)
    g = h // R
    offs_p = pp * BP + tl.arange(0, BP)
    offs_n = pn * BN + tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    pn_off = offs_p[:, None] * N + offs_n[None, :]
    start = tl.load(cu_ptr + k)
    end = tl.load(cu_ptr + k + 1)
    S = tl.zeros((BP, BN), dtype=tl.float32)
    if HAS_INIT:
        if k == 0:
            S = tl.load(init_ptr + h * P * N + pn_off, mask=mpn, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + h).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + h).to(tl.float32)
    for t0 in range(start, end, BK):
        ts = t0 + tl.arange(0, BK)
        ms = ts < end
        ts64 = ts.to(tl.int64)
        v = tl.load(dt_ptr + ts64 * s_dl + h * s_dh, mask=ms, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            v = _softplus(v)
        if CLAMP:
            v = tl.minimum(tl.maximum(v, lo), hi)
        v = tl.where(ms, v, 0.0)
        cs = tl.cumsum(v * A, axis=0)
        last = tl.sum(v * A, axis=0)
        w = tl.exp(tl.minimum(last - cs, 0.0)) * v
        xT = tl.load(x_ptr + ts64[None, :] * s_xl + h * s_xh + offs_p[:, None] * s_xp, mask=mp[:, None] & ms[None, :],
                     other=0.0)
        Bk = tl.load(B_ptr + ts64[:, None] * s_bl + g * s_bg + offs_n[None, :] * s_bn,
                     mask=ms[:, None] & mn[None, :], other=0.0)
        S = S * tl.exp(last) + _mm((xT * w[None, :]).to(Bk.dtype), Bk, FP32_DOTS)
    tl.store(out_ptr + (k * H + h).to(tl.int64) * P * N + pn_off, S, mask=mpn)


@triton.jit
def scan_fwd_kernel(x_ptr, dtp_ptr, acs_ptr, B_ptr, C_ptr, cb_ptr, st_ptr, D_ptr, z_ptr, y_ptr, yp_ptr, run_ptr,
                    L, H, NC, P, N, R, G,
                    s_xb, s_xl, s_xh, s_xp, s_bb, s_bl, s_bg, s_bn, s_cb, s_cl, s_cg, s_cn,
                    s_zb, s_zl, s_zh, s_zp, s_yb, s_yl, s_yh, s_yp,
                    Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                    HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_Z: tl.constexpr, STORE_YP: tl.constexpr,
                    HAS_SEQ: tl.constexpr, CB_MEM: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """y = exp(Acs)·C·S_enter + (CBᵀ∘decay∘dt) x  (+ D x) (· silu z) for one (token block, p-block, chunk, head)."""
    h = tl.program_id(0)
    npb = tl.cdiv(P, BP)
    pm = tl.program_id(1) // npb
    pp = tl.program_id(1) % npb
    pid_bc = tl.program_id(2)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    g = h // R
    offs_q = pm * BM + tl.arange(0, BM)
    tm = c * Q + offs_q
    mm = tm < L
    tm64 = tm.to(tl.int64)
    offs_p = pp * BP + tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    dbase = ((b * H + h) * NC + c) * Q
    acs_m = tl.load(acs_ptr + dbase + offs_q)
    Cm = tl.load(C_ptr + b * s_cb + tm64[:, None] * s_cl + g * s_cg + offs_n[None, :] * s_cn,
                 mask=mm[:, None] & mn[None, :], other=0.0)
    S = tl.load(st_ptr + ((b * (NC + 1) + c) * H + h) * P * N + offs_p[None, :] * N + offs_n[:, None],
                mask=mn[:, None] & mp[None, :], other=0.0)
    scale = tl.exp(acs_m)
    run_m = tl.zeros((BM,), dtype=tl.int32)
    if HAS_SEQ:
        run_m = tl.load(run_ptr + b * L + tm, mask=mm, other=-1)
        prev_last = tl.load(run_ptr + b * L + tl.maximum(c * Q - 1, 0))
        scale = tl.where(run_m == prev_last, scale, 0.0)
    acc = _mm(Cm.to(S.dtype), S, FP32_DOTS) * scale[:, None]
    x_base = x_ptr + b * s_xb + h * s_xh
    cb_base = ((b * NC + c) * G + g) * Q * Q
    for k0 in range(0, (pm + 1) * BM, BK):
        offs_k = k0 + tl.arange(0, BK)
        ts = c * Q + offs_k
        ms = ts < L
        ts64 = ts.to(tl.int64)
        acs_k = tl.load(acs_ptr + dbase + offs_k)
        dt_k = tl.load(dtp_ptr + dbase + offs_k)
        if CB_MEM:
            cb = tl.load(cb_ptr + cb_base + offs_q[:, None] * Q + offs_k[None, :]).to(tl.float32)
        else:
            Bk = tl.load(B_ptr + b * s_bb + ts64[:, None] * s_bl + g * s_bg + offs_n[None, :] * s_bn,
                         mask=ms[:, None] & mn[None, :], other=0.0)
            cb = _mm(Cm, tl.trans(Bk), FP32_DOTS)
        keep = offs_q[:, None] >= offs_k[None, :]
        if HAS_SEQ:
            run_k = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
            keep = keep & (run_m[:, None] == run_k[None, :])
        w = tl.where(keep, cb * tl.exp(tl.minimum(acs_m[:, None] - acs_k[None, :], 0.0)) * dt_k[None, :], 0.0)
        xk = tl.load(x_base + ts64[:, None] * s_xl + offs_p[None, :] * s_xp, mask=ms[:, None] & mp[None, :],
                     other=0.0)
        acc += _mm(w.to(xk.dtype), xk, FP32_DOTS)
    mmp = mm[:, None] & mp[None, :]
    if HAS_D:
        xm = tl.load(x_base + tm64[:, None] * s_xl + offs_p[None, :] * s_xp, mask=mmp, other=0.0).to(tl.float32)
        if D_PER_CH:
            acc += xm * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)[None, :]
        else:
            acc += xm * tl.load(D_ptr + h).to(tl.float32)
    if STORE_YP:
        tl.store(yp_ptr + b * s_yb + tm64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                 acc.to(yp_ptr.dtype.element_ty), mask=mmp)
    if HAS_Z:
        zm = tl.load(z_ptr + b * s_zb + tm64[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp, mask=mmp,
                     other=0.0).to(tl.float32)
        acc = acc * zm * tl.sigmoid(zm)
    tl.store(y_ptr + b * s_yb + tm64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
             acc.to(y_ptr.dtype.element_ty), mask=mmp)


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def gate_bwd_kernel(dout_ptr, z_ptr, yp_ptr, dy_ptr, dz_ptr, L, H, P,
                    s_ob, s_ol, s_oh, s_op, s_zb, s_zl, s_zh, s_zp, s_yb, s_yl, s_yh, s_yp,
                    BT: tl.constexpr, BP: tl.constexpr):
    """dy = dout·silu(z), dz = dout·y_pre·silu'(z); dy and dz are written with y's strides."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_p = tl.arange(0, BP)
    m = (t < L)[:, None] & (offs_p < P)[None, :]
    t64 = t.to(tl.int64)
    do = tl.load(dout_ptr + b * s_ob + t64[:, None] * s_ol + h * s_oh + offs_p[None, :] * s_op, mask=m,
                 other=0.0).to(tl.float32)
    zz = tl.load(z_ptr + b * s_zb + t64[:, None] * s_zl + h * s_zh + offs_p[None, :] * s_zp, mask=m,
                 other=0.0).to(tl.float32)
    yp = tl.load(yp_ptr + b * s_yb + t64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp, mask=m,
                 other=0.0).to(tl.float32)
    sg = tl.sigmoid(zz)
    off = b * s_yb + t64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp
    tl.store(dy_ptr + off, (do * zz * sg).to(dy_ptr.dtype.element_ty), mask=m)
    tl.store(dz_ptr + off, (do * yp * sg * (1.0 + zz * (1.0 - sg))).to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def state_bwd_kernel(dy_ptr, acs_ptr, C_ptr, st_ptr, dfin_ptr, gst_ptr, dinit_ptr, part_ptr, run_ptr,
                     L, H, NC, P, N, R,
                     s_yb, s_yl, s_yh, s_yp, s_cb, s_cl, s_cg, s_cn,
                     Q: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     HAS_DFIN: tl.constexpr, HAS_SEQ: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """Reverse sweep: G_c (grad of the state leaving chunk c), d initial state, and <G_c, decay_c·S_c> partials
    (the gradient of every dA of chunk c through the decay of the entering state)."""
    h = tl.program_id(0)
    nnb = tl.cdiv(N, BN)
    nblk = tl.num_programs(1)
    blk = tl.program_id(1)
    pp = blk // nnb
    pn = blk % nnb
    b = tl.program_id(2).to(tl.int64)
    g = h // R
    offs_p = pp * BP + tl.arange(0, BP)
    offs_n = pn * BN + tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    mpn = mp[:, None] & mn[None, :]
    pn_off = offs_p[:, None] * N + offs_n[None, :]
    if HAS_DFIN:
        Gs = tl.load(dfin_ptr + (b * H + h) * P * N + pn_off, mask=mpn, other=0.0).to(tl.float32)
    else:
        Gs = tl.zeros((BP, BN), dtype=tl.float32)
    dy_base = dy_ptr + b * s_yb + h * s_yh
    C_base = C_ptr + b * s_cb + g * s_cg
    for ci in range(NC):
        c = NC - 1 - ci
        soff = ((b * (NC + 1) + c) * H + h) * P * N + pn_off
        tl.store(gst_ptr + soff, Gs.to(gst_ptr.dtype.element_ty), mask=mpn)
        dbase = ((b * H + h) * NC + c) * Q
        acs_last = tl.load(acs_ptr + dbase + Q - 1)
        last = 0
        prev_last = 0
        if HAS_SEQ:
            last = tl.load(run_ptr + b * L + tl.minimum(L, (c + 1) * Q) - 1)
            prev_last = tl.load(run_ptr + b * L + tl.maximum(c * Q - 1, 0))
        dec = tl.exp(acs_last)
        if HAS_SEQ:
            dec = tl.where(last == prev_last, dec, 0.0)
        S_c = tl.load(st_ptr + soff, mask=mpn, other=0.0).to(tl.float32)
        tl.store(part_ptr + ((b * H + h) * NC + c) * nblk + blk, tl.sum(tl.sum(Gs * S_c, axis=1), axis=0) * dec)
        d_acc = tl.zeros((BP, BN), dtype=tl.float32)
        for k0 in range(0, Q, BK):
            offs_k = k0 + tl.arange(0, BK)
            ts = c * Q + offs_k
            ms = ts < L
            ts64 = ts.to(tl.int64)
            w = tl.exp(tl.load(acs_ptr + dbase + offs_k))
            if HAS_SEQ:
                run_k = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
                w = tl.where(run_k == prev_last, w, 0.0)
            dyT = tl.load(dy_base + ts64[None, :] * s_yl + offs_p[:, None] * s_yp, mask=mp[:, None] & ms[None, :],
                          other=0.0)
            Ck = tl.load(C_base + ts64[:, None] * s_cl + offs_n[None, :] * s_cn, mask=ms[:, None] & mn[None, :],
                         other=0.0)
            d_acc += _mm((dyT * w[None, :]).to(Ck.dtype), Ck, FP32_DOTS)
        Gs = d_acc + dec * Gs
    tl.store(dinit_ptr + (b * H + h) * P * N + pn_off, Gs, mask=mpn)


@triton.jit
def bwd_dx_kernel(x_ptr, dy_ptr, dtp_ptr, acs_ptr, B_ptr, C_ptr, cb_ptr, st_ptr, gst_ptr, D_ptr, run_ptr,
                  dx_ptr, ddt_ptr, stf_ptr, off_ptr, strad_ptr, dD_ptr,
                  L, H, NC, P, N, R, G,
                  s_xb, s_xl, s_xh, s_xp, s_yb, s_yl, s_yh, s_yp, s_bb, s_bl, s_bg, s_bn,
                  s_cb, s_cl, s_cg, s_cn, s_dxb, s_dxl, s_dxh, s_dxp,
                  Q: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  HAS_D: tl.constexpr, D_PER_CH: tl.constexpr, HAS_SEQ: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """Per head, one block S of source tokens s of one chunk: dx, the direct part of ddt, and three pieces of
    d(dA): stf_s = dt_s·x_s·(G B_s)·exp(Acs_last - Acs_s) (state term), off_s = dy_s·y_off_s (entering-state
    term) and the straddle sums sum_{s<u<=t} W_st of W_st = dy_t·x_s (C_t·B_s) exp(Acs_t - Acs_s) dt_s, whose
    decay already contains dA_u (stable for large |A|·dt). They are formed as sum_{t>=u} r'_t - sum_{s>=u} c'_s
    with r'_t = sum_{s<t} W_st and c'_s = sum_{t>s} W_st, both from the same fp32 tile and with the diagonal
    s = t left out of both (it is what made a row-minus-column form cancel): strad holds the r' partials per S
    block, off_s - c'_s goes to off, and dt_bwd reverse-cumsums both. The only error left is fp32 summation of
    off-diagonal (decayed) terms (they cost about 1.4 of bwd_dx's 4.1 ms on an H200: docs/triton_notes.md)."""
    pk = tl.program_id(0)
    pid_bc = tl.program_id(1)
    h = tl.program_id(2)
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    g = h // R
    NPK = tl.num_programs(0)
    offs_k = pk * BK + tl.arange(0, BK)
    ts = c * Q + offs_k
    ms = ts < L
    ts64 = ts.to(tl.int64)
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    msp = ms[:, None] & mp[None, :]
    msn = ms[:, None] & mn[None, :]
    dbase = ((b * H + h) * NC + c) * Q
    acs_s = tl.load(acs_ptr + dbase + offs_k)
    dt_s = tl.load(dtp_ptr + dbase + offs_k)
    acs_last = tl.load(acs_ptr + dbase + Q - 1)
    Bs = tl.load(B_ptr + b * s_bb + ts64[:, None] * s_bl + g * s_bg + offs_n[None, :] * s_bn, mask=msn, other=0.0)
    Cs = tl.load(C_ptr + b * s_cb + ts64[:, None] * s_cl + g * s_cg + offs_n[None, :] * s_cn, mask=msn, other=0.0)
    Xs = tl.load(x_ptr + b * s_xb + ts64[:, None] * s_xl + h * s_xh + offs_p[None, :] * s_xp, mask=msp, other=0.0)
    dy_base = dy_ptr + b * s_yb + h * s_yh
    dYs = tl.load(dy_base + ts64[:, None] * s_yl + offs_p[None, :] * s_yp, mask=msp, other=0.0)
    run_s = tl.zeros((BK,), dtype=tl.int32)
    ws = tl.exp(tl.minimum(acs_last - acs_s, 0.0))
    wm = tl.exp(acs_s)
    if HAS_SEQ:
        run_s = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
        last = tl.load(run_ptr + b * L + tl.minimum(L, (c + 1) * Q) - 1)
        prev_last = tl.load(run_ptr + b * L + tl.maximum(c * Q - 1, 0))
        ws = tl.where(run_s == last, ws, 0.0)
        wm = tl.where(run_s == prev_last, wm, 0.0)
    soff = ((b * (NC + 1) + c) * H + h) * P * N
    Gm = tl.load(gst_ptr + soff + offs_p[:, None] * N + offs_n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
    acc_dx = _mm(Bs.to(Gm.dtype), tl.trans(Gm), FP32_DOTS) * ws[:, None]                      # (BK, BP)
    xf = Xs.to(tl.float32)
    tl.store(stf_ptr + dbase + offs_k, tl.sum(xf * acc_dx, axis=1) * dt_s)
    S = tl.load(st_ptr + soff + offs_p[None, :] * N + offs_n[:, None], mask=mn[:, None] & mp[None, :], other=0.0)
    yoff = _mm(Cs.to(S.dtype), S, FP32_DOTS)                                                   # (BK, BP)
    offv = tl.sum(dYs.to(tl.float32) * yoff, axis=1) * wm
    cb_base = ((b * NC + c) * G + g) * Q * Q
    sbase = (((b * H + h) * NC + c) * NPK + pk) * Q
    start = (pk * BK // BM) * BM
    carry = tl.zeros((BK,), dtype=tl.float32)
    for i in range((Q - start) // BM):
        m0 = Q - BM - i * BM
        offs_m = m0 + tl.arange(0, BM)
        tm = c * Q + offs_m
        mm = tm < L
        tm64 = tm.to(tl.int64)
        acs_m = tl.load(acs_ptr + dbase + offs_m)
        dYm = tl.load(dy_base + tm64[:, None] * s_yl + offs_p[None, :] * s_yp, mask=mm[:, None] & mp[None, :],
                      other=0.0)
        cbT = tl.load(cb_ptr + cb_base + offs_m[None, :] * Q + offs_k[:, None]).to(tl.float32)
        keep = offs_m[None, :] >= offs_k[:, None]
        if HAS_SEQ:
            run_m = tl.load(run_ptr + b * L + tm, mask=mm, other=-1)
            keep = keep & (run_m[None, :] == run_s[:, None])
        p1 = tl.where(keep, cbT * tl.exp(tl.minimum(acs_m[None, :] - acs_s[:, None], 0.0)), 0.0)
        acc_dx += _mm(p1.to(dYm.dtype), dYm, FP32_DOTS)
        # strictly-lower row and column sums of the fp32 tile W[s, t] (no diagonal)
        W = p1 * _mm(Xs, tl.trans(dYm), FP32_DOTS) * dt_s[:, None]
        Wo = tl.where(offs_k[:, None] < offs_m[None, :], W, 0.0)
        tl.store(strad_ptr + sbase + offs_m, tl.sum(Wo, axis=0))                    # r'_t partial (this S)
        carry += tl.sum(Wo, axis=1)                                                 # c'_s
    for u0 in range(0, start, BM):
        tl.store(strad_ptr + sbase + u0 + tl.arange(0, BM), tl.zeros((BM,), dtype=tl.float32))
    offv -= carry   # dt_bwd takes the reverse cumsum of off_t + r'_t - c'_t
    tl.store(off_ptr + dbase + offs_k, offv)
    tl.store(ddt_ptr + dbase + offs_k, tl.sum(xf * acc_dx, axis=1))
    dx = acc_dx * dt_s[:, None]
    if HAS_D:
        dYf = dYs.to(tl.float32)
        if D_PER_CH:
            dx += dYf * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)[None, :]
        else:
            dx += dYf * tl.load(D_ptr + h).to(tl.float32)
        tl.store(dD_ptr + ((pid_bc.to(tl.int64) * H + h) * NPK + pk) * BP + offs_p, tl.sum(dYf * xf, axis=0))
    tl.store(dx_ptr + b * s_dxb + ts64[:, None] * s_dxl + h * s_dxh + offs_p[None, :] * s_dxp,
             dx.to(dx_ptr.dtype.element_ty), mask=msp)


@triton.jit
def bwd_dcb_kernel(x_ptr, dy_ptr, dtp_ptr, acs_ptr, run_ptr, dcb_ptr, L, H, NC, P, R,
                   s_xb, s_xl, s_xh, s_xp, s_yb, s_yl, s_yh, s_yp,
                   Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, HAS_SEQ: tl.constexpr,
                   FP32_DOTS: tl.constexpr = False):
    """dcb[b, c, g, t, s] = sum_h dy_t(h)·x_s(h) exp(Acs_t - Acs_s) dt_s over the group's heads (s <= t, same
    document; 0 elsewhere in the stored blocks): the gradient of the output w.r.t. C_t·B_s, formed once for both
    the dB and the dC kernels. One (target block, source block) pair on or below the diagonal per program."""
    pid = tl.program_id(0)
    nk: tl.constexpr = Q // BK
    pm = pid // nk
    pk = pid % nk
    if pk * BK < (pm + 1) * BM:
        pid_bc = tl.program_id(1)
        b = (pid_bc // NC).to(tl.int64)
        c = pid_bc % NC
        g = tl.program_id(2)
        offs_m = pm * BM + tl.arange(0, BM)
        offs_k = pk * BK + tl.arange(0, BK)
        tm = c * Q + offs_m
        ts = c * Q + offs_k
        mm = tm < L
        ms = ts < L
        tm64 = tm.to(tl.int64)
        ts64 = ts.to(tl.int64)
        offs_p = tl.arange(0, BP)
        mp = offs_p < P
        keep = offs_m[:, None] >= offs_k[None, :]
        if HAS_SEQ:
            run_m = tl.load(run_ptr + b * L + tm, mask=mm, other=-1)
            run_k = tl.load(run_ptr + b * L + ts, mask=ms, other=-2)
            keep = keep & (run_m[:, None] == run_k[None, :])
        wsum = tl.zeros((BM, BK), dtype=tl.float32)
        for h in range(g * R, g * R + R):
            dbase = ((b * H + h) * NC + c) * Q
            acs_m = tl.load(acs_ptr + dbase + offs_m)
            acs_k = tl.load(acs_ptr + dbase + offs_k)
            dt_k = tl.load(dtp_ptr + dbase + offs_k)
            dYm = tl.load(dy_ptr + b * s_yb + tm64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp,
                          mask=mm[:, None] & mp[None, :], other=0.0)
            Xk = tl.load(x_ptr + b * s_xb + ts64[:, None] * s_xl + h * s_xh + offs_p[None, :] * s_xp,
                         mask=ms[:, None] & mp[None, :], other=0.0)
            decay = tl.exp(tl.minimum(acs_m[:, None] - acs_k[None, :], 0.0))
            wsum += _mm(dYm, tl.trans(Xk), FP32_DOTS) * decay * dt_k[None, :]
        base = ((b * NC + c) * tl.num_programs(2) + g) * Q * Q
        tl.store(dcb_ptr + base + offs_m[:, None] * Q + offs_k[None, :], tl.where(keep, wsum, 0.0))


@triton.jit
def bwd_db_kernel(x_ptr, dtp_ptr, acs_ptr, C_ptr, gst_ptr, run_ptr, dB_ptr, dcb_ptr,
                  L, H, NC, P, N, R, HPP, G,
                  s_xb, s_xl, s_xh, s_xp, s_cb, s_cl, s_cg, s_cn,
                  s_dbs, s_dbb, s_dbl, s_dbg, s_dbn,
                  Q: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  HAS_SEQ: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """dB for one block S of source tokens, one group, heads [split·HPP, (split+1)·HPP) of it:
    sum_h ws·dt·(x_s(h) G(h)) + sum_T dcb[T, s]ᵀ C_T, heads innermost; dcb (the head sums of
    dt_s exp(Acs_t - Acs_s) x_s(h)·dy_t(h)) comes from bwd_dcb_kernel, its term is added by head split 0 only."""
    pk = tl.program_id(0)
    pid_bc = tl.program_id(1)
    nsplit = tl.cdiv(R, HPP)
    g = tl.program_id(2) // nsplit
    split = tl.program_id(2) % nsplit
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    offs_k = pk * BK + tl.arange(0, BK)
    ts = c * Q + offs_k
    ms = ts < L
    ts64 = ts.to(tl.int64)
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    msp = ms[:, None] & mp[None, :]
    h0 = g * R + split * HPP
    h1 = tl.minimum(h0 + HPP, g * R + R)
    run_s = tl.zeros((BK,), dtype=tl.int32)
    last = 0
    if HAS_SEQ:
        run_s = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
        last = tl.load(run_ptr + b * L + tl.minimum(L, (c + 1) * Q) - 1)
    acc = tl.zeros((BK, BN), dtype=tl.float32)
    for h in range(h0, h1):
        dbase = ((b * H + h) * NC + c) * Q
        acs_s = tl.load(acs_ptr + dbase + offs_k)
        dt_s = tl.load(dtp_ptr + dbase + offs_k)
        acs_last = tl.load(acs_ptr + dbase + Q - 1)
        ws = tl.exp(tl.minimum(acs_last - acs_s, 0.0)) * dt_s
        if HAS_SEQ:
            ws = tl.where(run_s == last, ws, 0.0)
        Xs = tl.load(x_ptr + b * s_xb + ts64[:, None] * s_xl + h * s_xh + offs_p[None, :] * s_xp, mask=msp,
                     other=0.0)
        Gm = tl.load(gst_ptr + ((b * (NC + 1) + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                     mask=mp[:, None] & mn[None, :], other=0.0)
        acc += _mm((Xs * ws[:, None]).to(Gm.dtype), Gm, FP32_DOTS)
    start = (pk * BK // BM) * BM
    for m0 in range(start, tl.where(split == 0, Q, start), BM):   # the C·Bᵀ-gradient term: once per group
        offs_m = m0 + tl.arange(0, BM)
        tm = c * Q + offs_m
        mm = tm < L
        tm64 = tm.to(tl.int64)
        keep = offs_m[None, :] >= offs_k[:, None]
        if HAS_SEQ:
            run_m = tl.load(run_ptr + b * L + tm, mask=mm, other=-1)
            keep = keep & (run_m[None, :] == run_s[:, None])
        psum = tl.load(dcb_ptr + ((b * NC + c) * G + g) * Q * Q + offs_m[None, :] * Q + offs_k[:, None])
        Cm = tl.load(C_ptr + b * s_cb + tm64[:, None] * s_cl + g * s_cg + offs_n[None, :] * s_cn,
                     mask=mm[:, None] & mn[None, :], other=0.0)
        acc += _mm(tl.where(keep, psum, 0.0).to(Cm.dtype), Cm, FP32_DOTS)
    tl.store(dB_ptr + split * s_dbs + b * s_dbb + ts64[:, None] * s_dbl + g * s_dbg + offs_n[None, :] * s_dbn,
             acc.to(dB_ptr.dtype.element_ty), mask=ms[:, None] & mn[None, :])


@triton.jit
def bwd_dc_kernel(dy_ptr, acs_ptr, B_ptr, st_ptr, run_ptr, dC_ptr, dcb_ptr,
                  L, H, NC, P, N, R, HPP, G,
                  s_yb, s_yl, s_yh, s_yp, s_bb, s_bl, s_bg, s_bn,
                  s_dcs, s_dcb, s_dcl, s_dcg, s_dcn,
                  Q: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                  HAS_SEQ: tl.constexpr, FP32_DOTS: tl.constexpr = False):
    """dC for one block T of target tokens, one group, a split of its heads:
    sum_h wm·(dy_t(h) S(h)) + sum_S dcb[t, S] B_S, heads innermost; dcb (the head sums of
    dy_t(h)·x_s(h) exp(Acs_t - Acs_s) dt_s) comes from bwd_dcb_kernel, its term is added by head split 0 only."""
    pm = tl.program_id(0)
    pid_bc = tl.program_id(1)
    nsplit = tl.cdiv(R, HPP)
    g = tl.program_id(2) // nsplit
    split = tl.program_id(2) % nsplit
    b = (pid_bc // NC).to(tl.int64)
    c = pid_bc % NC
    offs_m = pm * BM + tl.arange(0, BM)
    tm = c * Q + offs_m
    mm = tm < L
    tm64 = tm.to(tl.int64)
    offs_p = tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    mmp = mm[:, None] & mp[None, :]
    h0 = g * R + split * HPP
    h1 = tl.minimum(h0 + HPP, g * R + R)
    run_m = tl.zeros((BM,), dtype=tl.int32)
    prev_last = 0
    if HAS_SEQ:
        run_m = tl.load(run_ptr + b * L + tm, mask=mm, other=-1)
        prev_last = tl.load(run_ptr + b * L + tl.maximum(c * Q - 1, 0))
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for h in range(h0, h1):
        dbase = ((b * H + h) * NC + c) * Q
        wm = tl.exp(tl.load(acs_ptr + dbase + offs_m))
        if HAS_SEQ:
            wm = tl.where(run_m == prev_last, wm, 0.0)
        dYm = tl.load(dy_ptr + b * s_yb + tm64[:, None] * s_yl + h * s_yh + offs_p[None, :] * s_yp, mask=mmp,
                      other=0.0)
        S = tl.load(st_ptr + ((b * (NC + 1) + c) * H + h) * P * N + offs_p[:, None] * N + offs_n[None, :],
                    mask=mp[:, None] & mn[None, :], other=0.0)
        acc += _mm((dYm * wm[:, None]).to(S.dtype), S, FP32_DOTS)
    for k0 in range(0, tl.where(split == 0, (pm + 1) * BM, 0), BK):   # the C·Bᵀ-gradient term: once per group
        offs_k = k0 + tl.arange(0, BK)
        ts = c * Q + offs_k
        ms = ts < L
        ts64 = ts.to(tl.int64)
        keep = offs_m[:, None] >= offs_k[None, :]
        if HAS_SEQ:
            run_k = tl.load(run_ptr + b * L + ts, mask=ms, other=-1)
            keep = keep & (run_m[:, None] == run_k[None, :])
        wsum = tl.load(dcb_ptr + ((b * NC + c) * G + g) * Q * Q + offs_m[:, None] * Q + offs_k[None, :])
        Bk = tl.load(B_ptr + b * s_bb + ts64[:, None] * s_bl + g * s_bg + offs_n[None, :] * s_bn,
                     mask=ms[:, None] & mn[None, :], other=0.0)
        acc += _mm(tl.where(keep, wsum, 0.0).to(Bk.dtype), Bk, FP32_DOTS)
    tl.store(dC_ptr + split * s_dcs + b * s_dcb + tm64[:, None] * s_dcl + g * s_dcg + offs_n[None, :] * s_dcn,
             acc.to(dC_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def dt_bwd_kernel(dt_ptr, bias_ptr, dtp_ptr, ddt_ptr, off_ptr, stf_ptr, strad_ptr, part_ptr, A_ptr,
                  ddt_raw_ptr, dA_part_ptr, L, H, NC, NBLK, NPM, s_db, s_dl, s_dh, s_ob, s_ol, s_oh, lo, hi,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                  Q: tl.constexpr, BH: tl.constexpr, BB: tl.constexpr):
    """d(dA_u) = sum_{t>=u} (off_t + r'_t - c'_t) + sum_{s<u} stf_s + <G, decay S> (off holds off - c', strad the
    r' partials; see bwd_dx_kernel); ddt = direct + A·d(dA);
    then back through clamp/softplus/bias to the raw dt."""
    c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_h = tl.program_id(2) * BH + tl.arange(0, BH)
    offs_q = tl.arange(0, Q)
    t = c * Q + offs_q
    mask_h = offs_h < H
    mask = (t < L)[:, None] & mask_h[None, :]
    off = ((b * H + offs_h[None, :]) * NC + c) * Q + offs_q[:, None]
    offt = tl.load(off_ptr + off, mask=mask_h[None, :], other=0.0)
    stf = tl.load(stf_ptr + off, mask=mask_h[None, :], other=0.0)
    soff = (((b * H + offs_h[None, :]) * NC + c) * NPM) * Q + offs_q[:, None]
    rs = tl.zeros((Q, BH), dtype=tl.float32)
    for pm in range(NPM):
        rs += tl.load(strad_ptr + soff + pm * Q, mask=mask_h[None, :], other=0.0)
    dda = tl.cumsum(offt + rs, axis=0, reverse=True) + tl.cumsum(stf, axis=0) - stf
    offs_blk = tl.arange(0, BB)
    pl = tl.load(part_ptr + ((b * H + offs_h[:, None]) * NC + c) * NBLK + offs_blk[None, :],
                 mask=mask_h[:, None] & (offs_blk < NBLK)[None, :], other=0.0)
    dda += tl.sum(pl, axis=1)[None, :]
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    dtp = tl.load(dtp_ptr + off, mask=mask_h[None, :], other=0.0)
    ddt = tl.load(ddt_ptr + off, mask=mask_h[None, :], other=0.0) + A[None, :] * dda
    ddt = tl.where(mask, ddt, 0.0)
    tl.store(dA_part_ptr + (b * NC + c) * H + offs_h, tl.sum(tl.where(mask, dtp * dda, 0.0), axis=0), mask=mask_h)
    if CLAMP or SOFTPLUS:
        v = tl.load(dt_ptr + b * s_db + t[:, None].to(tl.int64) * s_dl + offs_h[None, :] * s_dh, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
        sp = v
        if SOFTPLUS:
            sp = _softplus(v)
        if CLAMP:
            ddt = tl.where((sp >= lo) & (sp <= hi), ddt, 0.0)
        if SOFTPLUS:
            ddt = tl.where(v > 20.0, ddt, ddt * tl.sigmoid(v))
    tl.store(ddt_raw_ptr + b * s_ob + t[:, None].to(tl.int64) * s_ol + offs_h[None, :] * s_oh, ddt, mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# decode step
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def step_kernel(st_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, act_ptr, idx_ptr, y_ptr,
                H, P, N, R, lo, hi,
                s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_db, s_dh, s_bb, s_bg, s_bn, s_cb, s_cg, s_cn,
                s_zb, s_zh, s_zp, s_yb, s_yh, s_yp,
                BP: tl.constexpr, BN: tl.constexpr, HAS_D: tl.constexpr, D_PER_CH: tl.constexpr,
                HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr,
                HAS_ACT: tl.constexpr, HAS_IDX: tl.constexpr, A_IS_LOG: tl.constexpr):
    """S <- exp(dt·A)·S + dt·x⊗B in place (fp32 math), y = S·C (+ D x)(· silu z); inactive rows keep S untouched.
    With HAS_IDX, input row b advances state row idx[b]; with A_IS_LOG the A pointer holds A_log (A = -exp)."""
    pp = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if HAS_IDX:
        sb = tl.load(idx_ptr + b).to(tl.int64)
    else:
        sb = b
    g = h // R
    dt = tl.load(dt_ptr + b * s_db + h * s_dh).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    A = tl.load(A_ptr + h).to(tl.float32)
    if A_IS_LOG:
        A = -tl.exp(A)
    dA = tl.exp(dt * A)
    offs_p = pp * BP + tl.arange(0, BP)
    offs_n = tl.arange(0, BN)
    mp = offs_p < P
    mn = offs_n < N
    m = mp[:, None] & mn[None, :]
    s_off = sb * s_sb + h * s_sh + offs_p[:, None].to(tl.int64) * s_sp + offs_n[None, :] * s_sn
    S = tl.load(st_ptr + s_off, mask=m, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + b * s_xb + h * s_xh + offs_p * s_xp, mask=mp, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + b * s_bb + g * s_bg + offs_n * s_bn, mask=mn, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + b * s_cb + g * s_cg + offs_n * s_cn, mask=mn, other=0.0).to(tl.float32)
    new = S * dA + (dt * x)[:, None] * Bv[None, :]
    if HAS_ACT:
        act = tl.load(act_ptr + b) != 0
        new = tl.where(act, new, S)
        m = m & ((tl.zeros((BP, BN), dtype=tl.int32) + act.to(tl.int32)) != 0)
    tl.store(st_ptr + s_off, new.to(st_ptr.dtype.element_ty), mask=m)
    y = tl.sum(new * Cv[None, :], axis=1)
    if HAS_D:
        if D_PER_CH:
            y += x * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
        else:
            y += x * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + b * s_zb + h * s_zh + offs_p * s_zp, mask=mp, other=0.0).to(tl.float32)
        y = y * zz * tl.sigmoid(zz)
    tl.store(y_ptr + b * s_yb + h * s_yh + offs_p * s_yp, y.to(y_ptr.dtype.element_ty), mask=mp)
