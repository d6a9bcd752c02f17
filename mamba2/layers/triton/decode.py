"""The Mamba-2 mixer's decode step between its two projections as ONE Triton kernel (docs/design.md §2, §7):
conv update + SiLU, SSD state update, D skip, z gate and the grouped RMSNorm, reading and writing the rows of a
slot pool directly. A layer's decode step is then in_proj (GEMM), this kernel, out_proj (GEMM), instead of three
kernels between the GEMMs (conv update, SSD step, gated norm); at batch 1 a launch costs about as much as the
work, so the count is what matters.

Per input row b (pool row ``sb = state_indices[b]``), head h of group g = h // (H/G), channels p of the head:

    xBC   = silu(bias + Σ_k w[:, k] · [window_sb, xBC_in][k])        (rounded to the model dtype, as the conv's
                                                                      output is on every other path)
    Δ     = clamp(softplus(dt + dt_bias_h), dt_limit),   ā = exp(Δ · A_h),   A_h = -exp(A_log_h)
    S     ← ā · S + Δ · x ⊗ B                                         (fp32, in place in the pool row)
    y     = S · C + D · x                                             (rounded to the model dtype, as the SSD
                                                                      step's output is before the norm)
    out   = RMSNorm_group(y · silu z) · w     (norm_before_gate: RMSNorm_group(y) · w · silu z; no norm: y·silu z)

and the window of row sb shifts by one (its oldest input out, xBC_in in). The group statistics are fp32 over
the d_ssm / G channels of the group, as :mod:`mamba2.layers.triton.norm` computes them.

Layouts (``b`` rows, ``S`` pool rows, ``K`` d_conv, ``c`` conv_dim = d_ssm + 2·G·N):
  zxbcdt: (b, 2·d_mlp + d_ssm + c + H), channels contiguous: the in_proj output, read in place (no split copies)
  conv_state: (S, K-1, c) any strides        ssm_state: (S, H, P, N) any strides (fp32 by default)
  conv weight: (c, K) any strides            out: (b, d_mlp + d_ssm) contiguous, written here
  counters: (rows >= b, G) int32 contiguous, all zero between calls (owned by the caller, allocated once)

Grid: (cdiv(P, BP), H, b), one program per (P block, head, row); a group's programs are adjacent. Each program
computes the conv of its BP x channels and of its group's 2·N B and C channels (recomputed by every program of
the group: 2·N·K loads, cheap next to its BP·N state), and its slice of y.

**Design: one kernel, "last program finishes the group".** The group norm needs all H/G heads of a group, and
the B/C conv window of a group is read by all its programs, so something must run after all of them. Each
program stores its un-normalised y into ``out`` (a scratch use of the output: no extra buffer) and then
increments the (row, group) counter with one acq_rel atomic; the program that reads ARRIVE - 1 (ARRIVE =
programs per group) is the last one: it shifts the group's B/C window, normalises the group's channels of
``out`` in place and resets the counter to 0 — so every call (a CUDA-graph replay too) starts from zero with no
memset launch. A second normalising kernel would have worked as well (one more launch, ~3-5 µs at batch 1);
the atomics work under TRITON_INTERPRET (which runs programs one after another) and on the GPU, so one kernel
it is. The sum of squares is taken by the last program from the stored y in a fixed order (no float atomics):
the same inputs give the same bits whatever the order in which the programs arrive (deterministic).
When a group has one program (G = H and BP >= P) no counter is used at all (SOLO).

**Ordering argument (GPU memory model).** Program i of a group does, in program order:
  (a) read the old window of its x channels and of its group's B/C channels, and its state rows;
  (b) write its state rows and its y slice into ``out``;
  (c) ``debug_barrier`` (bar.sync): every thread's (a) and (b) happen before (d) in the CTA;
  (d) write the shifted window of its own x channels (nobody else reads or writes those channels of this pool
      row), then one thread does ``atomic_add(counter, 1, sem="acq_rel", scope gpu)``.
(c) is required because Triton lowers a scalar atomic to one predicated thread: without the barrier only that
thread's own accesses would be ordered by its release. The atomics on one counter are totally ordered, so the
program whose add returns ARRIVE - 1 comes after every other add of the group, and its acquire synchronises
with each of their releases (a release sequence of RMWs). Hence every other program's (a) reads of the B/C
window and (b) writes of y happen before everything the last program does after its atomic (Triton broadcasts
the atomic's result through shared memory behind a barrier, so all threads of the last program are ordered
after the acquire): it reads every y of the group (loads marked ``.cg``, served by L2, as a second guard against a
stale L1 line) and it overwrites the B/C window when no other program can still be reading the old one. The
last program re-reads the old B/C window after its atomic (only it ever writes it, so it is still the old one),
then a ``debug_barrier`` separates those reads from its own shifted writes (the read and the written rows of a
channel can sit in different threads). Its counter reset (a plain store) races with nothing: all ARRIVE adds of
this launch have happened, and the next launch that uses the counter is stream-ordered after this one.

Rows named twice in ``state_indices`` (the serving engine pads a CUDA-graph batch with one scratch slot) race on
that pool row only, as the unfused kernels do; their counters are per input row, so the other rows are exact.
One decode step at a time per counters buffer: two concurrent streams must not share one.

Not here: the d_mlp > 0 branch ``silu(z0) · x0`` (torch, written into the first d_mlp columns of ``out``), fp64
(the torch path, by the kernel policy), d_conv < 2 (no window: the caller uses the unfused path).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from mamba2.kernels import Tuning
from mamba2.layers.triton.conv import _xp
from mamba2.ssd.triton.backend import _clamp_args
from mamba2.ssd.triton.kernels import _softplus

TUNING = Tuning("decode", {
    # FUSED=False: the mixer's decode step runs the unfused kernels instead (conv update, SSD step, gated norm);
    # the results agree within rounding (benchmarks/decode_step.py prices one against the other)
    "mixer": dict(FUSED=True),
    # BP: x channels of a head per program (None: start from min(MAX_BP, P) and halve, not below MIN_BP, while
    # fewer than MIN_PROGS programs run: small batches need the parallelism, large ones fewer recomputed B/C convs);
    # NORM_BLOCK: channels per pass of the last program's group norm (one pass when the group fits);
    # num_warps None: 4, or one per 1024 elements of the (BP, N) state tile when that is more (up to 8)
    "fused": dict(BP=None, MIN_BP=8, MAX_BP=64, MIN_PROGS=256, NORM_BLOCK=2048, num_warps=None),
})


# ----------------------------------------------------------------------------------------------------------------
# helpers (inlined)
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _conv_silu(x_b, cs_b, w_ptr, bias_ptr, ch, m, s_ck, s_cc, s_wc, s_wk,
               K: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr):
    """silu(conv) of one new token at channels ch (int64, mask m) over [window (K-1 rows at cs_b), input at x_b]:
    fp32, rounded to the input's dtype."""
    taps = tl.arange(0, KW)
    xp = _xp(x_b, cs_b, taps - (K - 1), ch, m, 1, 0, 1, s_ck, s_cc, K, True)         # (KW, BC), zero past tap K-1
    w = tl.load(w_ptr + ch[None, :] * s_wc + taps[:, None] * s_wk, mask=(taps < K)[:, None] & m[None, :],
                other=0.0).to(tl.float32)
    acc = tl.sum(xp * w, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + ch, mask=m, other=0.0).to(tl.float32)
    acc = acc * tl.sigmoid(acc)
    return acc.to(x_b.dtype.element_ty).to(tl.float32)


