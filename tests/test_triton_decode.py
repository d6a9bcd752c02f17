"""The decode-step kernels of a slot pool (docs/design.md §7.1) under TRITON_INTERPRET=1 on CPU (compiled with
``MAMBA2_TEST_DEVICE=cuda``), against the torch code on the same inputs: the conv update of pool rows (d_conv
4 and 2, with and without bias and SiLU, a non-contiguous input, rows other than the named ones byte-identical),
the fused residual add + RMSNorm (with and without the add, fp32 residual with bf16 output), and a whole model's
``decode_step`` with the kernels "on" against "off" (fp32 and bf16, ngroups 1 and 2, a d_ssm < d_inner layer,
projection biases) over several steps, the other pool rows untouched; and the packed-prefill state kernel (one
state per document) against its torch code, alone, through ``ssd(cu_seqlens=…)`` and in a whole packed prefill.

Every interpreted run happens in one subprocess (this file run as a script) that prints the errors as JSON.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
F32, BF16 = 1e-5, 2e-2


def _conv_cases(torch, rel_err):
    from mamba2.layers.conv_ref import conv_update_torch
    from mamba2.layers.triton.conv import conv_update

    out = {}
    for name, (K, bias, act, noncontig) in {"k4_bias_silu": (4, True, "silu", False),
                                            "k2_nobias": (2, False, None, False),
                                            "k4_noncontig": (4, True, "silu", True)}.items():
        gen = torch.Generator().manual_seed(K)
        S, b, ch = 6, 3, 40
        pool = torch.randn(S, K - 1, ch, generator=gen)
        w, bb = torch.randn(ch, K, generator=gen), torch.randn(ch, generator=gen) if bias else None
        idx = torch.tensor([4, 0, 2])
        wide = torch.randn(b, 2 * ch, generator=gen)
        x = wide[:, ::2] if noncontig else wide[:, :ch].contiguous()
        p_ref, p_tri = pool.clone(), pool.clone().to(DEVICE)
        errs, same = [], True
        for _ in range(3):
            y_ref = conv_update_torch(x, p_ref, w, bb, idx, activation=act)
            y_tri = conv_update(x.to(DEVICE), p_tri, w.to(DEVICE), None if bb is None else bb.to(DEVICE),
                                idx.to(DEVICE), activation=act)
            errs.append(max(rel_err(y_tri.cpu(), y_ref), rel_err(p_tri.cpu(), p_ref)))
        same = bool(torch.equal(p_tri.cpu()[[1, 3, 5]], pool[[1, 3, 5]]))
        out[name] = {"err": max(errs), "others_identical": same}
    return out


def _norm_cases(torch, rel_err):
    from mamba2.layers.norm import RMSNorm
    from mamba2.layers.triton.norm import add_rms_norm

    out = {}
    gen = torch.Generator().manual_seed(0)
    for name, (d, with_x, out_dtype) in {"add_fp32": (48, True, torch.float32),
                                         "add_bf16_out": (100, True, torch.bfloat16),
                                         "no_add": (48, False, torch.float32),
                                         "strided_weight": (48, True, torch.float32)}.items():
        norm = RMSNorm(d)
        with torch.no_grad():
            norm.weight.normal_(generator=gen)
        if name == "strided_weight":          # a view, as load_state_dict(assign=True) can leave it
            norm.weight = torch.nn.Parameter(torch.randn(2 * d, generator=gen)[::2], requires_grad=False)
        r = torch.randn(5, d, generator=gen)
        x = torch.randn(5, d, generator=gen).to(torch.bfloat16) if with_x else None
        with torch.no_grad():
            ref_out, ref_res = norm.add_forward(x, r, out_dtype)      # on CPU: the torch code
            o, res = add_rms_norm(None if x is None else x.to(DEVICE), r.to(DEVICE), norm.weight.to(DEVICE),
                                  eps=norm.eps, out_dtype=out_dtype)
        out[name] = {"out": rel_err(o.cpu().float(), ref_out.float()), "residual": rel_err(res.cpu(), ref_res),
                     "dtype_ok": o.dtype == out_dtype and res.dtype == r.dtype}
    return out


def _model_cases(torch, rel_err):
    from mamba2 import Mamba2Config, Mamba2LM
    from mamba2.kernels import kernels
    from mamba2.layers.slots import gather_rows

    out = {}
    for name, (dtype, ngroups, d_ssm, bias) in {"fp32_g1": (torch.float32, 1, None, False),
                                                "bf16_g2_bias": (torch.bfloat16, 2, None, True),
                                                "fp32_dssm": (torch.float32, 1, 32, False)}.items():
        torch.manual_seed(1)
        c = Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=16, headdim=8, ngroups=ngroups, d_ssm=d_ssm,
                         chunk_size=8, bias=bias)
        m = Mamba2LM(c).to(DEVICE, dtype).eval()
        pools = {}
        for mode in ("off", "on"):
            torch.manual_seed(2)
            pool = m.empty_cache(5)
            for st in pool.layers:
                st.conv.normal_()
                st.ssm.normal_()
            pools[mode] = pool
        before = [gather_rows(s, torch.tensor([0, 2, 4], device=DEVICE)) for s in pools["off"].layers]
        slots = torch.tensor([3, 1], device=DEVICE)
        ids = torch.tensor([5, 9], device=DEVICE)
        logits = {}
        with torch.inference_mode():
            for mode in ("off", "on"):
                seq = []
                with kernels(mode):
                    for t in range(3):
                        seq.append(m.decode_step(ids + t, pools[mode], slots).float().cpu())
                logits[mode] = torch.stack(seq)
        same = all(torch.equal(getattr(b, f), getattr(gather_rows(s, torch.tensor([0, 2, 4], device=DEVICE)), f))
                   for b, s in zip(before, pools["on"].layers) for f in ("conv", "ssm"))
        out[name] = {"logits": rel_err(logits["on"], logits["off"]),
                     "ssm": max(rel_err(a.ssm.cpu(), b.ssm.cpu()) for a, b in zip(pools["on"].layers,
                                                                                 pools["off"].layers)),
                     "others_identical": same, "bf16": dtype == torch.bfloat16}
    return out


def _varlen_cases(torch, rel_err):
    """The packed-prefill state kernel (one state per document) against the torch code of the same function,
    and a whole packed prefill with the kernels on against off."""
    from mamba2 import Mamba2Config, Mamba2LM
    from mamba2.kernels import kernels
    from mamba2.ssd import ssd
    from mamba2.ssd.triton.backend import varlen_states_triton
    from mamba2.ssd.varlen import Documents, varlen_final_states

    out = {}
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 0, 1, 70, 64, 17]                      # empty, shorter than a block, one block + a bit
    T, h, p, g, n = sum(lengths), 4, 8, 2, 16
    cu = torch.tensor([0] + lengths).cumsum(0)
    docs = Documents.of(cu, T, "cpu")
    for name, (dtype, init, limit) in {"fp32_init": (torch.float32, True, (0.0, float("inf"))),
                                       "bf16_limit": (torch.bfloat16, False, (0.01, 0.5))}.items():
        x = torch.randn(1, T, h, p, generator=gen).to(dtype)
        dt = (torch.randn(1, T, h, generator=gen) - 1).to(dtype)
        A = -torch.rand(h, generator=gen) * 4 - 0.1
        B = torch.randn(1, T, g, n, generator=gen).to(dtype)
        bias = torch.randn(h, generator=gen) * 0.5
        s0 = torch.randn(1, h, p, n, generator=gen) if init else None
        kw = dict(dt_bias=bias, dt_limit=limit, initial_states=s0)
        ref = varlen_final_states(x, dt, A, B, docs, **kw)
        dev = lambda t: None if t is None else t.to(DEVICE)
        got = varlen_states_triton(dev(x), dev(dt), dev(A), dev(B), cu.to(DEVICE), dt_bias=dev(bias), dt_limit=limit,
                                   initial_states=dev(s0)).cpu()
        with kernels("on"):                              # the dispatcher takes the kernel
            _, via_ssd = ssd(dev(x), dev(dt), dev(A), dev(B), dev(B), cu_seqlens=cu, return_final_states=True,
                             chunk_size=16, **{k: dev(v) if k != "dt_limit" else v for k, v in kw.items()})
        out[name] = {"err": rel_err(got, ref), "ssd_err": rel_err(via_ssd.cpu(), ref), "bf16": dtype == torch.bfloat16,
                     "empty_doc": bool(torch.equal(got[1], torch.zeros_like(got[1])))}
    torch.manual_seed(3)
    m = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=16, headdim=8, chunk_size=16)).to(DEVICE)
    ids = torch.randint(0, 64, (1, 40), device=DEVICE)
    cu = torch.tensor([0, 5, 6, 40])
    states = {}
    with torch.inference_mode():
        for mode in ("off", "on"):
            with kernels(mode):
                cache = m.empty_cache(3)
                logits = m(ids, cu_seqlens=cu, cache=cache, logits_to_keep=1).float().cpu()
            states[mode] = (logits, cache)
    out["model"] = {"err": rel_err(states["on"][0], states["off"][0]), "bf16": False,
                    "ssd_err": max(rel_err(a.ssm.cpu(), b.ssm.cpu()) for a, b in
                                   zip(states["on"][1].layers, states["off"][1].layers)), "empty_doc": True}
    return out


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    from conftest import print_script_results, rel_err
    torch.set_num_threads(2)
    print_script_results(**{key: functools.partial(fn, torch, rel_err) for key, fn in (
        ("conv", _conv_cases), ("norm", _norm_cases), ("model", _model_cases),
        ("varlen", _varlen_cases))})


def test_conv_update_of_pool_rows(kernel_results):
    res = kernel_results["conv"]
    assert "error" not in res, res
    for name, r in res.items():
        assert r["err"] <= F32 and r["others_identical"], (name, r)


def test_fused_add_rms_norm(kernel_results):
    res = kernel_results["norm"]
    assert "error" not in res, res
    for name, r in res.items():
        budget = BF16 if "bf16" in name else F32
        assert r["out"] <= budget and r["residual"] <= F32 and r["dtype_ok"], (name, r)


def test_model_decode_step_kernels_on_equals_off(kernel_results):
    res = kernel_results["model"]
    assert "error" not in res, res
    for name, r in res.items():
        budget = BF16 if r["bf16"] else 1e-4
        assert r["logits"] <= budget and r["ssm"] <= budget and r["others_identical"], (name, r)


def test_packed_prefill_state_kernel(kernel_results):
    res = kernel_results["varlen"]
    assert "error" not in res, res
    for name, r in res.items():
        budget = BF16 if r["bf16"] else 1e-4
        assert r["err"] <= budget and r["ssd_err"] <= budget and r["empty_doc"], (name, r)


if __name__ == "__main__":
    _main()
