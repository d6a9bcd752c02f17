"""Kernel index arithmetic past 2³¹ elements, forward and backward (docs/design.md §5.17; issue 11, item 3).

Each check runs one kernel family on tensors whose element offsets pass 2³¹ — inputs that are strided slices of
wider buffers, as the mixers pass them (zxbcdt → xBC → x, B, C; xz → x, z), so the offsets are row × stride —
and compares against the same call on pieces whose offsets stay small (a long sequence cut at chunk boundaries,
the pieces chained through their final states / conv windows with autograd flowing through; rows of a norm; the
gathered rows of a decode pool). An offset that wraps in 32 bits garbles everything past it, far beyond the bf16
budget. Families: the SSD (chunked scan and its backward), the Mamba-1 selective scan, the causal conv (strided,
with state), the grouped gated norm, the SSD decode step and conv update on a pool of state rows.

On a GPU: ``MAMBA2_TEST_DEVICE=cuda MAMBA2_TEST_BIG=1 python -m pytest tests/test_big_offsets.py`` (the kernels
compiled and required: ``kernels("on")``; up to ≈ 90 GB of GPU memory for the largest check, one check at a
time: an H200, not an 80 GB card). Without those variables the same checks run at small sizes through the torch
code on the CPU: that keeps the test's own arithmetic (pieces, chaining, gathering) checked in CI, so what the GPU
run adds is the kernels' offsets. Not covered: C·Bᵀ (b·nc·g·Q² elements) stays below 2³¹ unless a row holds
more than 8M tokens.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import rel_err
from mamba2.kernels import kernels

DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
BIG = DEVICE == "cuda" and os.environ.get("MAMBA2_TEST_BIG") == "1"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float64        # activations
PDTYPE = torch.float32 if DEVICE == "cuda" else torch.float64       # parameters and states
BUDGET = 2e-2 if DTYPE == torch.bfloat16 else 1e-9      # pieces vs whole: the same code, cut differently
MODE = "on" if DEVICE == "cuda" else "off"                 # on a GPU a silent fall-back to torch code would fail
PIECES = 4
LIMIT = 2 ** 31

# Sizes: past 2³¹ elements where BIG (each named tensor's offsets pass it), tiny on the CPU.
# SSD: chunk 64 so that the chunk states (and their gradients) pass 2³¹ too; conv: two rows, so that the batch
# stride term passes it as well as the token one.
SSD = dict(L=2 ** 20 + 2 ** 14, H=32, P=64, N=128, Q=64) if BIG else dict(L=4 * 48, H=4, P=8, N=8, Q=16)
SCAN = dict(L=2 ** 20 + 2 ** 15, d=2048, N=16) if BIG else dict(L=4 * 20, d=12, N=4)
CONV = (dict(b=2, L=2 ** 18, width=10_576, off=5120, ch=5376, K=4) if BIG
        else dict(b=2, L=4 * 16, width=40, off=12, ch=24, K=4))
NORM = dict(R=900_000, d=2560, gs=2560) if BIG else dict(R=4 * 9, d=48, gs=24)
POOL = dict(S=3300, H=80, P=64, N=128, conv_S=140_000, ch=5376, K=4) if BIG else dict(S=9, H=4, P=8, N=8,
                                                                                      conv_S=11, ch=24, K=4)

pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not BIG, reason="the GPU sizes need MAMBA2_TEST_BIG=1 (≈60 GB)")


def _randn(*shape, scale=1.0, gen, dtype=DTYPE):
    return (torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32) * scale).to(dtype)


def _piece_errors(a: torch.Tensor, b: torch.Tensor, dim: int = 1) -> float:
    """The largest relative error over 16 slices along ``dim`` (so a wrong tail is not averaged away, and no slice
    needs a float64 copy of a whole big tensor)."""
    return max(rel_err(x, y) for x, y in zip(a.chunk(16, dim), b.chunk(16, dim)))


def _pieces(n: int) -> list[tuple[int, int]]:
    """(lo, hi) of PIECES consecutive pieces of n (the last takes the remainder)."""
    step = n // PIECES
    return [(i * step, (i + 1) * step if i < PIECES - 1 else n) for i in range(PIECES)]


def _chained_errors(L: int, step, leaves, gy, gfin, grad_names) -> dict[str, float]:
    """Relative errors of the pieces, chained through their states, against one call over all L tokens.
    ``step(lo, hi, state) -> (y, state)`` runs tokens lo..hi from ``state`` (None at 0); the loss is
    <y, gy> + <final state, gfin>; the gradients w.r.t. ``leaves`` are compared under ``grad_names``."""
    def run(bounds):
        state, ys = None, []
        for lo, hi in bounds:
            with kernels(MODE):
                y, state = step(lo, hi, state)
            ys.append(y)
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        with kernels(MODE):
            grads = torch.autograd.grad([y, state], leaves, [gy, gfin])
        return y.detach(), state.detach(), grads

    whole, pieces = run([(0, L)]), run(_pieces(L))
    errs = {"y": _piece_errors(whole[0], pieces[0]), "final_state": rel_err(whole[1], pieces[1])}
    for name, a, b in zip(grad_names, whole[2], pieces[2]):
        errs[name] = _piece_errors(a, b) if a.dim() == 3 else rel_err(a, b)
    return errs


def _cleanup():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def test_ssd_past_2_31_forward_and_backward():
    from mamba2.ssd import ssd

    L, H, P, N, Q = (SSD[k] for k in ("L", "H", "P", "N", "Q"))
    G = 1
    gen = torch.Generator(DEVICE).manual_seed(0)
    W = H * P + 2 * G * N
    if BIG:
        assert L * W > LIMIT and L * H * P > LIMIT and (L // Q + 1) * H * P * N > LIMIT
    xbc = _randn(1, L, W, gen=gen).requires_grad_(True)           # the conv output xBC of a mixer
    dtbuf = _randn(1, L, H + 8, gen=gen).requires_grad_(True)     # dt as a slice of a wider buffer
    A = (-0.5 - _randn(H, gen=gen, dtype=PDTYPE).abs()).requires_grad_(True)
    D = _randn(H, gen=gen, dtype=PDTYPE).requires_grad_(True)
    dt_bias = (_randn(H, scale=0.5, gen=gen, dtype=PDTYPE) - 2).requires_grad_(True)
    gy = _randn(1, L, H, P, gen=gen)
    gfin = _randn(1, H, P, N, gen=gen, dtype=PDTYPE)
    leaves = (xbc, dtbuf, A, D, dt_bias)

    def parts(lo, hi):
        x = xbc[:, lo:hi, :H * P].view(1, hi - lo, H, P)
        B = xbc[:, lo:hi, H * P:H * P + G * N].view(1, hi - lo, G, N)
        C = xbc[:, lo:hi, H * P + G * N:].view(1, hi - lo, G, N)
        return x, dtbuf[:, lo:hi, :H], B, C

    def step(lo, hi, init):
        x, dt, B, C = parts(lo, hi)
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_states=init, chunk_size=Q,
                   return_final_states=True)

    assert (L // PIECES) % Q == 0                   # pieces start at chunk boundaries
    errs = _chained_errors(L, step, leaves, gy, gfin, ("dxBC", "ddt", "dA", "dD", "ddt_bias"))
    _cleanup()
    assert all(v <= BUDGET for v in errs.values()), errs


def test_selective_scan_past_2_31_forward_and_backward():
    from mamba2.layers.selective_scan import selective_scan

    L, d, N = SCAN["L"], SCAN["d"], SCAN["N"]
    gen = torch.Generator(DEVICE).manual_seed(1)
    if BIG:
        assert L * d > LIMIT
    xz = _randn(1, L, 2 * d, gen=gen).requires_grad_(True)         # in_proj output: x and the gate z
    delta = _randn(1, L, d, scale=0.5, gen=gen).requires_grad_(True)
    bc = _randn(1, L, 2 * N + 8, gen=gen).requires_grad_(True)    # x_proj output: dt rank, B, C
    A = (-0.5 - _randn(d, N, gen=gen, dtype=PDTYPE).abs()).requires_grad_(True)
    D = _randn(d, gen=gen, dtype=PDTYPE).requires_grad_(True)
    bias = (_randn(d, scale=0.5, gen=gen, dtype=PDTYPE) - 1).requires_grad_(True)
    gy = _randn(1, L, d, gen=gen)
    gfin = _randn(1, d, N, gen=gen, dtype=PDTYPE)
    leaves = (xz, delta, bc, A, D, bias)

    def step(lo, hi, state):
        return selective_scan(xz[:, lo:hi, :d], delta[:, lo:hi], A, bc[:, lo:hi, 8:8 + N], bc[:, lo:hi, 8 + N:],
                              D=D, z=xz[:, lo:hi, d:], delta_bias=bias, delta_softplus=True, initial_state=state,
                              return_final_state=True)

    errs = _chained_errors(L, step, leaves, gy, gfin, ("dxz", "ddelta", "dBC", "dA", "dD", "ddelta_bias"))
    _cleanup()
    assert all(v <= BUDGET for v in errs.values()), errs


def test_causal_conv_strided_past_2_31_forward_and_backward():
    from mamba2.layers.conv import CausalConv1d

    b, L, width, off, ch, K = (CONV[k] for k in ("b", "L", "width", "off", "ch", "K"))
    if BIG:
        assert L * width > LIMIT and b * L * ch > LIMIT
    gen = torch.Generator(DEVICE).manual_seed(2)
    conv = CausalConv1d(ch, K).to(DEVICE, PDTYPE)
    buf = _randn(b, L, width, gen=gen).requires_grad_(True)      # zxbcdt; xBC = buf[..., off:off + ch]
    gy = _randn(b, L, ch, gen=gen)
    leaves = (buf, conv.weight, conv.bias)

    def run(bounds):
        ys = []
        for lo, hi in bounds:
            state = None if lo == 0 else buf[:, lo - (K - 1):lo, off:off + ch]
            with kernels(MODE):
                ys.append(conv(buf[:, lo:hi, off:off + ch], conv_state=state, activation="silu")[0])
        y = torch.cat(ys, 1) if len(ys) > 1 else ys[0]
        with kernels(MODE):
            return y.detach(), torch.autograd.grad(y, leaves, gy)

    whole = run([(0, L)])
    pieces = run(_pieces(L))
    errs = {"y": _piece_errors(whole[0], pieces[0]), "dx": _piece_errors(whole[1][0], pieces[1][0]),
            "dweight": rel_err(whole[1][1], pieces[1][1]), "dbias": rel_err(whole[1][2], pieces[1][2])}
    del whole, pieces
    _cleanup()
    assert all(v <= BUDGET for v in errs.values()), errs


def test_gated_norm_past_2_31_forward_and_backward():
    from mamba2.layers.norm import GatedRMSNorm

    R, d, gs = NORM["R"], NORM["d"], NORM["gs"]
    if BIG:
        assert R * d > LIMIT
    gen = torch.Generator(DEVICE).manual_seed(3)
    norm = GatedRMSNorm(d, gs).to(DEVICE, PDTYPE)
    with torch.no_grad():
        norm.weight.add_(_randn(d, scale=0.3, gen=gen, dtype=PDTYPE))
    y = _randn(R, d, gen=gen).requires_grad_(True)
    zbuf = _randn(R, 2 * d, gen=gen).requires_grad_(True)          # z as a slice of a wider buffer
    g = _randn(R, d, gen=gen)
    leaves = (y, zbuf, norm.weight)

    def run(bounds):
        with kernels(MODE):
            outs = [norm(y[lo:hi], zbuf[lo:hi, d:]) for lo, hi in bounds]
            out = torch.cat(outs, 0) if len(outs) > 1 else outs[0]
            return out.detach(), torch.autograd.grad(out, leaves, g)

    whole = run([(0, R)])
    pieces = run(_pieces(R))
    errs = {"out": _piece_errors(whole[0], pieces[0], 0), "dy": _piece_errors(whole[1][0], pieces[1][0], 0),
            "dz": _piece_errors(whole[1][1], pieces[1][1], 0), "dweight": rel_err(whole[1][2], pieces[1][2])}
    del whole, pieces
    _cleanup()
    assert all(v <= BUDGET for v in errs.values()), errs


def test_decode_pools_past_2_31():
    """The SSD decode step and the conv update on the last rows of pools larger than 2³¹ elements, against the
    same step on copies of those rows."""
    from mamba2.layers.conv_ref import conv_update_torch
    from mamba2.ssd import ssd_step

    S, H, P, N = POOL["S"], POOL["H"], POOL["P"], POOL["N"]
    cS, ch, K = POOL["conv_S"], POOL["ch"], POOL["K"]
    if BIG:
        assert S * H * P * N > LIMIT and cS * (K - 1) * ch > LIMIT
    gen = torch.Generator(DEVICE).manual_seed(4)
    rows = torch.tensor([0, 1, S - 2, S - 1], device=DEVICE)
    pool = _randn(S, H, P, N, gen=gen, dtype=PDTYPE)
    x, z = _randn(4, H, P, gen=gen), _randn(4, H, P, gen=gen)
    dt = _randn(4, H, gen=gen)
    B, C = _randn(4, 1, N, gen=gen), _randn(4, 1, N, gen=gen)
    A_log, D, dt_bias = (_randn(H, gen=gen, dtype=PDTYPE) for _ in range(3))
    before = pool[rows].clone()
    with kernels(MODE):
        y = ssd_step(pool, x, dt, None, B, C, D=D, z=z, dt_bias=dt_bias, state_indices=rows, A_log=A_log)
    ref_state = before.clone()
    y_ref = ssd_step(ref_state, x, dt, -torch.exp(A_log), B, C, D=D, z=z, dt_bias=dt_bias, backend="chunked")
    errs = {"ssd_step_y": rel_err(y, y_ref), "ssd_step_rows": rel_err(pool[rows], ref_state)}
    del pool
    _cleanup()

    cpool = _randn(cS, K - 1, ch, gen=gen)
    crow = torch.tensor([0, cS // 2, cS - 1], device=DEVICE)
    xt = _randn(3, ch, gen=gen)
    w, bias = _randn(ch, K, gen=gen), _randn(ch, gen=gen)
    cbefore = cpool[crow].clone()
    if DEVICE == "cuda":
        from mamba2.layers.triton.conv import conv_update
        yc = conv_update(xt, cpool, w, bias, crow, activation="silu")
    else:
        yc = conv_update_torch(xt, cpool, w, bias, crow, activation="silu")
    ref_pool = cbefore.clone()
    yc_ref = conv_update_torch(xt, ref_pool, w, bias, torch.arange(3, device=DEVICE), activation="silu")
    errs.update(conv_update_y=rel_err(yc, yc_ref), conv_update_rows=rel_err(cpool[crow], ref_pool))
    del cpool
    _cleanup()
    assert all(v <= BUDGET for v in errs.values()), errs
