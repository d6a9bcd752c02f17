"""Triton kernels of the depthwise causal conv1d of the Mamba block (:class:`mamba2.layers.CausalConv1d`):
forward with the SiLU and the new decoding state fused in, backward in two passes (dpre, dweight, dbias; then dx
and d conv_state from the stored dpre; the pre-activation is recomputed, never stored), and the decode update
(L = 1: the same forward kernel, one launch).

Layouts (``b`` batch, ``L`` tokens, ``c`` channels, ``K`` d_conv):
  x, dy: (b, L, c) any strides          y, dx: (b, L, c) contiguous (written here)
  weight: (c, K) any strides            bias: (c,) any stride
  conv_state, d_new_state: (b, K-1, c) any strides      new_state, d_conv_state: (b, K-1, c) contiguous
  runs: (b, L) int32 contiguous, monotone document ids (:func:`mamba2.ssd.common.run_ids`)
  dpre: (b, L, c) contiguous, in x's dtype: the gradient w.r.t. the pre-activation (pass 1 writes, pass 2 reads)
  dw_part: (b·NT, KW, c) fp32, db_part: (b·NT, c) fp32: per-program partial sums (NT programs along time),
      reduced afterwards in torch (deterministic, no atomics); KW = next power of two >= K

The kernels index the padded input xp = [conv_state, x] by source position s in [-(K-1), L): s < 0 reads
conv_state[K-1+s] (zeros without a state). Output t reads the K taps s = t-(K-1)+k, k = 0..K-1:

    pre_t = bias + Σ_k weight[:, k] · xp[t-(K-1)+k] · [run(t-(K-1)+k) == run(t)],   y_t = act(pre_t)

with run(s < 0) = run(0): the state counts as the first token's document, as in the torch code. The new state is
xp[L .. L+K-2], written by the programs of the last time block. Backward, with dpre_t = dy_t · act'(pre_t):

    dx_s    = Σ_j weight[:, K-1-j] · dpre_{s+j} · [run(s+j) == run(s)]   (+ d_new_state[s-L+K-1] if in range)
    dw[k]   = Σ_t dpre_t · xp[t-(K-1)+k] · keep,        dbias = Σ_t dpre_t

and d conv_state is the same gather as dx for s < 0. Pass 1 recomputes pre (K taps) and writes dpre; pass 2
gathers dx from K shifted reads of dpre. (One pass that recomputed pre at the K-1 later tokens as well made
K + (K-1)·K tap loads per token: 5.4 ms for 65,536 tokens × 5,376 channels on an H200, docs/triton_notes.md.)

Every program owns a tile of BT tokens × BC channels, channels innermost (coalesced when the channel stride is
1, as it is for the mixer's slice of the in_proj output). Offsets that grow with b·L·c are int64
(docs/design.md §5.17); all math is fp32 whatever the input dtype (fp32/bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import KERNEL_DTYPES, Tuning, keeps_context
from mamba2.layers.conv_ref import check_conv_inputs, check_conv_update_inputs
from mamba2.ssd.common import run_ids

# Launch parameters; blocks are clipped to the problem. "update" is the L == 1 decode launch.
TUNING = Tuning("conv", {
    "fwd": dict(BT=64, BC=64, num_warps=4),
    "update": dict(BC=256, num_warps=4),
    # the slot-indexed decode update of a state pool (conv_update)
    "pool_update": dict(BC=256, num_warps=4),
    # backward pass 1 (dpre, dweight, dbias): TILES time blocks per program, fewer partials to reduce in torch;
    # one warp: each per-tap reduction over the token block stays within the warp (docs/triton_notes.md)
    "bwd": dict(BT=16, BC=64, TILES=4, num_warps=1),
    # backward pass 2 (dx from the stored dpre)
    "dx": dict(BT=64, BC=64, num_warps=4),
})


# ----------------------------------------------------------------------------------------------------------------
# helpers (inlined): every vector ``s`` / ``t`` is a (BT,) block of source / output positions, any sign
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _xp(x_b, cs_b, s, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """xp at source positions s (BT,) and channels offs_c (BC,) as fp32 (BT, BC): x for 0 <= s < L, conv_state
    for -(K-1) <= s < 0, zero elsewhere. x_b, cs_b: the batch row's base pointers."""
    in_x = (s >= 0) & (s < L)
    off_x = tl.maximum(s, 0).to(tl.int64)[:, None] * s_xl + offs_c[None, :] * s_xc
    v = tl.load(x_b + off_x, mask=in_x[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if HAS_STATE:
        in_s = (s < 0) & (s >= 1 - K)
        off_s = tl.maximum(s + (K - 1), 0).to(tl.int64)[:, None] * s_sl + offs_c[None, :] * s_sc
        v += tl.load(cs_b + off_s, mask=in_s[:, None] & mc[None, :], other=0.0).to(tl.float32)
    return v


@triton.jit
def _run(run_b, s, L):
    """Document id at positions s (clamped into [0, L): the state shares the first token's document)."""
    return tl.load(run_b + tl.minimum(tl.maximum(s, 0), L - 1))


@triton.jit
def _tap(x_b, cs_b, run_b, run_t, t, k: tl.constexpr, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, K: tl.constexpr,
         HAS_STATE: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Tap k of outputs t (BT,): xp[t - (K-1) + k] as fp32 (BT, BC), zero where it lies in another document than
    t (run_t: the documents of t). The last tap (the token itself) is always kept."""
    s = t - (K - 1) + k
    v = _xp(x_b, cs_b, s, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, K, HAS_STATE)
    if HAS_SEQ:
        if k < K - 1:
            v = tl.where((_run(run_b, s, L) == run_t)[:, None], v, 0.0)
    return v


@triton.jit
def _pre(x_b, cs_b, w_ptr, bias_ptr, run_b, t, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, s_wc, s_wk, s_bias,
         K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The pre-activation conv output at output positions t (BT,): fp32 (BT, BC)."""
    run_t = tl.zeros_like(t)
    if HAS_SEQ:
        run_t = _run(run_b, t, L)
    if HAS_BIAS:
        acc = tl.zeros((t.shape[0], offs_c.shape[0]), dtype=tl.float32) + \
            tl.load(bias_ptr + offs_c * s_bias, mask=mc, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.zeros((t.shape[0], offs_c.shape[0]), dtype=tl.float32)
    for k in tl.static_range(K):
        v = _tap(x_b, cs_b, run_b, run_t, t, k, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, K, HAS_STATE, HAS_SEQ)
        wk = tl.load(w_ptr + offs_c * s_wc + k * s_wk, mask=mc, other=0.0).to(tl.float32)
        acc += v * wk[None, :]
    return acc


@triton.jit
def _dpre(x_b, cs_b, w_ptr, bias_ptr, run_b, dy_b, t, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, s_wc, s_wk,
          s_bias, s_dyl, s_dyc, K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr,
          HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """Gradient w.r.t. the pre-activation at output positions t (BT,): fp32 (BT, BC), zero outside [0, L)."""
    inside = (t >= 0) & (t < L)
    off = tl.minimum(tl.maximum(t, 0), L - 1).to(tl.int64)[:, None] * s_dyl + offs_c[None, :] * s_dyc
    g = tl.load(dy_b + off, mask=inside[:, None] & mc[None, :], other=0.0).to(tl.float32)
    if SILU:   # d silu(z) / dz = sig(z) · (1 + z · (1 - sig(z)))
        z = _pre(x_b, cs_b, w_ptr, bias_ptr, run_b, t, offs_c, mc, L, s_xl, s_xc, s_sl, s_sc, s_wc, s_wk, s_bias,
                 K, HAS_STATE, HAS_BIAS, HAS_SEQ)
        sg = tl.sigmoid(z)
        g = g * sg * (1.0 + z * (1.0 - sg))
    return g


@triton.jit
def _gather_dx(w_ptr, run_b, dp_b, dnew_b, s, offs_c, mc, L, s_wc, s_wk, s_nl, s_nc, C,
               K: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_DNEW: tl.constexpr):
    """Gradient w.r.t. xp at source positions s (BT,): Σ_j w[K-1-j] · dpre_{s+j} · keep (+ d_new_state), with
    dpre read from the buffer the dpre kernel wrote (rows dp_b + t·C, zero outside [0, L))."""
    acc = tl.zeros((s.shape[0], offs_c.shape[0]), dtype=tl.float32)
    run_s = tl.zeros_like(s)
    if HAS_SEQ:
        run_s = _run(run_b, s, L)
    for j in tl.static_range(K):
        t = s + j
        inside = (t >= 0) & (t < L)
        g = tl.load(dp_b + tl.maximum(t, 0).to(tl.int64)[:, None] * C + offs_c[None, :],
                    mask=inside[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_SEQ:
            if j > 0:
                g = tl.where((_run(run_b, t, L) == run_s)[:, None], g, 0.0)
        wj = tl.load(w_ptr + offs_c * s_wc + (K - 1 - j) * s_wk, mask=mc, other=0.0).to(tl.float32)
        acc += g * wj[None, :]
    if HAS_DNEW:   # xp[s] is new_state[s - L + K - 1] when that index is in [0, K-1)
        i = s - L + (K - 1)
        ok = (i >= 0) & (i < K - 1)
        off = tl.maximum(i, 0).to(tl.int64)[:, None] * s_nl + offs_c[None, :] * s_nc
        acc += tl.load(dnew_b + off, mask=ok[:, None] & mc[None, :], other=0.0).to(tl.float32)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def conv_fwd_kernel(x_ptr, cs_ptr, w_ptr, bias_ptr, run_ptr, y_ptr, new_ptr, L, C,
                    s_xb, s_xl, s_xc, s_sb, s_sl, s_sc, s_wc, s_wk, s_bias,
                    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, KS: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """y = act(conv(xp)) for one (BT tokens × BC channels) tile of one batch row; the programs of the last time
    block also write new_state = xp[L .. L+K-2] (KS = next power of two >= K-1).
    Grid: (cdiv(L, BT), cdiv(C, BC), b). y and new_state are contiguous, in their own dtypes."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    x_b = x_ptr + b * s_xb
    cs_b = cs_ptr + b * s_sb
    run_b = run_ptr + b * L
    acc = _pre(x_b, cs_b, w_ptr, bias_ptr, run_b, offs_t, offs_c64, mc, L, s_xl, s_xc, s_sl, s_sc, s_wc, s_wk,
               s_bias, K, HAS_STATE, HAS_BIAS, HAS_SEQ)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    y_off = (b * L + offs_t.to(tl.int64))[:, None] * C + offs_c64[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mc[None, :])
    if K > 1:
        if pid_t == tl.num_programs(0) - 1:
            offs_i = tl.arange(0, KS)
            v = _xp(x_b, cs_b, L - (K - 1) + offs_i, offs_c64, mc, L, s_xl, s_xc, s_sl, s_sc, K, HAS_STATE)
            n_off = (b * (K - 1) + offs_i)[:, None] * C + offs_c64[None, :]
            tl.store(new_ptr + n_off, v.to(new_ptr.dtype.element_ty), mask=(offs_i < K - 1)[:, None] & mc[None, :])


@triton.jit
def conv_dpre_kernel(x_ptr, cs_ptr, w_ptr, bias_ptr, run_ptr, dy_ptr, dp_ptr, dw_ptr, db_ptr,
                     L, C, s_xb, s_xl, s_xc, s_sb, s_sl, s_sc, s_wc, s_wk, s_bias, s_dyb, s_dyl, s_dyc,
                     K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, TILES: tl.constexpr, KW: tl.constexpr,
                     HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr):
    """Backward pass 1, for TILES consecutive blocks of BT tokens × BC channels of one batch row: dpre (the
    pre-activation recomputed from the K taps) into the buffer dp (b, L, C), and this program's partial sums of
    dweight (KW, BC) and dbias (BC,) into row pid_t + NT·b of dw_part / db_part.
    Grid: (NT = cdiv(L, BT·TILES), cdiv(C, BC), b)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    x_b = x_ptr + b * s_xb
    cs_b = cs_ptr + b * s_sb
    run_b = run_ptr + b * L
    dy_b = dy_ptr + b * s_dyb
    offs_kw = tl.arange(0, KW)
    dw_acc = tl.zeros((KW, BC), dtype=tl.float32)
    db_acc = tl.zeros((BC,), dtype=tl.float32)
    for it in range(TILES):
        offs_t = (pid_t * TILES + it) * BT + tl.arange(0, BT)
        mt = offs_t < L
        g0 = _dpre(x_b, cs_b, w_ptr, bias_ptr, run_b, dy_b, offs_t, offs_c64, mc, L, s_xl, s_xc, s_sl, s_sc,
                   s_wc, s_wk, s_bias, s_dyl, s_dyc, K, HAS_STATE, HAS_BIAS, HAS_SEQ, SILU)   # zero where t >= L
        tl.store(dp_ptr + (b * L + offs_t.to(tl.int64))[:, None] * C + offs_c64[None, :],
                 g0.to(dp_ptr.dtype.element_ty), mask=mt[:, None] & mc[None, :])
        db_acc += tl.sum(g0, axis=0)
        run_t = tl.zeros_like(offs_t)
        if HAS_SEQ:
            run_t = _run(run_b, offs_t, L)
        for k in tl.static_range(K):
            v = _tap(x_b, cs_b, run_b, run_t, offs_t, k, offs_c64, mc, L, s_xl, s_xc, s_sl, s_sc, K, HAS_STATE,
                     HAS_SEQ)
            dw_acc += tl.where(offs_kw[:, None] == k, tl.sum(g0 * v, axis=0)[None, :], 0.0)
    row = b * tl.num_programs(0) + pid_t
    tl.store(dw_ptr + (row * KW + offs_kw[:, None]) * C + offs_c64[None, :], dw_acc, mask=mc[None, :])
    tl.store(db_ptr + row * C + offs_c64, db_acc, mask=mc)


@triton.jit
def conv_dx_kernel(w_ptr, run_ptr, dp_ptr, dnew_ptr, dx_ptr, dcs_ptr, L, C, s_wc, s_wk, s_nb, s_nl, s_nc,
                   s_db, s_dl, s_dc, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, KS: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HAS_DNEW: tl.constexpr, NEED_DCS: tl.constexpr):
    """Backward pass 2, one block of BT tokens × BC channels: dx gathered from the stored dpre of the K-1 later
    tokens (and d_new_state); programs of the first time block also write d conv_state (if NEED_DCS).
    Grid: (cdiv(L, BT), cdiv(C, BC), b)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.program_id(1) * BC + tl.arange(0, BC)
    mc = offs_c < C
    offs_c64 = offs_c.to(tl.int64)
    run_b = run_ptr + b * L
    dp_b = dp_ptr + b * L * C
    dnew_b = dnew_ptr + b * s_nb
    offs_t = pid_t * BT + tl.arange(0, BT)
    dx = _gather_dx(w_ptr, run_b, dp_b, dnew_b, offs_t, offs_c64, mc, L, s_wc, s_wk, s_nl, s_nc, C,
                    K, HAS_SEQ, HAS_DNEW)
    tl.store(dx_ptr + b * s_db + offs_t.to(tl.int64)[:, None] * s_dl + offs_c64[None, :] * s_dc,
             dx.to(dx_ptr.dtype.element_ty), mask=(offs_t < L)[:, None] & mc[None, :])
    if NEED_DCS:
        if pid_t == 0:
            offs_i = tl.arange(0, KS)
            s = offs_i - (K - 1)                                        # the state's positions -(K-1) .. -1
            d = _gather_dx(w_ptr, run_b, dp_b, dnew_b, s, offs_c64, mc, L, s_wc, s_wk, s_nl, s_nc, C,
                           K, HAS_SEQ, HAS_DNEW)
            d_off = (b * (K - 1) + offs_i)[:, None] * C + offs_c64[None, :]
            tl.store(dcs_ptr + d_off, d.to(dcs_ptr.dtype.element_ty), mask=(offs_i < K - 1)[:, None] & mc[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launchers and autograd
# ----------------------------------------------------------------------------------------------------------------

def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def _launch_opts(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None, runs: Tensor | None,
             silu: bool) -> tuple[Tensor, Tensor]:
    b, L, ch = x.shape
    K = weight.shape[1]
    y = torch.empty(b, L, ch, device=x.device, dtype=x.dtype)
    new = torch.empty(b, K - 1, ch, device=x.device, dtype=x.dtype)
    if L == 1:
        cfg = TUNING["update"]
        BT, BC = 1, min(cfg["BC"], _p2(ch))
    else:
        cfg = TUNING["fwd"]
        BT, BC = min(cfg["BT"], _p2(L)), min(cfg["BC"], _p2(ch))
    cs = conv_state if conv_state is not None else x
    s_s = conv_state.stride() if conv_state is not None else (0, 0, 0)
    conv_fwd_kernel[(triton.cdiv(L, BT), triton.cdiv(ch, BC), b)](
        x, cs, weight, bias if bias is not None else weight, runs if runs is not None else y, y, new, L, ch,
        *x.stride(), *s_s, *weight.stride(), bias.stride(0) if bias is not None else 0,
        K=K, BT=BT, BC=BC, KS=_p2(K - 1), HAS_STATE=conv_state is not None, HAS_BIAS=bias is not None,
        HAS_SEQ=runs is not None, SILU=silu, **_launch_opts(cfg))
    return y, new


def _backward(dy: Tensor, dnew: Tensor | None, x: Tensor, weight: Tensor, bias: Tensor | None,
              conv_state: Tensor | None, runs: Tensor | None, silu: bool, need_dcs: bool,
              dx_out: Tensor | None = None):
    """dx (written into ``dx_out``, a (b, L, channels) view of x's dtype, when given), dweight, dbias and
    d conv_state (if ``need_dcs``)."""
    b, L, ch = x.shape
    K = weight.shape[1]
    cfg = TUNING["bwd"]
    BT, BC = min(cfg["BT"], _p2(L)), min(cfg["BC"], _p2(ch))
    tiles = max(1, min(cfg["TILES"], triton.cdiv(L, BT)))
    nt = triton.cdiv(L, BT * tiles)
    KW = _p2(K)
    # dpre in x's dtype (the same rounding as dy); dweight and dbias are summed from it in fp32 before rounding
    dpre = torch.empty(b, L, ch, device=x.device, dtype=x.dtype)
    dw_part = torch.empty(b * nt, KW, ch, device=x.device, dtype=torch.float32)
    db_part = torch.empty(b * nt, ch, device=x.device, dtype=torch.float32)
    cs = conv_state if conv_state is not None else x
    s_s = conv_state.stride() if conv_state is not None else (0, 0, 0)
    runs_arg = runs if runs is not None else dpre
    conv_dpre_kernel[(nt, triton.cdiv(ch, BC), b)](
        x, cs, weight, bias if bias is not None else weight, runs_arg, dy, dpre, dw_part, db_part, L, ch,
        *x.stride(), *s_s, *weight.stride(), bias.stride(0) if bias is not None else 0, *dy.stride(),
        K=K, BT=BT, BC=BC, TILES=tiles, KW=KW, HAS_STATE=conv_state is not None, HAS_BIAS=bias is not None,
        HAS_SEQ=runs is not None, SILU=silu, **_launch_opts(cfg))
    cfg = TUNING["dx"]
    BT, BC = min(cfg["BT"], _p2(L)), min(cfg["BC"], _p2(ch))
    dx = dx_out if dx_out is not None else torch.empty(b, L, ch, device=x.device, dtype=x.dtype)
    dcs = torch.empty(b, K - 1, ch, device=x.device, dtype=conv_state.dtype) if need_dcs else dx
    dn = dnew if dnew is not None else dy
    s_n = dnew.stride() if dnew is not None else (0, 0, 0)
    conv_dx_kernel[(triton.cdiv(L, BT), triton.cdiv(ch, BC), b)](
        weight, runs_arg, dpre, dn, dx, dcs, L, ch, *weight.stride(), *s_n, *dx.stride(), K=K, BT=BT, BC=BC,
        KS=_p2(K - 1), HAS_SEQ=runs is not None, HAS_DNEW=dnew is not None, NEED_DCS=need_dcs, **_launch_opts(cfg))
    dw = dw_part.sum(0)[:K].t().to(weight.dtype)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db, (dcs if need_dcs else None)


@keeps_context
class _CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv_state, runs, silu):
        y, new = _forward(x, weight, bias, conv_state, runs, silu)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, bias, conv_state, runs)
        ctx.silu = silu
        return y, new

    @staticmethod
    def backward(ctx, dy, dnew):
        x, weight, bias, conv_state, runs = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        need_dcs = conv_state is not None and ctx.needs_input_grad[3]
        dx, dw, db, dcs = _backward(dy, dnew, x, weight, bias, conv_state, runs, ctx.silu, need_dcs)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dw if need[1] else None, db if need[2] else None, dcs, None, None)


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, seq_idx: Tensor | None = None,
                  conv_state: Tensor | None = None, activation: str | None = None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv1d with fused activation and decoding state, in Triton (CUDA tensors, or CPU tensors
    under ``TRITON_INTERPRET=1``); the same semantics as :meth:`mamba2.layers.CausalConv1d.forward`.

    ``y_t = act(bias + Σ_k weight[:, k] · xp[t - (K-1) + k])`` over ``xp = [conv_state, x]``, taps never reaching
    across a change of ``seq_idx`` (conv_state counts as the first token's document). fp32 math.

    Args:
        x: (batch, L, channels), L >= 1, any strides; fp32, bf16 or fp16.
        weight: (channels, d_conv), any strides. bias: (channels,) or None.
        seq_idx: optional (batch, L) integers (document index per token).
        conv_state: optional (batch, d_conv - 1, channels), the previous inputs (zeros if None); not modified.
        activation: None or ``"silu"``.
    Returns:
        y: (batch, L, channels) in x's dtype; new_state: (batch, d_conv - 1, channels) in x's dtype, the last
        d_conv - 1 inputs of ``[conv_state, x]``. Gradients flow to x, weight, bias and conv_state (through y and
        new_state) when they require them. L == 1 (the decode update) is a single kernel launch.
    Raises:
        ValueError: bad shapes, L < 1, a float64 (or other unsupported) dtype, an unknown activation.
    """
    b, L, ch, K = check_conv_inputs(x, weight, bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation)
    if L < 1:
        raise ValueError(f"causal_conv1d (Triton) needs L >= 1, got x of shape {tuple(x.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("conv_state", conv_state)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"causal_conv1d (Triton) takes {name} in float32/bfloat16/float16, got {t.dtype}"
                             + (" (float64 runs the torch code: CausalConv1d does that by itself)"
                                if t.dtype == torch.float64 else ""))
    runs = None
    if seq_idx is not None:
        runs = run_ids(seq_idx, b, L, x.device).to(torch.int32).contiguous()
    silu = activation == "silu"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, conv_state)):
        return _CausalConv1dFn.apply(x, weight, bias, conv_state, runs, silu)
    return _forward(x, weight, bias, conv_state, runs, silu)


@triton.jit
def conv_update_kernel(x_ptr, st_ptr, w_ptr, bias_ptr, idx_ptr, y_ptr, C,
                       s_xb, s_xc, s_sb, s_sk, s_sc, s_wc, s_wk, s_yb, s_yc,
                       K: tl.constexpr, BC: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr):
    """One token of row b through the conv window of pool row idx[b], which is shifted in place by one."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BC + tl.arange(0, BC)
    m = offs < C
    sb = tl.load(idx_ptr + b).to(tl.int64)
    st = st_ptr + sb * s_sb + offs * s_sc
    x = tl.load(x_ptr + b * s_xb + offs * s_xc, mask=m, other=0.0).to(tl.float32)
    acc = tl.load(w_ptr + offs * s_wc + (K - 1) * s_wk, mask=m, other=0.0).to(tl.float32) * x
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=m, other=0.0).to(tl.float32)
    for k in tl.static_range(K - 1):
        v = tl.load(st + k * s_sk, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + offs * s_wc + k * s_wk, mask=m, other=0.0).to(tl.float32) * v
    # shift after every tap is read: this program owns its channels of the row, nobody else touches them
    for k in tl.static_range(K - 2):
        tl.store(st + k * s_sk, tl.load(st + (k + 1) * s_sk, mask=m, other=0.0), mask=m)
    if K > 1:
        tl.store(st + (K - 2) * s_sk, x.to(st_ptr.dtype.element_ty), mask=m)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * s_yb + offs * s_yc, acc.to(y_ptr.dtype.element_ty), mask=m)


def conv_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, state_indices: Tensor, *,
                activation: str | None = None) -> Tensor:
    """One decode token per row through a pool of conv windows, in one launch (docs/design.md §7).

    Args:
        x: (batch, channels), any strides; fp32/bf16/fp16.
        conv_state: (S, d_conv - 1, channels), a pool of windows; rows ``state_indices`` are shifted in place.
        weight: (channels, d_conv); bias: (channels,) or None.
        state_indices: (batch,) int64, distinct rows of the pool, in [0, S).
        activation: None or "silu".
    Returns:
        y: (batch, channels) in x's dtype (what :func:`mamba2.layers.conv_ref.conv_update_torch` returns).
    Raises:
        ValueError: as :func:`mamba2.layers.conv_ref.check_conv_update_inputs`.
    """
    b, ch, K = check_conv_update_inputs(x, conv_state, weight, bias, state_indices, activation=activation)
    y = torch.empty(b, ch, device=x.device, dtype=x.dtype)
    c = TUNING["pool_update"]
    BC = min(c["BC"], triton.next_power_of_2(ch))
    conv_update_kernel[(b, triton.cdiv(ch, BC))](
        x, conv_state, weight, bias if bias is not None else weight, state_indices, y, ch,
        *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        K=K, BC=BC, HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=c["num_warps"])
    return y


__all__ = ["TUNING", "causal_conv1d", "conv_update"]
