"""The fused decode-step kernel of the Mamba-2 mixer (mamba2/layers/triton/decode.py: conv update + SiLU, SSD step,
D skip, gate, grouped RMSNorm in one launch) under TRITON_INTERPRET=1 on CPU (compiled with
``MAMBA2_TEST_DEVICE=cuda``, where its atomics really race), against the unfused torch path (kernels "off") on
the same inputs and parameters (docs/design.md §4, §5.2, 5.4, 5.10, 5.18, §7).

Each mixer case runs several consecutive decode steps on a pool of 6 slots through ``Mamba2Mixer.decode`` with the
kernels "on" and "off", with fresh random inputs and parameters (never zeros or ones), and compares: the input of
out_proj (the normalised gated y, captured by a hook: out_proj maps d_inner to a smaller d_model and would hide
part of an error), the mixer output, and the named pool rows of both states (conv window, ssm). Rows not named
must stay byte-identical, and the arrival counters must be zero after every call (the second and third steps
only come out right if the first one left them so). Cases cover ngroups 1, 2 and H, D per head and per channel,
dt_limit set and default, norm_before_gate, no norm, a gated-MLP branch (d_ssm < d_inner), no conv bias, d_conv 2
and 3, headdim and d_state not powers of two, P split across programs (BP < P), the two-pass group norm, fp32 and
bf16, batch 1 and 3, state_indices in permuted order and as a strided view, extreme dt (large and tiny).

Model cases: decode_step token by token from an empty pool with the fused kernel equals the full forward
(kernels "off"), and the unfused kernel path (tuning ``mixer=dict(FUSED=False)``) still equals the torch path.

Every interpreted run happens in one subprocess (this file run as a script) that prints the errors as JSON.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
F32, BF16 = 1e-4, 2e-2
S = 6   # pool rows

# name: options. shape "small": d_model 16, headdim 4 (H 8), d_state 8; "odd": d_model 12, headdim 6 (H 4),
# d_state 6. Options: ngroups ("H" = nheads), D_has_hdim, dt_limit, norm_before_gate, rmsnorm, conv_bias, d_conv,
# d_ssm, dtype, idx (pool rows, or "strided"), BP / NORM_BLOCK (fused tuning), dt_bias / A (extreme decay).
CASES = {
    "g1_fp32_b3": dict(ngroups=1, idx=[4, 0, 2]),
    "g2_fp32_b1_dtlimit": dict(ngroups=2, idx=[3], dt_limit=(0.05, 0.4)),
    "gH_fp32_b3_solo": dict(ngroups="H", idx=[5, 1, 2]),                 # one program per group: no counter
    "gH_fp32_b3_bp2": dict(ngroups="H", idx=[2, 4, 0], BP=2),            # a group = the 2 P blocks of one head
    "g2_Dhdim_nbg_bp2": dict(ngroups=2, D_has_hdim=True, norm_before_gate=True, idx=[1, 5, 3], BP=2),
    "g1_odd_bp4_dtlimit": dict(shape="odd", ngroups=1, idx=[0, 3, 5], BP=4, dt_limit=(0.0, 0.3)),
    "g2_two_pass_norm": dict(ngroups=2, idx=[4, 0, 2], NORM_BLOCK=4, BP=2),
    "g1_two_pass_norm_nbg": dict(ngroups=1, norm_before_gate=True, idx=[2], NORM_BLOCK=8),
    "no_norm_g2": dict(ngroups=2, rmsnorm=False, idx=[4, 0, 2], BP=2),
    "dmlp_nobias_k3": dict(ngroups=2, d_ssm=16, conv_bias=False, d_conv=3, idx=[1, 4, 0]),
    "k2_g1_strided_idx": dict(ngroups=1, d_conv=2, idx="strided"),
    "bf16_g1_b3": dict(ngroups=1, dtype="bf16", idx=[4, 0, 2]),
    "bf16_g2_Dhdim_nbg_b1": dict(ngroups=2, dtype="bf16", D_has_hdim=True, norm_before_gate=True, idx=[3],
                                 BP=2),
    "bf16_gH_dtlimit_b3": dict(ngroups="H", dtype="bf16", dt_limit=(0.01, 1.0), idx=[0, 5, 2]),
    # |A|·dt ~ 1e3: the state forgets everything at once, and dt ~ 1e-11: it barely moves
    "extreme_large_dt": dict(ngroups=2, idx=[4, 0, 2], dt_bias=25.0, A=40.0, BP=2),
    "extreme_tiny_dt": dict(ngroups=1, idx=[1, 3], dt_bias=-25.0),
}
STEPS = 3


def _mixer_case(torch, rel_err, o):
    from mamba2 import Mamba2Config
    from mamba2.kernels import kernels
    from mamba2.layers.mamba2 import Mamba2Mixer
    from mamba2.layers.triton.decode import TUNING

    dtype = torch.bfloat16 if o.get("dtype") == "bf16" else torch.float32
    d_model, headdim, d_state = (12, 6, 6) if o.get("shape") == "odd" else (16, 4, 8)
    nheads = (o.get("d_ssm") or 2 * d_model) // headdim
    G = nheads if o["ngroups"] == "H" else o["ngroups"]
    c = Mamba2Config(d_model=d_model, n_layer=1, vocab_size=64, d_state=d_state, headdim=headdim, ngroups=G,
                     d_ssm=o.get("d_ssm"), D_has_hdim=o.get("D_has_hdim", False), rmsnorm=o.get("rmsnorm", True),
                     norm_before_gate=o.get("norm_before_gate", False), conv_bias=o.get("conv_bias", True),
                     d_conv=o.get("d_conv", 4), dt_limit=o.get("dt_limit", (0.0, math.inf)), chunk_size=8)
    gen = torch.Generator().manual_seed(sum(map(ord, repr(sorted(o.items())))) % 1000)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    m = Mamba2Mixer(c)
    with torch.no_grad():
        m.in_proj.weight.copy_(r(*m.in_proj.weight.shape, scale=0.4))
        m.out_proj.weight.copy_(r(*m.out_proj.weight.shape, scale=0.3))
        m.conv1d.weight.copy_(r(*m.conv1d.weight.shape, scale=0.5))
        if m.conv1d.bias is not None:
            m.conv1d.bias.copy_(r(*m.conv1d.bias.shape, scale=0.3))
        m.dt_bias.copy_(r(nheads, scale=0.5) + o.get("dt_bias", 0.0))
        A = torch.rand(nheads, generator=gen) * 15 + 1 if "A" not in o else torch.full((nheads,), o["A"])
        m.A_log.copy_(torch.log(A))
        m.D.copy_(r(*m.D.shape))
        if m.norm is not None:
            m.norm.weight.copy_(1 + r(*m.norm.weight.shape, scale=0.3))
    m = m.to(DEVICE, dtype).eval()
    pool0 = m.empty_state(S, DEVICE)
    pool0.conv.copy_(r(*pool0.conv.shape).to(dtype))
    pool0.ssm.copy_(r(*pool0.ssm.shape))
    modes = ("off", "on", "ref32") if dtype == torch.bfloat16 else ("off", "on")
    pools = {mode: type(pool0)(conv=pool0.conv.clone(), ssm=pool0.ssm.clone()) for mode in modes}
    # bf16: also an fp32 torch reference on the same (bf16-valued) parameters, pool and inputs; the torch path in
    # bf16 rounds after every conv tap, the kernels accumulate in fp32 (both must be within the bf16 budget of it)
    m32 = copy.deepcopy(m).float() if dtype == torch.bfloat16 else None
    if m32 is not None:
        pools["ref32"].conv = pools["ref32"].conv.float()
    if o["idx"] == "strided":
        idx = torch.tensor([5, 9, 2, 9, 0, 9], device=DEVICE)[::2]              # rows 5, 2, 0; a strided view
    else:
        idx = torch.tensor(o["idx"], device=DEVICE)
    others = [i for i in range(S) if i not in idx.tolist()]
    b = idx.shape[0]
    tuning = {k: o[k] for k in ("BP", "NORM_BLOCK") if k in o}

    seen = {}
    m.out_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("y", args[0].detach().clone()))
    errs = {"y": 0.0, "out": 0.0, "conv": 0.0, "ssm": 0.0}
    if m32 is not None:
        errs.update(y_ref32=0.0, out_ref32=0.0, ssm_ref32=0.0)
    counters_zero, fused_ran = True, True
    for _ in range(STEPS):
        u = r(b, d_model).to(DEVICE, dtype)
        res = {}
        with torch.inference_mode():
            for mode in modes:
                with kernels("off" if mode == "ref32" else mode), TUNING.tuned(fused=tuning):
                    if mode == "ref32":
                        m32.out_proj.register_forward_pre_hook(
                            lambda mod, args: seen.__setitem__("y", args[0].detach().clone()))
                        out = m32.decode(u.float(), pools[mode], idx)
                        m32.out_proj._forward_pre_hooks.clear()
                    else:
                        out = m.decode(u, pools[mode], idx)
                res[mode] = (seen.pop("y"), out)
        # (the torch path runs the mixer's forward on (b, 1, ·): flatten both to (b, ·))
        errs["y"] = max(errs["y"], rel_err(res["on"][0].reshape(b, -1).cpu(), res["off"][0].reshape(b, -1).cpu()))
        errs["out"] = max(errs["out"], rel_err(res["on"][1].reshape(b, -1).cpu(),
                                               res["off"][1].reshape(b, -1).cpu()))
        errs["conv"] = max(errs["conv"], rel_err(pools["on"].conv[idx].cpu(), pools["off"].conv[idx].cpu()))
        errs["ssm"] = max(errs["ssm"], rel_err(pools["on"].ssm[idx].cpu(), pools["off"].ssm[idx].cpu()))
        if m32 is not None:
            errs["y_ref32"] = max(errs["y_ref32"], rel_err(res["on"][0].reshape(b, -1).cpu(),
                                                           res["ref32"][0].reshape(b, -1).cpu()))
            errs["out_ref32"] = max(errs["out_ref32"], rel_err(res["on"][1].reshape(b, -1).cpu(),
                                                               res["ref32"][1].reshape(b, -1).cpu()))
            errs["ssm_ref32"] = max(errs["ssm_ref32"], rel_err(pools["on"].ssm[idx].cpu(),
                                                               pools["ref32"].ssm[idx].cpu()))
        counters = m.__dict__.get("_fused_decode_counters", {}).get(pools["on"].ssm.device)
        fused_ran = fused_ran and counters is not None
        counters_zero = counters_zero and counters is not None and not bool(counters.any())
    identical = all(torch.equal(getattr(pools["on"], f)[others], getattr(pool0, f)[others]) for f in ("conv", "ssm"))
    finite = all(bool(torch.isfinite(getattr(pools["on"], f)).all()) for f in ("conv", "ssm"))
    return {**errs, "others_identical": identical, "counters_zero": counters_zero, "fused_ran": fused_ran,
            "finite": finite, "bf16": dtype == torch.bfloat16}


def _model_cases(torch, rel_err):
    from mamba2 import Mamba2Config, Mamba2LM
    from mamba2.kernels import kernels
    from mamba2.layers.triton.decode import TUNING

    out = {}
    # token-by-token decode from an empty pool (fused kernel) = the full forward (torch), every position
    torch.manual_seed(3)
    c = Mamba2Config(d_model=16, n_layer=2, vocab_size=64, d_state=8, headdim=4, ngroups=2, chunk_size=8)
    m = Mamba2LM(c).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    slots = torch.tensor([3, 0], device=DEVICE)
    with torch.inference_mode():
        with kernels("off"):
            full = m(ids).float().cpu()
        pool = m.empty_cache(4)
        steps = []
        with kernels("on"):
            for t in range(ids.shape[1]):
                steps.append(m.decode_step(ids[:, t], pool, slots).float().cpu())
    out["decode_equals_forward"] = {"logits": rel_err(torch.stack(steps, 1), full), "bf16": False}

    # the unfused kernels (conv update, SSD step, gated norm) still equal the torch path, and the fused kernel
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(4)
        m = Mamba2LM(c).to(DEVICE, dtype).eval()
        pools = {}
        for mode in ("off", "unfused", "fused"):
            torch.manual_seed(5)
            pools[mode] = m.empty_cache(5)
            for st in pools[mode].layers:
                st.conv.normal_()
                st.ssm.normal_()
        logits = {}
        with torch.inference_mode():
            for mode in ("off", "unfused", "fused"):
                with kernels("off" if mode == "off" else "on"), TUNING.tuned(mixer=dict(FUSED=mode == "fused")):
                    logits[mode] = torch.stack([m.decode_step(torch.tensor([7 + t, 2], device=DEVICE), pools[mode],
                                                              torch.tensor([4, 1], device=DEVICE)).float().cpu()
                                                for t in range(3)])
        name = "unfused_kernels_" + ("bf16" if dtype == torch.bfloat16 else "fp32")
        out[name] = {"logits": rel_err(logits["unfused"], logits["off"]),
                     "fused_vs_unfused": rel_err(logits["fused"], logits["unfused"]),
                     "bf16": dtype == torch.bfloat16}
    return out


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    from conftest import rel_err
    torch.set_num_threads(2)
    res = {}
    for name, o in CASES.items():
        try:
            t0 = time.perf_counter()
            res[name] = _mixer_case(torch, rel_err, o)
            res[name]["seconds"] = time.perf_counter() - t0
        except Exception as e:  # reported as a failure of that case
            import traceback
            res[name] = {"error": repr(e) + traceback.format_exc()[-2000:]}
    try:
        res["model"] = _model_cases(torch, rel_err)
    except Exception as e:
        import traceback
        res["model"] = {"error": repr(e) + traceback.format_exc()[-2000:]}
    print("RESULTS " + json.dumps(res))


@pytest.fixture(scope="module")
def results():
    from conftest import kernel_script_results
    return kernel_script_results(__file__, interpret=DEVICE == "cpu")


@pytest.mark.parametrize("name", list(CASES))
def test_fused_decode_equals_torch_path(results, name):
    r = results[name]
    assert "error" not in r, r
    budget = BF16 if r["bf16"] else F32
    assert r["fused_ran"], ("the fused kernel did not run", r)
    assert r["y"] <= budget and r["out"] <= budget, (name, r)
    assert r["conv"] <= budget and r["ssm"] <= budget, (name, r)
    if r["bf16"]:
        assert max(r["y_ref32"], r["out_ref32"], r["ssm_ref32"]) <= budget, ("against the fp32 reference", name, r)
    assert r["finite"], (name, r)
    assert r["others_identical"], ("pool rows not named changed", name, r)
    assert r["counters_zero"], ("arrival counters left non-zero", name, r)


def test_model_decode_with_fused_kernel(results):
    res = results["model"]
    assert "error" not in res, res
    for name, r in res.items():
        budget = BF16 if r["bf16"] else F32
        assert r["logits"] <= budget, (name, r)
        if "fused_vs_unfused" in r:
            assert r["fused_vs_unfused"] <= budget, (name, r)


def _compile_for_sm90(dtype: str, **constexprs):
    """The kernel compiled ahead of time for an H100/H200 (sm_90) with Triton's bundled ptxas: no GPU needed."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    from mamba2.layers.triton.decode import fused_decode_kernel

    ptrs = {"zx_ptr": dtype, "cs_ptr": dtype, "st_ptr": "fp32", "idx_ptr": "i64", "cw_ptr": dtype, "cb_ptr": dtype,
            "dtb_ptr": "fp32", "alog_ptr": "fp32", "D_ptr": "fp32", "nw_ptr": dtype, "out_ptr": dtype,
            "cnt_ptr": "i32"}
    sig, consts = {}, {}
    for i, name in enumerate(inspect.signature(fused_decode_kernel.fn).parameters):
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
        elif name in ("lo", "hi", "eps"):
            sig[name] = "fp32"
        elif name in constexprs:
            sig[name] = "constexpr"
            consts[(i,)] = constexprs[name]
        else:
            sig[name] = "i64" if name.startswith("s_") else "i32"
    src = ASTSource(fn=fused_decode_kernel, signature=sig, constexprs=consts)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]


