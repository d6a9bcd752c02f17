"""Triton grouped gated RMSNorm kernels (mamba2/layers/triton/norm.py) under TRITON_INTERPRET=1 on CPU, against
the torch code in float64 on the same (rounded) inputs (docs/design.md §4, §5: 4, 17): the output and every gradient
(y, z, weight) for ngroups 1/2/4, group sizes that are not powers of two (up to the 2.7B model's 5120), row
counts that are not a multiple of the row block, backward programs that walk several row blocks, 2-D and 3-D
inputs, z None, norm_before_gate, non-contiguous y / z / output gradient, bf16/fp16/mixed dtypes, the plain
RMSNorm (fp32 residual stream with fp32 or bf16 weight); and the modules with kernels "on" equal to "off".

TRITON_INTERPRET must be set before Triton is imported, so every interpreted run happens in ONE subprocess
(this file run as a script) that prints the relative errors as JSON; the tests below only read them.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")   # cuda: the same cases with the kernels compiled
# fp32: nothing in the norm is lossy beyond fp32 rounding, so a budget far below docs/design.md §4's 1e-3
# (measured ~1e-7)
F32, BF16 = 1e-5, 2e-2

# name: (leading dims, d, ngroups, options)
#   dtype / zdtype / wdtype: "fp32" (default), "bf16", "fp16"; no_z; nbg (norm_before_gate); rms (RMSNorm module);
#   noncontig (y with column stride 2, z a slice of a wider buffer, output gradient non-contiguous);
#   transposed (y and z with their two leading dims transposed: no flat row stride, so they are copied);
#   cfg: launch overrides (row blocks, number of backward programs)
SMALL_BLOCKS = {"fwd": {"BR": 4}, "bwd": {"BR": 2, "PROGS": 3}}   # 13 rows: 4 fwd blocks, 7 bwd blocks on 3 programs
CASES = {
    "g1_3d": ((2, 5), 24, 1, {}),
    "g2_nbg_3d": ((2, 5), 24, 2, dict(nbg=True)),
    "g4_d40_rows13_small_blocks": ((13,), 40, 4, dict(cfg=SMALL_BLOCKS)),
    "g4_d40_nbg_rows13_small_blocks": ((13,), 40, 4, dict(nbg=True, cfg=SMALL_BLOCKS)),
    "g2_d48_2d_noncontig": ((13,), 48, 2, dict(noncontig=True, cfg=SMALL_BLOCKS)),
    "g1_d48_3d_noncontig_nbg": ((3, 4), 48, 1, dict(noncontig=True, nbg=True)),
    "noz_g2_3d": ((3, 4), 36, 2, dict(no_z=True)),
    "g2_3d_transposed_leading_dims": ((3, 4), 36, 2, dict(transposed=True)),
    "g1_d5120_like_2.7b": ((3,), 5120, 1, {}),
    "g4_d5120_nbg": ((2,), 5120, 4, dict(nbg=True)),
    "bf16_g2": ((2, 7), 48, 2, dict(dtype="bf16", zdtype="bf16")),
    "bf16_g1_nbg_bf16w": ((2, 7), 48, 1, dict(dtype="bf16", zdtype="bf16", wdtype="bf16", nbg=True)),
    "fp16_g4_small_blocks": ((13,), 40, 4, dict(dtype="fp16", zdtype="fp16", cfg=SMALL_BLOCKS)),
    "fp32y_bf16z_g2": ((2, 7), 48, 2, dict(zdtype="bf16")),
    "rms_fp32": ((2, 9), 40, 1, dict(rms=True)),
    "rms_fp32_bf16w": ((2, 9), 40, 1, dict(rms=True, wdtype="bf16")),
    "rms_bf16_2d_small_blocks": ((13,), 20, 1, dict(rms=True, dtype="bf16", cfg=SMALL_BLOCKS)),
}


def _dt(name):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _budget(dtype_name):
    return F32 if dtype_name == "fp32" else BF16


def _module(d, ngroups, o):
    from mamba2.layers import GatedRMSNorm, RMSNorm
    if o.get("rms"):
        return RMSNorm(d, eps=1e-5)
    return GatedRMSNorm(d, d // ngroups, eps=1e-5, norm_before_gate=o.get("nbg", False))


def _case(name, spec, calls):
    import torch
    from conftest import rel_err as _rel

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())
    from mamba2.kernels import kernels
    from mamba2.layers.triton import norm as TN

    lead, d, ngroups, o = spec
    dt, zdt, wdt = (_dt(o.get(k, "fp32")) for k in ("dtype", "zdtype", "wdtype"))
    has_z = not (o.get("no_z") or o.get("rms"))
    gen = torch.Generator().manual_seed(len(name) * 101 + d)
    y0 = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(dt)
    z0 = (torch.randn(*lead, d, generator=gen, dtype=torch.float64) * 2).to(zdt)
    w0 = (1 + 0.5 * torch.randn(d, generator=gen, dtype=torch.float64)).to(wdt)
    gout = torch.randn(*lead, d, generator=gen, dtype=torch.float64).to(dt).double()   # the kernel sees it in dt

    ref_mod = _module(d, ngroups, o).double()
    with torch.no_grad():
        ref_mod.weight.copy_(w0.double())
    y_r = y0.double().requires_grad_(True)
    z_r = z0.double().requires_grad_(True)
    with kernels("off"):
        out_r = ref_mod(y_r, z_r) if has_z else ref_mod(y_r)
    ref_grads = torch.autograd.grad(out_r, [y_r, z_r, ref_mod.weight] if has_z else [y_r, ref_mod.weight], gout)

    mod = _module(d, ngroups, o).to(DEVICE, wdt)
    with torch.no_grad():
        mod.weight.copy_(w0)
    y, z, g = y0.to(DEVICE), z0.to(DEVICE), gout.to(DEVICE, dt)
    if o.get("noncontig"):   # views into wider buffers, as the mixer's split produces them
        wide = torch.randn(*lead, 2 * d, generator=gen).to(DEVICE, dt)
        wide[..., ::2] = y0
        y = wide[..., ::2]
        wide_z = torch.randn(*lead, 3 * d, generator=gen).to(DEVICE, zdt)
        wide_z[..., d:2 * d] = z0
        z = wide_z[..., d:2 * d]
        wide_g = torch.zeros(*lead, d, 2, dtype=dt, device=DEVICE)
        wide_g[..., 0] = g
        g = wide_g[..., 0]
        assert not (y.is_contiguous() or z.is_contiguous() or g.is_contiguous())
    if o.get("transposed"):
        y = y0.to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
        z = z0.to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
        assert not (y.is_contiguous() or z.is_contiguous())
    y = y.detach().requires_grad_(True)
    z = z.detach().requires_grad_(True)
    n0 = calls[0]
    with TN.TUNING.tuned(**o.get("cfg", {})), kernels("on"):
        out = mod(y, z) if has_z else mod(y)
        grads = torch.autograd.grad(out, [y, z, mod.weight] if has_z else [y, mod.weight], g)
    assert calls[0] == n0 + 1, "the kernel was not used"
    assert out.dtype == dt and out.shape == y.shape
    names = ["dy", "dz", "dweight"] if has_z else ["dy", "dweight"]
    dtypes = [dt, zdt, wdt] if has_z else [dt, wdt]
    errs = {"out": [rel_err(out, out_r), _budget(o.get("dtype", "fp32"))]}
    for k, a, b, t in zip(names, grads, ref_grads, dtypes):
        assert a.dtype == t, (k, a.dtype, t)
        errs[k] = [rel_err(a, b), F32 if t == torch.float32 else BF16]
    return errs


def _modules_on_off(calls):
    """Module outputs, dtypes and gradients with kernels "on" against "off" (the torch code, same dtype)."""
    import torch
    from conftest import rel_err as _rel

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())
    from mamba2.layers import GatedRMSNorm, RMSNorm
    from mamba2.kernels import kernels

    gen = torch.Generator().manual_seed(3)
    res = {}
    variants = {   # name: (module, x dtype, z dtype or None, expect kernel)
        "gated_g2_fp32": (GatedRMSNorm(32, 16), torch.float32, torch.float32, True),
        "gated_nbg_bf16_module": (GatedRMSNorm(32, 32, norm_before_gate=True).to(torch.bfloat16),
                                  torch.bfloat16, torch.bfloat16, True),
        "rms_fp32_residual_bf16_weight": (RMSNorm(24).to(torch.bfloat16), torch.float32, None, True),
        "rms_bf16_fp32_weight": (RMSNorm(24), torch.bfloat16, None, True),
        "gated_fp64_takes_torch_code": (GatedRMSNorm(32, 8).double(), torch.float64, torch.float64, False),
        "rms_fp64_takes_torch_code": (RMSNorm(24).double(), torch.float64, None, False),
    }
    for name, (mod, xdt, zdt, expect) in variants.items():
        d = mod.weight.shape[0]
        with torch.no_grad():
            mod.weight.copy_(1 + 0.5 * torch.randn(d, generator=gen))
        mod.to(DEVICE)
        x0 = torch.randn(2, 3, d, generator=gen).to(DEVICE, xdt)
        z0 = torch.randn(2, 3, d, generator=gen).to(DEVICE, zdt) if zdt is not None else None
        outs = {}
        for mode in ("off", "on"):
            x = x0.clone().requires_grad_(True)
            z = z0.clone().requires_grad_(True) if z0 is not None else None
            mod.zero_grad()
            n0 = calls[0]
            with kernels(mode):
                out = mod(x, z) if z is not None else mod(x)
            used = calls[0] > n0
            wts = torch.arange(out.numel(), dtype=torch.float64, device=out.device).view(out.shape).sin()
            (out.double() * wts).sum().backward()
            outs[mode] = (out.detach(), x.grad, None if z is None else z.grad, mod.weight.grad.clone(), used)
        off, on = outs["off"], outs["on"]
        r = {"dtype_same": off[0].dtype == on[0].dtype, "used_kernel": on[4], "expected_kernel": expect,
             "off_used_kernel": off[4]}
        for k, a, b in zip(("out", "dx", "dz", "dweight"), on[:4], off[:4]):
            if a is not None:
                r[k] = [rel_err(a, b), 0.0 if not expect else (F32 if a.dtype == torch.float32 else BF16)]
        res[name] = r
    return res


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(2)
    from conftest import count_calls, print_script_results
    from mamba2.layers.triton import norm as TN

    calls = count_calls(TN, "gated_rms_norm")
    print_script_results(cases={name: functools.partial(_case, name, spec, calls) for name, spec in CASES.items()},
                         modules=lambda: _modules_on_off(calls))


@pytest.mark.parametrize("name", list(CASES))
def test_norm_kernel_output_and_every_gradient(kernel_results, name):
    errs = kernel_results["cases"][name]
    assert "error" not in errs, errs
    bad = {k: v for k, (v, budget) in errs.items() if not v <= budget}
    assert not bad, f"{name}: over budget: {bad} (all: {errs})"
    has_z = not (CASES[name][3].get("no_z") or CASES[name][3].get("rms"))
    assert set(errs) == ({"out", "dy", "dz", "dweight"} if has_z else {"out", "dy", "dweight"})


def test_modules_with_kernels_on_equal_off(kernel_results):
    res = kernel_results["modules"]
    assert "error" not in res, res
    for name, r in res.items():
        assert r["dtype_same"], (name, r)
        assert r["used_kernel"] == r["expected_kernel"] and not r["off_used_kernel"], (name, r)
        bad = {k: v for k, v in r.items() if isinstance(v, list) and not v[0] <= v[1]}
        assert not bad, (name, bad, r)


def _run_ok(code):
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET; it must print OK last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_mamba2_imports_and_norms_run_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, mamba2\n"
            "from mamba2.layers import GatedRMSNorm, RMSNorm\n"
            "from mamba2.kernels import available, kernels\n"
            "assert not available()\n"
            "out = GatedRMSNorm(8, 4)(torch.randn(2, 8), torch.randn(2, 8)), RMSNorm(8)(torch.randn(2, 8))\n"
            "assert all(torch.isfinite(o).all() for o in out)\n"
            "try:\n"
            "    with kernels('on'):\n"
            "        RMSNorm(8)(torch.randn(2, 8))\n"
            "except RuntimeError as e:\n"
            "    assert 'needs Triton' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('kernels(on) without Triton ran the torch code silently')\n"
            "print('OK')\n")
    _run_ok(code)


def test_kernels_on_for_cpu_tensors_needs_the_interpreter():
    code = ("import torch\n"
            "from mamba2.layers import CausalConv1d, GatedRMSNorm\n"
            "from mamba2.kernels import kernels\n"
            "for f in (lambda: CausalConv1d(8, 4)(torch.randn(2, 5, 8)), lambda: GatedRMSNorm(8, 4)(torch.randn(2, 8))):\n"
            "    try:\n"
            "        with kernels('on'):\n"
            "            f()\n"
            "    except RuntimeError as e:\n"
            "        assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('no error')\n"
            "with kernels('on'):\n"
            "    GatedRMSNorm(8, 4).double()(torch.randn(2, 8, dtype=torch.float64))   # fp64: the torch code\n"
            "print('OK')\n")
    _run_ok(code)


def test_norm_input_errors_are_the_same_in_both_modes():
    import torch
    from mamba2.layers import GatedRMSNorm, RMSNorm

    m, r = GatedRMSNorm(48, 16), RMSNorm(48)
    bad = [(lambda: m(torch.randn(2, 32), torch.randn(2, 32)), r"normalises 48 channels: .*got shape \(2, 32\)"),
           (lambda: m(torch.randn(2, 5, 48), torch.randn(1, 1, 48)), r"z must have the input's shape \(2, 5, 48\)"),
           (lambda: r(torch.randn(3, 40)), r"RMSNorm normalises 48 channels"),
           (lambda: GatedRMSNorm(0, 1), "d must be a positive integer"),
           (lambda: RMSNorm(8, eps=-1.0), "eps must be > 0")]
    for f, msg in bad:   # kernels "on" raises the same before any kernel runs (checked in the interpreted run)
        with pytest.raises(ValueError, match=msg):
            f()


def test_gated_rms_norm_kernel_refuses_other_dtypes():
    import torch
    from mamba2.layers.triton.norm import gated_rms_norm

    for dt in (torch.float64, torch.int64):
        with pytest.raises(ValueError, match=f"takes y in float32/bfloat16/float16, got {dt}"):
            gated_rms_norm(torch.ones(2, 16, dtype=dt), None, torch.ones(16), group_size=16, eps=1e-5)


if __name__ == "__main__":
    _main()
