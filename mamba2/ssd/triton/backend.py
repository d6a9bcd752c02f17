"""Launchers and autograd for the Triton SSD kernels (kernels.py): the ``ssd`` signature and the decode step.

Forward (4 launches): dt processing + chunk cumsum; C·Bᵀ per chunk and group; one sequential sweep per
(batch, head, state block) that builds the chunk states and passes them (fp32 in registers); the output kernel
(intra-chunk quadratic form + entering state + D skip + silu(z) gate).
Backward (7-9 launches): recompute the cumsum (entering states and C·Bᵀ are saved by the forward unless
the "save" tuning says otherwise); gate backward (if z); a reverse sweep for the state gradients; a per-head
kernel (dx, direct ddt, D grad and the numerically stable pieces of d(dA)); the gradient w.r.t. C·Bᵀ summed
over each group's heads (once, for both of the next two); per-group dB and dC kernels (state terms with the
group's heads innermost, plus one product of that gradient with C or B; no atomics: deterministic); a last
kernel that assembles d(dA) and goes back through clamp/softplus/bias to the raw dt. Nothing falls back to
autograd. See docs/triton_notes.md.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from mamba2.kernels import Tuning, keeps_context
from mamba2.ssd.common import check_inputs, check_step_inputs, run_ids, step_A
from mamba2.ssd.triton import kernels as K

# Launch parameters (tuned on one H200, see docs/triton_notes.md); blocks are clipped to the problem below.
# Every entry changes speed or memory only: results agree within rounding whatever the values.
TUNING = Tuning("ssd", {
    "cumsum": dict(BH=8, num_warps=4),
    # keep C·Bᵀ in bf16 for bf16 inputs (less memory, measured slower: notes)
    "cb_store": dict(BF16=False),
    # keep the entering states (bf16 for bf16 inputs: b·(nc+1)·h·p·n, about half of x) and C·Bᵀ from the forward
    # for the backward instead of recomputing them (notes: run 4)
    "save": dict(STATES=True),
    "cb": dict(BM=64, BK=64, num_warps=4, num_stages=2),
    "state_fwd": dict(BK=64, BP=64, BN=128, num_warps=4, num_stages=3),
    # the sequential sweeps (state_fwd, state_bwd) split p/n further until at least this many programs run
    # (one long row: b·h programs alone leave SMs idle); 0 = never
    "sweep": dict(MIN_PROGS=128),
    # CB_MEM: the output kernel reads the stored C·Bᵀ (False: it forms C·Bᵀ itself)
    "scan_fwd": dict(BM=64, BK=32, BP=64, CB_MEM=True, num_warps=4, num_stages=2),
    "gate_bwd": dict(BT=32, num_warps=4),
    "state_bwd": dict(BK=64, BP=64, BN=64, num_warps=4, num_stages=3),
    # MIN_BP: the P block is at least this wide. Triton 3.6 on Hopper compiles this kernel with 32-wide P blocks
    # and 4 warps into an out-of-bounds shared-memory read in its wgmma code (headdim 32: docs/triton_notes.md)
    "dx": dict(BK=64, BM=64, MIN_BP=64, num_warps=4, num_stages=1),
    # the gradient w.r.t. C·Bᵀ (sum over heads of dy·xᵀ∘decay∘dt), formed once for the dB and dC kernels
    "dcb": dict(BM=64, BK=64, num_warps=4, num_stages=2),
    # HPP: heads per program (None: chosen from the shape so that enough programs run)
    "db": dict(BK=64, BM=64, HPP=None, num_warps=4, num_stages=2),
    "dc": dict(BM=64, BK=64, HPP=None, num_warps=4, num_stages=2),
    "dt_bwd": dict(BH=8, num_warps=4),
    "step": dict(BP=16, num_warps=4),
    "varlen_states": dict(BK=64, BP=64, BN=128, num_warps=4, num_stages=2),
})


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _fp32_dots(t: Tensor) -> bool:
    """Whether the kernels' fp32 matrix products are fp32-accurate (tf32x3): fp32 inputs and torch's float32
    matmul precision "highest" (its default; "high"/"medium" allow one tf32 product, as they do for torch's own
    matmuls). docs/design.md §4 has the cost."""
    return t.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def kernel_chunk(chunk_size: int) -> int:
    """The chunk length the kernels use: a power of two in [16, 256] near ``chunk_size`` (results differ from
    another chunk length by rounding only)."""
    return min(256, _p2(chunk_size))


def _split_sweep(BP, BN, p, n, rows):
    """Halve the (p, n) blocks of a sequential sweep (n first, down to 32; then p, down to 16) until
    rows · blocks >= the "sweep" MIN_PROGS tuning."""
    want = TUNING["sweep"]["MIN_PROGS"]
    while rows * triton.cdiv(p, BP) * triton.cdiv(n, BN) < want:
        if BN > 32:
            BN //= 2
        elif BP > 16:
            BP //= 2
        else:
            break
    return BP, BN


def _clamp_args(dt_limit):
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = lo > 0.0 or math.isfinite(hi)
    return clamp, lo, (hi if math.isfinite(hi) else 3.0e38)


def _state_dtype(x: Tensor) -> torch.dtype:
    # stored copies of states / state gradients are matrix-product operands; the running state stays fp32
    return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32


def _prep(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, seq_idx, Q):
    b, L, h, p = x.shape
    nc = triton.cdiv(L, Q)
    dev = x.device
    dtp = torch.empty(b, h, nc, Q, device=dev, dtype=torch.float32)
    acs = torch.empty_like(dtp)
    clamp, lo, hi = _clamp_args(dt_limit)
    c = TUNING["cumsum"]
    BH = min(c.pop("BH"), _p2(h, 1))
    K.cumsum_fwd_kernel[(nc, b, triton.cdiv(h, BH))](
        dt, A, dt_bias if dt_bias is not None else A, dtp, acs, L, h, nc, *dt.stride(), lo, hi,
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp, Q=Q, BH=BH, **c)
    runs = run_ids(seq_idx, b, L, dev)
    runs = runs.to(torch.int32).contiguous() if runs is not None else None
    return dtp, acs, runs


def _cb(B, C, nc, Q, dtype):
    b, L, g, n = B.shape
    if B.dtype == torch.bfloat16 and TUNING["cb_store"]["BF16"]:
        dtype = torch.bfloat16
    cb = torch.empty(b, nc, g, Q, Q, device=B.device, dtype=dtype)
    c = TUNING["cb"]
    BM, BK = min(c.pop("BM"), Q), min(c.pop("BK"), Q)
    K.cb_kernel[((Q // BM) * (Q // BK), b * nc, g)](C, B, cb, L, nc, g, n, *C.stride(), *B.stride(),
                                                   Q=Q, BM=BM, BK=BK, BN=_p2(n), **c, FP32_DOTS=_fp32_dots(B))
    return cb


def _states(x, dtp, acs, B, init, runs, Q, sdt):
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    nc = dtp.shape[2]
    st = torch.empty(b, nc + 1, h, p, n, device=x.device, dtype=sdt)
    fin = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    c = TUNING["state_fwd"]
    BK, BP, BN = min(c.pop("BK"), Q), min(c.pop("BP"), _p2(p)), min(c.pop("BN"), _p2(n))
    BP, BN = _split_sweep(BP, BN, p, n, b * h)
    grid = (h, triton.cdiv(p, BP) * triton.cdiv(n, BN), b)
    K.state_fwd_kernel[grid](x, dtp, acs, B, init if init is not None else fin, st, fin,
                             runs if runs is not None else dtp, L, h, nc, p, n, h // g,
                             *x.stride(), *B.stride(), Q=Q, BK=BK, BP=BP, BN=BN,
                             HAS_INIT=init is not None, HAS_SEQ=runs is not None, **c, FP32_DOTS=_fp32_dots(x))
    return st, fin


def _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, init, runs_in, Q, store_yp):
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dtp, acs, runs = _prep(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, runs_in, Q)
    nc = dtp.shape[2]
    sdt = _state_dtype(x)
    st, fin = _states(x, dtp, acs, B, init, runs, Q, sdt)
    c = TUNING["scan_fwd"]
    cb_mem = c.pop("CB_MEM")
    cb = _cb(B, C, nc, Q, torch.float32) if cb_mem else dtp
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    yp = torch.empty_like(y) if store_yp else y
    zz = z if z is not None else x
    BM, BK, BP = min(c.pop("BM"), Q), min(c.pop("BK"), Q), min(c.pop("BP"), _p2(p))
    grid = (h, (Q // BM) * triton.cdiv(p, BP), b * nc)
    K.scan_fwd_kernel[grid](x, dtp, acs, B, C, cb, st, D if D is not None else A, zz, y, yp,
                            runs if runs is not None else dtp, L, h, nc, p, n, h // g, g,
                            *x.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(),
                            Q=Q, BM=BM, BK=BK, BP=BP, BN=_p2(n), HAS_D=D is not None,
                            D_PER_CH=D is not None and D.numel() == h * p, HAS_Z=z is not None,
                            STORE_YP=store_yp, HAS_SEQ=runs is not None, CB_MEM=cb_mem, **c, FP32_DOTS=_fp32_dots(x))
    return y, fin, (yp if store_yp else None), st, (cb if cb_mem else None)


def _backward(dout, dfin, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, init, seq_idx, Q, yp,
              st=None, cb=None, dx_out=None, dB_out=None, dC_out=None):
    """Every gradient of the SSD. st / cb: the forward's entering states and C·Bᵀ (recomputed when None).
    dx_out / dB_out / dC_out: views (x's, B's, C's shape and dtype) that receive dx, dB, dC instead of new
    tensors (the fused mixer writes them into one buffer)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    dev = x.device
    dtp, acs, runs = _prep(x, dt, A, B, C, dt_bias, dt_softplus, dt_limit, seq_idx, Q)
    nc = dtp.shape[2]
    sdt = _state_dtype(x)
    if st is None:
        st, _ = _states(x, dtp, acs, B, init, runs, Q, sdt)
    runs_arg = runs if runs is not None else dtp
    BPf, BN = _p2(p), _p2(n)

    # 1. gate
    dz = None
    if z is not None:
        dy = torch.empty_like(x, memory_format=torch.contiguous_format)
        dz = torch.empty_like(dy)
        c = TUNING["gate_bwd"]
        BT = c.pop("BT")
        K.gate_bwd_kernel[(triton.cdiv(L, BT), h, b)](dout, z, yp, dy, dz, L, h, p, *dout.stride(), *z.stride(),
                                                      *yp.stride(), BT=BT, BP=BPf, **c)
    else:
        dy = dout

    # 2. reverse state sweep
    gst = torch.empty(b, nc + 1, h, p, n, device=dev, dtype=sdt)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    c = TUNING["state_bwd"]
    BK, BP, BNs = min(c.pop("BK"), Q), min(c.pop("BP"), BPf), min(c.pop("BN"), BN)
    BP, BNs = _split_sweep(BP, BNs, p, n, b * h)
    nblk = triton.cdiv(p, BP) * triton.cdiv(n, BNs)
    part = torch.empty(b, h, nc, nblk, device=dev, dtype=torch.float32)
    K.state_bwd_kernel[(h, nblk, b)](dy, acs, C, st, dfin if dfin is not None else dinit, gst, dinit, part,
                                     runs_arg, L, h, nc, p, n, h // g, *dy.stride(), *C.stride(),
                                     Q=Q, BK=BK, BP=BP, BN=BNs, HAS_DFIN=dfin is not None,
                                     HAS_SEQ=runs is not None, **c, FP32_DOTS=_fp32_dots(dy))

    # 3. per head: dx, direct ddt, and the three d(dA) pieces (state, entering state, straddle sums)
    c = TUNING["dx"]
    BK, BM, BPx = min(c.pop("BK"), Q), min(c.pop("BM"), Q), _p2(p, c.pop("MIN_BP"))
    if cb is None or cb.dtype != torch.float32:
        cb = _cb(B, C, nc, Q, torch.float32)
    dx = dx_out if dx_out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
    ddt = torch.empty_like(dtp)
    stf = torch.empty_like(dtp)
    offt = torch.empty_like(dtp)
    npk = Q // BK
    strad = torch.empty(b, h, nc, npk, Q, device=dev, dtype=torch.float32)
    dDp = torch.empty(b * nc, h, npk, BPx, device=dev, dtype=torch.float32) if D is not None else dtp
    K.bwd_dx_kernel[(npk, b * nc, h)](
        x, dy, dtp, acs, B, C, cb, st, gst, D if D is not None else A, runs_arg, dx, ddt, stf, offt, strad, dDp,
        L, h, nc, p, n, h // g, g, *x.stride(), *dy.stride(), *B.stride(), *C.stride(), *dx.stride(),
        Q=Q, BK=BK, BM=BM, BP=BPx, BN=BN, HAS_D=D is not None, D_PER_CH=D is not None and D.numel() == h * p,
        HAS_SEQ=runs is not None, **c, FP32_DOTS=_fp32_dots(x))
    del cb

    # 4. the C·Bᵀ gradient (summed over each group's heads) once; then per group, heads innermost (split for
    # parallelism): dB and dC
    r = h // g
    c = TUNING["dcb"]
    BM, BK = min(c.pop("BM"), Q), min(c.pop("BK"), Q)
    dcb = torch.empty(b, nc, g, Q, Q, device=dev, dtype=torch.float32)
    K.bwd_dcb_kernel[((Q // BM) * (Q // BK), b * nc, g)](x, dy, dtp, acs, runs_arg, dcb, L, h, nc, p, r,
                                                        *x.stride(), *dy.stride(), Q=Q, BM=BM, BK=BK, BP=BPf,
                                                        HAS_SEQ=runs is not None, **c, FP32_DOTS=_fp32_dots(x))
    dB, dC = None, None
    for name in ("db", "dc"):
        c = TUNING[name]
        BK, BM = min(c.pop("BK"), Q), min(c.pop("BM"), Q)
        ntb = Q // (BK if name == "db" else BM)   # token blocks per chunk
        hpp = c.pop("HPP", None) or max(1, triton.cdiv(r, max(1, triton.cdiv(2048, ntb * b * nc * g))))
        ns = triton.cdiv(r, hpp)
        T = B if name == "db" else C
        given = dB_out if name == "db" else dC_out
        if ns == 1 and given is not None:
            out = given.unsqueeze(0)
        else:
            out = torch.empty((ns, *T.shape), device=dev, dtype=torch.float32 if ns > 1 else T.dtype)
        if name == "db":
            K.bwd_db_kernel[(ntb, b * nc, g * ns)](x, dtp, acs, C, gst, runs_arg, out, dcb, L, h, nc, p, n, r, hpp,
                                                    g, *x.stride(), *C.stride(), *out.stride(), Q=Q, BK=BK, BM=BM,
                                                    BP=BPf, BN=BN, HAS_SEQ=runs is not None, **c,
                                                    FP32_DOTS=_fp32_dots(x))
            dB = out.sum(0).to(B.dtype) if ns > 1 else out[0]
            if given is not None and ns > 1:
                dB = given.copy_(dB)
        else:
            K.bwd_dc_kernel[(ntb, b * nc, g * ns)](dy, acs, B, st, runs_arg, out, dcb, L, h, nc, p, n, r, hpp, g,
                                                    *dy.stride(), *B.stride(), *out.stride(), Q=Q, BM=BM, BK=BK,
                                                    BP=BPf, BN=BN, HAS_SEQ=runs is not None, **c,
                                                    FP32_DOTS=_fp32_dots(dy))
            dC = out.sum(0).to(C.dtype) if ns > 1 else out[0]
            if given is not None and ns > 1:
                dC = given.copy_(dC)
    del dcb

    # 5. dt, A, dt_bias
    clamp, lo, hi = _clamp_args(dt_limit)
    ddt_raw = torch.empty(b, L, h, device=dev, dtype=torch.float32)
    dA_part = torch.empty(b, nc, h, device=dev, dtype=torch.float32)
    c = TUNING["dt_bwd"]
    BH = min(c.pop("BH"), _p2(h, 1))
    K.dt_bwd_kernel[(nc, b, triton.cdiv(h, BH))](
        dt, dt_bias if dt_bias is not None else A, dtp, ddt, offt, stf, strad, part, A, ddt_raw, dA_part,
        L, h, nc, nblk, npk, *dt.stride(), *ddt_raw.stride(), lo, hi, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, CLAMP=clamp, Q=Q, BH=BH, BB=_p2(nblk, 1), **c)
    dA = dA_part.sum(dim=(0, 1)).to(A.dtype)
    ddt_bias = ddt_raw.sum(dim=(0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dD = None
    if D is not None:
        dDh = dDp.sum(dim=(0, 2))[:, :p]                                             # (h, p)
        dD = (dDh.reshape(D.shape) if D.numel() == h * p else dDh.sum(dim=1).reshape(D.shape)).to(D.dtype)
    return (dx.to(x.dtype), ddt_raw.to(dt.dtype), dA, dB, dC, dD,
            dz.to(z.dtype) if dz is not None else None, ddt_bias,
            dinit.to(init.dtype) if init is not None else None)


@keeps_context
class _SSDTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, init, seq_idx, dt_softplus, dt_limit, Q):
        store_yp = z is not None and ctx.needs_input_grad[6]
        y, fin, yp, st, cb = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, init, seq_idx, Q,
                                      store_yp)
        ctx.set_materialize_grads(False)
        if not (TUNING["save"]["STATES"] and any(ctx.needs_input_grad)):
            st = cb = None
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, init, seq_idx, yp, st, cb)
        ctx.cfg = (dt_softplus, dt_limit, Q)
        return y, fin

    @staticmethod
    def backward(ctx, dy, dfin):
        x, dt, A, B, C, D, z, dt_bias, init, seq_idx, yp, st, cb = ctx.saved_tensors
        dt_softplus, dt_limit, Q = ctx.cfg
        if dy is None:
            dy = torch.zeros_like(x)
        if z is not None and yp is None:   # z given but no stored pre-gate output: recompute it
            _, _, yp, _, _ = _forward(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, init, seq_idx, Q,
                                      True)
        grads = _backward(dy, dfin.contiguous() if dfin is not None else None, x, dt, A, B, C, D, z, dt_bias,
                          dt_softplus, dt_limit, init, seq_idx, Q, yp, st, cb)
        return (*grads, None, None, None, None)


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, D: Tensor | None = None,
               z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = True,
               dt_limit: tuple[float, float] = (0.0, math.inf), initial_states: Tensor | None = None,
               seq_idx: Tensor | None = None, chunk_size: int = 256, return_final_states: bool = False):
    """Triton SSD (same signature and results as :func:`mamba2.ssd.ssd`) for CUDA tensors (or CPU tensors under
    ``TRITON_INTERPRET=1``). fp32/bf16/fp16 inputs; fp32 final states."""
    check_inputs(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_limit=dt_limit, initial_states=initial_states,
                 seq_idx=seq_idx, chunk_size=chunk_size)
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    if C.dtype != x.dtype:
        C = C.to(x.dtype)
    if initial_states is not None:
        initial_states = initial_states.contiguous()
    Q = kernel_chunk(chunk_size)
    y, fin = _SSDTriton.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                              tuple(dt_limit), Q)
    return (y, fin) if return_final_states else y