def test_kernel_compiles_for_sm90_with_ordered_arrival():
    """The interpreter neither compiles the kernel nor races its programs: compile it for sm_90 (130m-like bf16,
    and a SOLO / no-norm / d_conv 2 variant, and the two-pass norm) and check the arrival the ordering argument
    rests on: a CTA barrier right before the one-thread acq_rel atomic, and the broadcast of its result."""
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip(f"no bundled ptxas at {ptxas}")
    base = dict(K=4, KW=4, KS=4, BP=8, BN=128, BG=2048, ONE_BLOCK=True, HAS_CONV_BIAS=True, D_PER_CH=False,
                CLAMP=False, NORM=True, NORM_BEFORE_GATE=False, SOLO=False)
    ptx = _compile_for_sm90("bf16", **base)
    lines = [ln.strip() for ln in ptx.splitlines()
             if ln.strip() and not ln.strip().startswith(("//", ".loc", "$L"))]
    atom = [i for i, ln in enumerate(lines) if "atom.global.gpu.acq_rel.add" in ln]
    assert len(atom) == 1, atom
    before = lines[max(0, atom[0] - 6):atom[0]]
    assert any(ln.startswith("bar.sync") for ln in before), before
    assert not any(ln.startswith(("st.global", "ld.global")) for ln in before), before
    assert "ld.global.cg" in ptx
    solo = _compile_for_sm90("fp32", **{**base, "SOLO": True, "NORM": False, "K": 2, "KW": 2, "KS": 1, "BP": 64,
                                        "CLAMP": True, "HAS_CONV_BIAS": False})
    assert "atom." not in solo
    _compile_for_sm90("bf16", **{**base, "ONE_BLOCK": False, "NORM_BEFORE_GATE": True, "D_PER_CH": True})


if __name__ == "__main__":
    _main()