@triton.jit
def _next_window(x_b, cs_b, ch, m, s_ck, s_cc, K: tl.constexpr, KS: tl.constexpr):
    """The shifted window of channels ch, (KS, BC) fp32: rows 1 .. K-2 of the old one, then the new input."""
    return _xp(x_b, cs_b, tl.arange(0, KS) - (K - 2), ch, m, 1, 0, 1, s_ck, s_cc, K, True)


@triton.jit
def _store_window(cs_b, win, ch, m, s_ck, s_cc, K: tl.constexpr, KS: tl.constexpr):
    rows = tl.arange(0, KS)
    tl.store(cs_b + rows[:, None] * s_ck + ch[None, :] * s_cc, win.to(cs_b.dtype.element_ty),
             mask=(rows < K - 1)[:, None] & m[None, :])


@triton.jit
def _gated(yv, zv, NORM_BEFORE_GATE: tl.constexpr):
    """(the normalised input, the gate) of y and z, fp32."""
    gate = zv * tl.sigmoid(zv)
    if NORM_BEFORE_GATE:
        return yv, gate
    else:
        return yv * gate, gate


@triton.jit
def _group_norm(out_b, z_b, nw_ptr, c0, GS, eps, BG: tl.constexpr, ONE_BLOCK: tl.constexpr,
                NORM_BEFORE_GATE: tl.constexpr):
    """Normalise in place the GS channels c0 .. c0+GS-1 of one row of ``out`` (holding y) with the gate z:
    statistics in fp32 over the group, in a fixed order. One block when the group fits BG, else two passes."""
    offs = tl.arange(0, BG)
    if ONE_BLOCK:
        m = offs < GS
        ch = c0 + offs
        yv = tl.load(out_b + ch, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        zv = tl.load(z_b + ch, mask=m, other=0.0).to(tl.float32)
        hh, gate = _gated(yv, zv, NORM_BEFORE_GATE)
        rstd = tl.rsqrt(tl.sum(hh * hh, axis=0) / GS + eps)
        o = hh * rstd * tl.load(nw_ptr + ch, mask=m, other=0.0).to(tl.float32)
        if NORM_BEFORE_GATE:
            o = o * gate
        tl.store(out_b + ch, o.to(out_b.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros((BG,), dtype=tl.float32)
        for start in range(0, GS, BG):
            m = start + offs < GS
            ch = c0 + start + offs
            yv = tl.load(out_b + ch, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
            zv = tl.load(z_b + ch, mask=m, other=0.0).to(tl.float32)
            hh, gate = _gated(yv, zv, NORM_BEFORE_GATE)
            acc += hh * hh
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / GS + eps)
        for start in range(0, GS, BG):
            m = start + offs < GS
            ch = c0 + start + offs
            yv = tl.load(out_b + ch, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
            zv = tl.load(z_b + ch, mask=m, other=0.0).to(tl.float32)
            hh, gate = _gated(yv, zv, NORM_BEFORE_GATE)
            o = hh * rstd * tl.load(nw_ptr + ch, mask=m, other=0.0).to(tl.float32)
            if NORM_BEFORE_GATE:
                o = o * gate
            tl.store(out_b + ch, o.to(out_b.dtype.element_ty), mask=m)


@triton.jit
def _finish_group(x_b, cs_b, out_b, z_b, nw_ptr, cB, cC, mn, g, GS, eps, s_ck, s_cc,
                  K: tl.constexpr, KS: tl.constexpr, BG: tl.constexpr, ONE_BLOCK: tl.constexpr,
                  NORM: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr):
    """What the group's last program does: shift the B/C window, normalise the group's channels of out."""
    nb = _next_window(x_b, cs_b, cB, mn, s_ck, s_cc, K, KS)
    nc = _next_window(x_b, cs_b, cC, mn, s_ck, s_cc, K, KS)
    tl.debug_barrier()          # this program's reads of the old window before its writes of the new one
    _store_window(cs_b, nb, cB, mn, s_ck, s_cc, K, KS)
    _store_window(cs_b, nc, cC, mn, s_ck, s_cc, K, KS)
    if NORM:
        _group_norm(out_b, z_b, nw_ptr, g * GS, GS, eps, BG, ONE_BLOCK, NORM_BEFORE_GATE)


# ----------------------------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def fused_decode_kernel(zx_ptr, cs_ptr, st_ptr, idx_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, D_ptr, nw_ptr,
                        out_ptr, cnt_ptr,
                        P, N, G, R, ARRIVE, GS, Z_OFF, XBC_OFF, DT_OFF, OUT_OFF, D_SSM, lo, hi, eps,
                        s_ib, s_zb, s_cb, s_ck, s_cc, s_sb, s_sh, s_sp, s_sn, s_wc, s_wk, s_ob,
                        K: tl.constexpr, KW: tl.constexpr, KS: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                        BG: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                        D_PER_CH: tl.constexpr, CLAMP: tl.constexpr, NORM: tl.constexpr,
                        NORM_BEFORE_GATE: tl.constexpr, SOLO: tl.constexpr):
    """One (P block, head, row) of the fused decode step; the module docstring has the math and the ordering."""
    pp = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // R
    sb = tl.load(idx_ptr + b * s_ib).to(tl.int64)
    row = zx_ptr + b * s_zb
    x_b = row + XBC_OFF                    # xBC input of this row (conv channel c at x_b + c)
    z_b = row + Z_OFF
    cs_b = cs_ptr + sb * s_cb              # the window of pool row sb
    out_b = out_ptr + b * s_ob + OUT_OFF

    # (a) reads: conv of this program's x channels and of the group's B and C channels
    offs_p = pp * BP + tl.arange(0, BP)
    mp = offs_p < P
    offs_n = tl.arange(0, BN)
    mn = offs_n < N
    cx = (h * P + offs_p).to(tl.int64)
    cB = (D_SSM + g * N + offs_n).to(tl.int64)
    cC = cB + G * N
    x = _conv_silu(x_b, cs_b, cw_ptr, cb_ptr, cx, mp, s_ck, s_cc, s_wc, s_wk, K, KW, HAS_CONV_BIAS)
    Bv = _conv_silu(x_b, cs_b, cw_ptr, cb_ptr, cB, mn, s_ck, s_cc, s_wc, s_wk, K, KW, HAS_CONV_BIAS)
    Cv = _conv_silu(x_b, cs_b, cw_ptr, cb_ptr, cC, mn, s_ck, s_cc, s_wc, s_wk, K, KW, HAS_CONV_BIAS)
    xwin = _next_window(x_b, cs_b, cx, mp, s_ck, s_cc, K, KS)

    dt = tl.load(row + DT_OFF + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
    dt = _softplus(dt)
    if CLAMP:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    dA = tl.exp(dt * -tl.exp(tl.load(alog_ptr + h).to(tl.float32)))

    # (b) the state rows of this program (nobody else's) and its slice of y
    s_off = sb * s_sb + h * s_sh + offs_p[:, None].to(tl.int64) * s_sp + offs_n[None, :] * s_sn
    m2 = mp[:, None] & mn[None, :]
    S = tl.load(st_ptr + s_off, mask=m2, other=0.0).to(tl.float32)
    S = S * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(st_ptr + s_off, S.to(st_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(S * Cv[None, :], axis=1)
    if D_PER_CH:
        y += x * tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
    else:
        y += x * tl.load(D_ptr + h).to(tl.float32)
    if not NORM:
        zv = tl.load(z_b + cx, mask=mp, other=0.0).to(tl.float32)
        y = y * zv * tl.sigmoid(zv)
    tl.store(out_b + cx, y.to(out_ptr.dtype.element_ty), mask=mp)

    # (c) every thread's reads and writes above before what follows
    tl.debug_barrier()
    # (d) the shifted window of this program's own x channels; then arrive
    _store_window(cs_b, xwin, cx, mp, s_ck, s_cc, K, KS)
    if SOLO:
        _finish_group(x_b, cs_b, out_b, z_b, nw_ptr, cB, cC, mn, g, GS, eps, s_ck, s_cc,
                      K, KS, BG, ONE_BLOCK, NORM, NORM_BEFORE_GATE)
    else:
        cnt = cnt_ptr + b * G + g
        if tl.atomic_add(cnt, 1, sem="acq_rel") == ARRIVE - 1:
            _finish_group(x_b, cs_b, out_b, z_b, nw_ptr, cB, cC, mn, g, GS, eps, s_ck, s_cc,
                          K, KS, BG, ONE_BLOCK, NORM, NORM_BEFORE_GATE)
            tl.store(cnt, 0)


# ----------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------

def block_p(batch: int, nheads: int, headdim: int) -> int:
    """BP, the x channels of a head per program, by the "fused" tuning (see TUNING)."""
    c = TUNING["fused"]
    full = triton.next_power_of_2(headdim)
    if c["BP"] is not None:
        return min(triton.next_power_of_2(c["BP"]), full)
    bp = min(c["MAX_BP"], full)
    while bp > c["MIN_BP"] and batch * nheads * triton.cdiv(headdim, bp) < c["MIN_PROGS"]:
        bp //= 2
    return bp


def fused_decode(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, state_indices: Tensor,
                 conv_weight: Tensor, conv_bias: Tensor | None, dt_bias: Tensor, A_log: Tensor, D: Tensor,
                 norm_weight: Tensor | None, counters: Tensor, *, ngroups: int, d_mlp: int = 0,
                 dt_limit: tuple[float, float] = (0.0, math.inf), eps: float = 1e-5,
                 norm_before_gate: bool = False) -> Tensor:
    """The Mamba-2 decode step between in_proj and out_proj, in one launch (module docstring).

    Args:
        zxbcdt: (batch, 2·d_mlp + d_ssm + conv_dim + H), the in_proj output ``[z0, x0, z, xBC, dt]``, channels
            contiguous (any row stride); fp32/bf16/fp16 (the model dtype: the output's).
        conv_state: (S, d_conv - 1, conv_dim) pool of conv windows; rows ``state_indices`` shift in place.
        ssm_state: (S, H, P, N) pool of SSM states (fp32 by default); rows ``state_indices`` advance in place.
        state_indices: (batch,) int64 pool rows, in [0, S), any stride; the other rows are not read or written.
        conv_weight: (conv_dim, d_conv); conv_bias: (conv_dim,) or None.
        dt_bias, A_log: (H,); D: (H,) or (H·P,) (``D_has_hdim``).
        norm_weight: (d_ssm,) for the grouped gated RMSNorm, or None for no norm (out = y · silu z).
        counters: (>= batch, ngroups) int32, zero (left zero by every call); allocate once, reuse.
        ngroups: G (H % G == 0); d_mlp: width of the gated-MLP branch (its ``silu(z0)·x0`` is computed in torch
            into the first d_mlp columns); dt_limit, eps, norm_before_gate: as in the mixer's config.
    Returns:
        (batch, d_mlp + d_ssm) in zxbcdt's dtype: the input of out_proj.
    Raises:
        ValueError: shapes that do not fit together (cheap checks only: this runs inside CUDA graphs).
    """
    b, width = zxbcdt.shape
    rows, km1, conv_dim = conv_state.shape
    H, P, N = ssm_state.shape[1:]
    G, K, d_ssm = ngroups, km1 + 1, H * P
    if (ssm_state.shape[0] != rows or width != 2 * d_mlp + d_ssm + conv_dim + H or conv_dim != d_ssm + 2 * G * N
            or H % G or K < 2 or tuple(conv_weight.shape) != (conv_dim, K) or tuple(state_indices.shape) != (b,)
            or counters.dim() != 2 or counters.shape[0] < b or counters.shape[1] != G
            or counters.dtype != torch.int32 or not counters.is_contiguous() or zxbcdt.stride(1) != 1
            or D.numel() not in (H, d_ssm) or (norm_weight is not None and norm_weight.numel() != d_ssm)):
        raise ValueError(f"fused_decode: shapes do not fit: zxbcdt {tuple(zxbcdt.shape)} (stride "
                         f"{zxbcdt.stride()}), conv_state {tuple(conv_state.shape)}, ssm_state "
                         f"{tuple(ssm_state.shape)}, conv_weight {tuple(conv_weight.shape)}, state_indices "
                         f"{tuple(state_indices.shape)}, counters {tuple(counters.shape)} {counters.dtype}, D "
                         f"{tuple(D.shape)}, ngroups {G}, d_mlp {d_mlp}; expected zxbcdt (b, 2·d_mlp + d_ssm + "
                         f"conv_dim + H) with unit channel stride, conv_dim = d_ssm + 2·G·N, d_conv >= 2, H % G "
                         f"== 0, counters (>= b, G) int32 contiguous")
    out = torch.empty(b, d_mlp + d_ssm, device=zxbcdt.device, dtype=zxbcdt.dtype)
    if b == 0:
        return out
    if d_mlp > 0:
        torch.mul(F.silu(zxbcdt[:, :d_mlp]), zxbcdt[:, d_mlp:2 * d_mlp], out=out[:, :d_mlp])
    c = TUNING["fused"]
    BP = block_p(b, H, P)
    npb = triton.cdiv(P, BP)
    R = H // G
    GS = R * P
    BG = min(triton.next_power_of_2(GS), triton.next_power_of_2(c["NORM_BLOCK"]))
    clamp, lo, hi = _clamp_args(dt_limit)
    nw = norm_weight.contiguous() if norm_weight is not None else dt_bias
    fused_decode_kernel[(npb, H, b)](
        zxbcdt, conv_state, ssm_state, state_indices, conv_weight,
        conv_bias if conv_bias is not None else conv_weight, dt_bias.contiguous(), A_log.contiguous(),
        D.contiguous(), nw, out, counters,
        P, N, G, R, R * npb, GS, 2 * d_mlp, 2 * d_mlp + d_ssm, 2 * d_mlp + d_ssm + conv_dim, d_mlp, d_ssm,
        lo, hi, float(eps),
        state_indices.stride(0), zxbcdt.stride(0), *conv_state.stride(), *ssm_state.stride(), *conv_weight.stride(),
        out.stride(0),
        K=K, KW=triton.next_power_of_2(K), KS=triton.next_power_of_2(K - 1), BP=BP,
        BN=triton.next_power_of_2(N), BG=BG, ONE_BLOCK=GS <= BG, HAS_CONV_BIAS=conv_bias is not None,
        D_PER_CH=D.numel() == d_ssm and d_ssm != H, CLAMP=clamp, NORM=norm_weight is not None,
        NORM_BEFORE_GATE=bool(norm_before_gate), SOLO=R * npb == 1,
        num_warps=c["num_warps"] or min(8, max(4, BP * triton.next_power_of_2(N) // 1024)))
    return out


__all__ = ["TUNING", "block_p", "fused_decode"]