def ssd_step_triton(state: Tensor, x: Tensor, dt: Tensor, A: Tensor | None, B: Tensor, C: Tensor, *,
                    D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                    dt_softplus: bool = True, dt_limit: tuple[float, float] = (0.0, math.inf),
                    active: Tensor | None = None, state_indices: Tensor | None = None,
                    A_log: Tensor | None = None) -> Tensor:
    """:func:`mamba2.ssd.step.ssd_step_torch` as one kernel: in-place fp32 state update, y in x's dtype; with
    ``state_indices`` the kernel reads and writes the pool rows directly (no gather); ``A_log`` instead of A is
    turned into A = -exp(A_log) inside the kernel."""
    A_arg = step_A(A, A_log)
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    check_step_inputs(state, x, dt, A_arg, B, C, active=active, state_indices=state_indices)
    y = torch.empty(b, h, p, device=x.device, dtype=x.dtype)
    clamp, lo, hi = _clamp_args(dt_limit)
    c = TUNING["step"]
    BP = min(c.pop("BP"), _p2(p, 1))
    act = active.to(torch.int8) if active is not None else dt
    zz = z if z is not None else x
    K.step_kernel[(triton.cdiv(p, BP), h, b)](
        state, x, dt, A_arg, B, C, D if D is not None else A_arg, zz, dt_bias if dt_bias is not None else A_arg, act,
        state_indices if state_indices is not None else dt, y,
        h, p, n, h // g, lo, hi, *state.stride(), *x.stride(), *dt.stride(), *B.stride(), *C.stride(),
        *zz.stride(), *y.stride(), BP=BP, BN=_p2(n, 1), HAS_D=D is not None,
        D_PER_CH=D is not None and D.numel() == h * p, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=dt_softplus, CLAMP=clamp, HAS_ACT=active is not None, HAS_IDX=state_indices is not None,
        A_IS_LOG=A is None, **c)
    return y


