"""Triton causal conv1d kernels (mamba2/layers/triton/conv.py) under TRITON_INTERPRET=1 on CPU, against the torch
code in float64 on the same (rounded) inputs (docs/design.md §4; §5: 5, 6, 8, 11): outputs, new_state and every
gradient (x, weight, bias, conv_state); channels not a power of two and smaller / larger than one block, L = 1
(the decode update) with and without a state, L < d_conv - 1, L not a multiple of the time block, d_conv 2/3/4/8,
packed documents (a boundary inside the first d_conv - 1 tokens, documents shorter than d_conv), bias None,
activation None / silu, non-contiguous x (a slice of a wider buffer), bf16 and fp16. Also CausalConv1d with
kernels("on") against kernels("off"), and the Mamba-2 / Mamba-1 mixers (training and decode) with the kernels.

TRITON_INTERPRET must be set before Triton is imported, so every interpreted run happens in ONE subprocess
(this file run as a script) that prints the relative errors as JSON; the tests below only read them.

On a GPU machine the same cases run compiled, with the same budgets: ``MAMBA2_TEST_DEVICE=cuda python -m pytest
tests/test_triton_conv.py``; ``MAMBA2_TEST_BIG=1`` adds a case past 2³¹ elements (docs/design.md §5.17, ~25 GB).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
F32, HALF = 1e-3, 2e-2
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")

# name: (batch, L, channels, d_conv, options). Options: state (conv_state given), state_grad (default: state),
# seq (document lengths per row), no_bias, act, noncontig, dtype, w_fp32 (fp32 weight/bias with half x),
# no_dnew (new_state unused by the loss), cfg (launch-block overrides per TUNING entry).
SMALL = {"fwd": dict(BT=8, BC=16), "bwd": dict(BT=8, BC=16, TILES=2), "update": dict(BC=16)}
CASES = {
    # channels larger than one block (40 = 16 + 16 + 8), L = 29 not a multiple of the time block (8, 2 per program)
    "ch40_L29_blocks_state_silu": (2, 29, 40, 4, dict(state=True, act="silu", cfg=SMALL)),
    # channels smaller than one block and not a power of two, default launch blocks, no state, no bias
    "ch13_L17_nobias_noact": (2, 17, 13, 4, dict(no_bias=True)),
    "update_L1_state_silu": (3, 1, 24, 4, dict(state=True, act="silu", cfg=SMALL)),
    "update_L1_nostate": (2, 1, 24, 4, dict()),
    "update_L1_state_nograd_nodnew": (2, 1, 13, 4, dict(state=True, state_grad=False, no_dnew=True, act="silu")),
    # L < d_conv - 1: the new state mixes the old state and x
    "L2_lt_K-1_state": (2, 2, 12, 4, dict(state=True, act="silu")),
    "K2_seq_L23": (2, 23, 20, 2, dict(seq=[[5, 1, 9, 8], [23]], act="silu",
                                      cfg={"fwd": dict(BT=4, BC=8), "bwd": dict(BT=4, BC=8, TILES=3)})),
    "K3_seq_state": (2, 19, 20, 3, dict(state=True, seq=[[2, 17], [1, 1, 17]], cfg=SMALL)),
    # boundaries at t = 1 and t = 2 (inside the first d_conv - 1 tokens: the state must stop at them),
    # documents shorter than d_conv
    "K4_seq_first_boundary_state": (2, 19, 20, 4, dict(state=True, seq=[[1, 1, 3, 2, 12], [2, 5, 12]],
                                                       act="silu", cfg=SMALL)),
    "K8_seq_state_L12": (2, 12, 20, 8, dict(state=True, seq=[[3, 9], [12]], act="silu", cfg=SMALL)),
    # x a slice of a wider buffer (the mixer's xBC), weight and state with odd strides too
    "noncontig_seq_state_silu": (2, 21, 20, 4, dict(noncontig=True, state=True, seq=[[4, 17], [10, 11]],
                                                    act="silu", cfg=SMALL)),
    "bf16_seq_state_silu": (2, 29, 40, 4, dict(dtype="bf16", state=True, seq=[[2, 20, 7], [29]], act="silu",
                                               cfg=SMALL)),
    "fp16_x_fp32_weight_state": (2, 17, 24, 4, dict(dtype="fp16", w_fp32=True, state=True, cfg=SMALL)),
    # K < KW (3 taps in a tile of 4), packed documents, several channel and time blocks, one warp
    "K3_seq_state_ch40": (2, 29, 40, 3, dict(state=True, seq=[[2, 17, 10], [1, 1, 27]], act="silu",
                                             cfg={**SMALL, "bwd": dict(BT=8, BC=16, TILES=2, num_warps=1)})),
}


def _lengths_to_seq_idx(lengths):
    import torch
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths]
    return torch.stack(rows).to(torch.int32)


def _case(name, spec):
    import torch
    from conftest import rel_err as _rel
    from mamba2 import kernels as TL
    from mamba2.layers.conv_ref import causal_conv1d_torch

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())
    from mamba2.layers.triton import conv as TC

    b, L, ch, K, o = spec
    dev = DEVICE
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.get("dtype"), torch.float32)
    wdtype = torch.float32 if o.get("w_fp32") else dtype
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    vals = dict(x=r(b, L, ch).to(dtype), weight=(r(ch, K) * 0.5).to(wdtype),
                bias=None if o.get("no_bias") else (r(ch) * 0.5).to(wdtype),
                conv_state=r(b, K - 1, ch).to(dtype) if o.get("state") else None)
    grad = dict(x=True, weight=True, bias=True, conv_state=o.get("state_grad", True))
    seq_idx = _lengths_to_seq_idx(o["seq"]) if "seq" in o else None
    act = o.get("act")

    ref = {k: (v.double().requires_grad_(grad[k]) if v is not None else None) for k, v in vals.items()}
    y_ref, n_ref = causal_conv1d_torch(ref["x"], ref["weight"], ref["bias"], seq_idx=seq_idx,
                                       conv_state=ref["conv_state"], activation=act)
    gy = r(*y_ref.shape)
    gn = r(*n_ref.shape)
    loss = (y_ref * gy).sum() + (0 if o.get("no_dnew") else (n_ref * gn).sum())
    loss.backward()

    tin = {k: (v.clone().to(dev).requires_grad_(grad[k]) if v is not None else None) for k, v in vals.items()}
    if o.get("noncontig"):
        wide = torch.randn(b, L, 3 * ch, dtype=dtype)                # x = wide[..., ch:2ch], as the mixer's split
        wide[..., ch:2 * ch] = vals["x"]
        wide = wide.to(dev)
        xv = wide.requires_grad_(True)[..., ch:2 * ch]
        wbuf = torch.randn(K, 2 * ch, dtype=wdtype)                 # weight with strides (1, 2·ch)
        wbuf[:, ::2] = vals["weight"].t()
        wbuf = wbuf.to(dev)
        wv = wbuf.requires_grad_(True)[:, ::2].t()
        sbuf = torch.randn(b, ch, K - 1, dtype=dtype)               # state with channel stride K-1
        sbuf.copy_(vals["conv_state"].transpose(1, 2))
        sbuf = sbuf.to(dev)
        sv = sbuf.requires_grad_(True).transpose(1, 2)
        assert not (xv.is_contiguous() or wv.is_contiguous() or sv.is_contiguous())
        leaves = dict(x=wide, weight=wbuf, conv_state=sbuf)
        args = dict(x=xv, weight=wv, bias=tin["bias"], conv_state=sv)
    else:
        leaves, args = {}, tin
    with TC.TUNING.tuned(**o.get("cfg", {})), TL.kernels("on"):
        y, n = TC.causal_conv1d(args["x"], args["weight"], args["bias"],
                                seq_idx=seq_idx.to(dev) if seq_idx is not None else None,
                                conv_state=args["conv_state"], activation=act)
        loss = (y * gy.to(dev, dtype)).sum() + (0 if o.get("no_dnew") else (n * gn.to(dev, dtype)).sum())
        loss.backward()
    errs = {"y": rel_err(y, y_ref), "new_state": rel_err(n, n_ref),
            "dtypes_ok": float(y.dtype == dtype and n.dtype == dtype and y.shape == (b, L, ch)
                               and n.shape == (b, K - 1, ch))}
    for k, v in ref.items():
        if v is None:
            continue
        if not grad[k]:
            errs["d" + k] = 0.0 if v.grad is None and tin[k].grad is None else math.inf
            continue
        if k in leaves:   # the gradient reached the wide buffer, at the view's place only
            g = leaves[k].grad
            got = {"x": lambda: g[..., ch:2 * ch], "weight": lambda: g[:, ::2].t(),
                   "conv_state": lambda: g.transpose(1, 2)}[k]()
            clean = k != "x" or (g[..., :ch].abs().max() == 0 and g[..., 2 * ch:].abs().max() == 0)
            errs["d" + k] = rel_err(got, v.grad) if clean else math.inf
        else:
            errs["d" + k] = rel_err(tin[k].grad, v.grad) if tin[k].grad is not None else math.inf
    return errs


def _module_on_off():
    """CausalConv1d under kernels("on") equals kernels("off") (fp32); fp64 silently stays on the torch code."""
    import torch
    from conftest import rel_err
    from mamba2.layers import CausalConv1d
    from mamba2 import kernels as TL

    torch.manual_seed(3)
    out = {}
    dev = DEVICE
    conv = CausalConv1d(20, 4).to(dev)
    with torch.no_grad():
        conv.bias.normal_()
    xw = torch.randn(2, 15, 45, device=dev)
    seq = _lengths_to_seq_idx([[3, 12], [15]]).to(dev)
    st = torch.randn(2, 3, 20, device=dev)
    gy, gs = torch.randn(2, 15, 20, device=dev), torch.randn(2, 3, 20, device=dev)
    res = {}
    for mode in ("off", "on"):
        conv.zero_grad()
        x = xw[..., 5:25].clone().requires_grad_(True)
        s = st.clone().requires_grad_(True)
        with TL.kernels(mode):
            y, n = conv(x, seq_idx=seq, conv_state=s, activation="silu")
        ((y * gy).sum() + (n * gs).sum()).backward()
        res[mode] = (y, n, x.grad, s.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    for key, a, c in zip(("y", "new_state", "dx", "dconv_state", "dweight", "dbias"), res["on"], res["off"]):
        out[key] = rel_err(a, c)
    conv64 = CausalConv1d(20, 4).double().to(dev)
    x64 = torch.randn(2, 6, 20, dtype=torch.float64, device=dev)
    with TL.kernels("on"):
        y_on, _ = conv64(x64, activation="silu")
    with TL.kernels("off"):
        y_off, _ = conv64(x64, activation="silu")
    out["fp64_torch_path_exact"] = float(torch.equal(y_on, y_off))
    return out


def _mixers():
    """Mamba-2 and Mamba-1 mixers in fp32 with the kernels on and off, each against the same mixer in float64 (the
    torch code): forward and every parameter gradient, and prefill + token-by-token decode with the kernels
    against the float64 full forward."""
    import copy

    import torch
    from conftest import rel_err
    from mamba2.config import Mamba2Config
    from mamba2.layers import Mamba1Mixer, Mamba2Mixer
    from mamba2 import kernels as TL

    out = {}
    torch.manual_seed(5)
    cfgs = {"mamba2": (Mamba2Mixer, Mamba2Config(d_model=16, n_layer=1, vocab_size=64, d_state=16, headdim=8,
                                                 chunk_size=16)),
            "mamba1": (Mamba1Mixer, Mamba2Config(d_model=16, n_layer=1, vocab_size=64, layout="mamba1", d_state=4,
                                                 dt_rank=3))}
    for name, (cls, c) in cfgs.items():
        dev = DEVICE
        m = cls(c)
        with torch.no_grad():
            m.conv1d.bias.normal_()
        m64 = copy.deepcopy(m).double().to(dev)
        m = m.to(dev)
        u = torch.randn(2, 13, 16, device=dev)
        seq = _lengths_to_seq_idx([[2, 11], [13]]).to(dev)
        g = torch.randn(2, 13, 16, device=dev)
        u64 = u.double().requires_grad_(True)
        y64 = m64(u64, seq_idx=seq)
        (y64 * g.double()).sum().backward()
        ref = [y64, u64.grad] + [p.grad for p in m64.parameters()]
        for mode in ("off", "on"):
            m.zero_grad()
            uu = u.clone().requires_grad_(True)
            with TL.kernels(mode):
                y = m(uu, seq_idx=seq)
            (y * g).sum().backward()
            got = [y, uu.grad] + [p.grad for p in m.parameters()]
            out[f"{name}_train_{mode}"] = max(rel_err(a, b) for a, b in zip(got, ref))
        with torch.no_grad():   # decode: prefill 5 tokens, then 3 single steps, against the full forward
            full = m64(u[:, :8].double())
            state = m.empty_state(2, device=dev, dtype=torch.float32)
            with TL.kernels("on"):
                parts = [m(u[:, :5], state=state)] + [m(u[:, t:t + 1], state=state) for t in range(5, 8)]
        out[f"{name}_decode_on"] = rel_err(torch.cat(parts, 1), full)
    return out


def _big_case():
    """docs/design.md §5.17 on a GPU: one row of 2^20 tokens × 2176 channels (2.3e9 elements, bf16, past 2^31): y,
    new_state and dx at the first and last tokens against the torch code on those windows (the conv is local: the outputs
    and input gradients of a window depend only on it and the d_conv - 1 inputs before it)."""
    import torch
    from conftest import rel_err
    from mamba2.layers.conv_ref import causal_conv1d_torch
    from mamba2.layers.triton.conv import causal_conv1d

    L, ch, K, T = 1 << 20, 2176, 4, 64
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(1, L, ch, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    w = torch.randn(ch, K, device=DEVICE, generator=gen).requires_grad_(True)
    bias = torch.randn(ch, device=DEVICE, generator=gen).requires_grad_(True)
    y, n = causal_conv1d(x, w, bias, activation="silu")
    dy = torch.randn(y.shape, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    y.backward(dy)
    out = {}
    for where, sl in (("head", slice(0, T)), ("tail", slice(L - T, L))):
        lo = max(sl.start - (K - 1), 0)
        xw = x.detach()[:, lo:sl.stop].double().requires_grad_(True)
        st = xw[:, :sl.start - lo]
        st = torch.cat([xw.new_zeros(1, K - 1 - st.shape[1], ch), st], 1)
        yr, nr = causal_conv1d_torch(xw[:, sl.start - lo:], w.detach().double(), bias.detach().double(),
                                     conv_state=st, activation="silu")
        (yr * dy[:, sl].double()).sum().backward()
        out[f"y_{where}"] = rel_err(y[:, sl], yr)
        out[f"dx_{where}"] = rel_err(x.grad[:, sl], xw.grad[:, sl.start - lo:])
        if where == "tail":
            out["new_state"] = rel_err(n, nr)
    return out


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(2)
    from conftest import print_script_results
    big = {"big": _big_case} if os.environ.get("MAMBA2_TEST_BIG") == "1" else {}
    print_script_results(conv={name: functools.partial(_case, name, spec) for name, spec in CASES.items()},
                         module=_module_on_off, mixers=_mixers, **big)


@pytest.mark.parametrize("name", list(CASES))
def test_conv_outputs_state_and_every_gradient(kernel_results, name):
    errs = dict(kernel_results["conv"][name])
    assert "error" not in errs, errs
    assert errs.pop("dtypes_ok") == 1.0, name
    budget = HALF if CASES[name][4].get("dtype") in ("bf16", "fp16") else F32
    bad = {k: v for k, v in errs.items() if not v <= budget}
    assert not bad, f"{name}: over budget {budget}: {bad} (all: {errs})"
    expected = {"y", "new_state", "dx", "dweight"} | ({"dconv_state"} if CASES[name][4].get("state") else set())
    assert expected <= set(errs)


def test_module_kernels_on_equals_off(kernel_results):
    res = dict(kernel_results["module"])
    assert "error" not in res, res
    assert res.pop("fp64_torch_path_exact") == 1.0
    bad = {k: v for k, v in res.items() if not v <= 1e-5}
    assert not bad, res


def test_mixers_with_conv_kernels(kernel_results):
    res = kernel_results["mixers"]
    assert "error" not in res, res
    bad = {k: v for k, v in res.items() if not v <= F32}
    assert not bad, res


def test_argument_errors_name_the_constraint():
    import torch
    from mamba2.layers.triton.conv import causal_conv1d

    x, w = torch.randn(2, 5, 6), torch.randn(6, 4)
    bad = [
        (dict(x=x.double(), weight=w.double()), "float64"),
        (dict(x=x[:, :0], weight=w), "L >= 1"),
        (dict(x=x, weight=torch.randn(7, 4)), "expects 7 channels"),
        (dict(x=x, weight=w, bias=torch.randn(5)), "bias must be"),
        (dict(x=x, weight=w, conv_state=torch.randn(2, 4, 6)), r"conv_state must be \(2, 3, 6\)"),
        (dict(x=x, weight=w, seq_idx=torch.zeros(2, 4, dtype=torch.int64)), r"seq_idx must be \(2, 5\)"),
        (dict(x=x, weight=w, seq_idx=torch.zeros(2, 5)), "integer"),
        (dict(x=x, weight=w, activation="gelu"), "activation must be one of"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            causal_conv1d(kw.pop("x"), kw.pop("weight"), **kw)


if __name__ == "__main__":
    _main()