def varlen_states_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, cu_seqlens: Tensor, *,
                         dt_bias: Tensor | None = None, dt_softplus: bool = True,
                         dt_limit: tuple[float, float] = (0.0, math.inf),
                         initial_states: Tensor | None = None) -> Tensor:
    """:func:`mamba2.ssd.varlen.varlen_final_states` as one kernel launch (forward only: autograd runs the torch
    code). x (1, T, h, p), dt (1, T, h), A (h,), B (1, T, g, n), cu_seqlens (K + 1,) int64 on x's device, already
    checked. Returns (K, h, p, n) fp32."""
    _, T, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    ndocs = cu_seqlens.numel() - 1
    out = torch.empty(ndocs, h, p, n, device=x.device, dtype=torch.float32)
    if B.dtype != x.dtype:
        B = B.to(x.dtype)
    init = initial_states.contiguous() if initial_states is not None else out
    clamp, lo, hi = _clamp_args(dt_limit)
    c = TUNING["varlen_states"]
    BK, BP, BN = c.pop("BK"), min(c.pop("BP"), _p2(p)), min(c.pop("BN"), _p2(n))
    BP, BN = _split_sweep(BP, BN, p, n, ndocs * h)
    grid = (h, triton.cdiv(p, BP) * triton.cdiv(n, BN), ndocs)
    K.varlen_states_kernel[grid](
        x, dt, A, dt_bias if dt_bias is not None else A, B, init, cu_seqlens, out, h, p, n, h // g, lo, hi,
        x.stride(1), x.stride(2), x.stride(3), dt.stride(1), dt.stride(2), B.stride(1), B.stride(2), B.stride(3),
        BK=BK, BP=BP, BN=BN, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, CLAMP=clamp,
        HAS_INIT=initial_states is not None, **c, FP32_DOTS=_fp32_dots(x))
    return out
