"""Triton SSD kernels under TRITON_INTERPRET=1 on CPU, against the torch reference (docs/design.md §4, §5: 1-4, 7,
8, 10, 16, 18): outputs and every gradient, several shapes, ngroups 1/2/H, L not a multiple of the chunk, seq_idx,
initial states, D per head and per channel, z, dt_limit; and the decode-step kernel.

TRITON_INTERPRET must be set before Triton is imported, so every interpreted run happens in ONE subprocess
(this file run as a script) that prints the relative errors as JSON; the tests below only read them. Other test
files are unaffected.
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
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")   # cuda: the same cases with the kernels compiled
# fp32 inputs multiply in fp32 (torch's default float32 matmul precision, which the kernels follow), interpreted
# or compiled
F32, BF16 = 1e-3, 2e-2

# name: (batch, L, nheads, headdim, ngroups, d_state, chunk, options)
CASES = {
    "L1_g1": (2, 1, 4, 8, 1, 16, 16, {}),
    "Lq-1_g2_seq": (2, 15, 4, 8, 2, 16, 16, dict(seq=True)),
    "Lq+1_gH_Dch": (2, 17, 4, 8, 4, 16, 16, dict(Dpc=True)),
    "L3q+7_g2_seq_Dch": (2, 55, 4, 8, 2, 16, 16, dict(seq=True, Dpc=True)),
    "L3q+7_g1_noz_noinit_1split": (1, 55, 4, 8, 1, 16, 16, dict(no_z=True, no_init=True, no_D=True, hpp=64)),
    "L3q+7_g1_2splits": (1, 55, 4, 8, 1, 16, 16, dict(seq=True, hpp=2)),
    "b1_init_limit_p5_n12": (1, 40, 2, 5, 1, 12, 16, dict(limit=(0.05, 1.5))),
    "chunk32_seq_nosoftplus": (2, 70, 4, 16, 2, 16, 32, dict(seq=True, no_softplus=True)),
    # non-contiguous inputs; the other paths: states recomputed in the backward, no sweep split
    "noncontig_recompute_states": (2, 33, 4, 8, 2, 16, 16, dict(noncontig=True, seq=True, cfg={
        "save": {"STATES": False}, "sweep": {"MIN_PROGS": 0}})),
    # several row/column blocks per chunk in the backward
    "chunk32_small_blocks_seq": (2, 70, 4, 8, 2, 16, 32, dict(seq=True, cfg={
        "dc": {"BM": 16, "BK": 16}, "db": {"BM": 16, "BK": 16}, "dx": {"BM": 16, "BK": 16, "MIN_BP": 16},
        "dcb": {"BM": 16, "BK": 16}})),
    "chunk32_dcb_blocks_differ": (2, 70, 4, 8, 2, 16, 32, dict(seq=True, cfg={
        "dc": {"BM": 16, "BK": 16}, "db": {"BM": 16, "BK": 32}, "dcb": {"BM": 32, "BK": 16}})),
    "bf16_g2_seq": (2, 55, 4, 16, 2, 16, 16, dict(seq=True, dtype="bf16")),
    "extreme_decay": (2, 40, 4, 8, 2, 16, 16, dict(extreme=True)),
}


def _case(name, spec):
    import torch
    from conftest import rel_err as _rel
    from conftest import ssd_inputs
    from mamba2.ssd import select_backend, ssd, ssd_recurrent

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())

    b, L, h, p, g, n, Q, o = spec
    dtype = torch.bfloat16 if o.get("dtype") == "bf16" else torch.float32
    extreme = o.get("extreme", False)
    args, kw = ssd_inputs(b, L, h, p, g, n, seed=len(name), with_seq_idx=o.get("seq", False),
                          D_per_channel=o.get("Dpc", False), A_scale=40.0 if extreme else 3.0,
                          dt_shift=3.0 if extreme else 0.0)
    if extreme:   # huge |A|·dt on some heads, tiny dt on others
        kw["dt_bias"] = torch.tensor([4.0, -12.0, 2.0, -8.0], dtype=torch.float64)[:h]
    if o.get("no_softplus"):   # the raw dt is the step: keep it positive
        args["dt"] = args["dt"].abs() + 0.05
        kw.pop("dt_bias")
    for key, flag in (("z", "no_z"), ("initial_states", "no_init"), ("D", "no_D")):
        if o.get(flag):
            kw.pop(key)
    extra = dict(dt_limit=o.get("limit", (0.0, math.inf)), dt_softplus=not o.get("no_softplus", False),
                 chunk_size=Q, return_final_states=True)

    def leaves(dt_, dev="cpu"):   # the reference sees the same (rounded) inputs, in float64 on the CPU
        out = {}
        for k, v in {**args, **kw}.items():
            out[k] = v.to(dtype).to(dev, dt_).detach().requires_grad_(True) if v.is_floating_point() else v.to(dev)
        return out

    ref_in = leaves(torch.float64)
    ref_fn = ssd_recurrent if extreme else (lambda **a: ssd(**a, backend="chunked"))
    y_ref, s_ref = ref_fn(**ref_in, **extra)
    gen = torch.Generator().manual_seed(7)
    gy = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    gs = torch.randn(s_ref.shape, generator=gen, dtype=torch.float64)
    ((y_ref * gy).sum() + (s_ref * gs).sum()).backward()

    tin = leaves(dtype, DEVICE)
    if o.get("noncontig"):   # x, B, C as views into wider buffers, as the mixer's split produces them
        for k in ("x", "B", "C", "z"):
            v = tin[k].detach()
            wide = torch.randn(*v.shape[:-1], v.shape[-1] * 2, dtype=v.dtype, device=v.device)
            wide[..., 1::2] = v
            tin[k] = wide[..., 1::2].requires_grad_(True)
    from mamba2.kernels import kernels
    from mamba2.ssd.triton import backend as TB
    # "auto": CUDA tensors take the kernels; CPU tensors do not, TRITON_INTERPRET=1 or not
    assert select_backend(tin["x"]).name == ("chunked" if DEVICE == "cpu" else "triton")
    cfg = dict(o.get("cfg", {}))
    if o.get("hpp"):   # all heads of a group in one program (no split partial sums)
        for k in ("db", "dc"):
            cfg[k] = {**cfg.get(k, {}), "HPP": o["hpp"]}
    with TB.TUNING.tuned(**cfg), kernels("on"):
        assert select_backend(tin["x"]).name == "triton"
        y, s = ssd(**tin, **extra)
        ((y * gy.to(DEVICE, dtype)).sum() + (s * gs.to(DEVICE, torch.float32)).sum()).backward()
    errs = {"y": rel_err(y, y_ref), "final_states": rel_err(s, s_ref)}
    for k, v in ref_in.items():
        if v.is_floating_point():
            errs["d" + k] = rel_err(tin[k].grad, v.grad) if tin[k].grad is not None else math.inf
    return errs


def _step_cases():
    import torch
    from conftest import rel_err as _rel
    from mamba2.ssd.step import ssd_step_torch as torch_step
    from mamba2.ssd.triton.backend import ssd_step_triton

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())

    def dev(t):
        return None if t is None else t.to(DEVICE)

    out = {}
    for name, (b, h, p, g, n, Dpc, z, act, limit) in {
        "g1_D_head": (3, 4, 8, 1, 16, False, True, False, (0.0, math.inf)),
        "g2_Dch_active": (4, 4, 8, 2, 16, True, True, True, (0.0, math.inf)),
        "gH_noz_limit_p5_n12": (2, 4, 5, 4, 12, False, False, True, (0.1, 1.0)),
    }.items():
        gen = torch.Generator().manual_seed(b * 31 + h)
        r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
        st = r(b, h, p, n)
        kw = dict(D=r(h * p) if Dpc else r(h), z=r(b, h, p) if z else None, dt_bias=r(h) * 0.5, dt_limit=limit,
                  active=torch.tensor([True, False] * (b // 2), dtype=torch.bool) if act else None)
        ins = (r(b, h, p), r(b, h), -torch.rand(h, generator=gen) * 4 - 0.1, r(b, g, n), r(b, g, n))
        s_ref, s_tri = st.clone(), st.clone().to(DEVICE)
        ins_d, kw_d = [dev(t) for t in ins], {k: dev(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        ys = []
        for _ in range(3):   # three steps in a row
            y_ref = torch_step(s_ref, *ins, **kw)
            y_tri = ssd_step_triton(s_tri, *ins_d, **kw_d)
            ys.append((rel_err(y_tri, y_ref), rel_err(s_tri, s_ref)))
        inactive_same = True
        if act:
            m = ~kw["active"]
            inactive_same = bool(torch.equal(s_tri.cpu()[m], st[m]))
        out[name] = {"y": max(e[0] for e in ys), "state": max(e[1] for e in ys), "inactive_identical": inactive_same}
    # a pool of 7 state rows, 3 of them advanced through state_indices (a serving engine's slots)
    gen = torch.Generator().manual_seed(5)
    b, h, p, g, n = 3, 4, 8, 2, 16
    pool = torch.randn(7, h, p, n, generator=gen)
    idx = torch.tensor([5, 0, 3])
    ins = (torch.randn(b, h, p, generator=gen), torch.randn(b, h, generator=gen), -torch.rand(h, generator=gen) - 0.1,
           torch.randn(b, g, n, generator=gen), torch.randn(b, g, n, generator=gen))
    kw = dict(D=torch.randn(h, generator=gen), dt_bias=torch.randn(h, generator=gen) * 0.5)
    p_ref, p_tri = pool.clone(), pool.clone().to(DEVICE)
    y_ref = torch_step(p_ref, *ins, state_indices=idx, **kw)
    y_tri = ssd_step_triton(p_tri, *(dev(t) for t in ins), state_indices=dev(idx), **{k: dev(v) for k, v in kw.items()})
    p_log = pool.clone().to(DEVICE)                       # A given as A_log: A = -exp(A_log) inside the kernel
    y_log = ssd_step_triton(p_log, ins[0].to(DEVICE), ins[1].to(DEVICE), None, *(dev(t) for t in ins[3:]),
                            state_indices=dev(idx), A_log=dev(torch.log(-ins[2])),
                            **{k: dev(v) for k, v in kw.items()})
    y_log_ref = torch_step(pool.clone(), ins[0], ins[1], None, *ins[3:], state_indices=idx, A_log=torch.log(-ins[2]),
                           **kw)
    rows_alone = pool[idx].clone()
    y_alone = torch_step(rows_alone, *ins, **kw)
    others = [i for i in range(7) if i not in idx.tolist()]
    out["pool_indices"] = {"y": max(rel_err(y_tri, y_ref), rel_err(y_ref, y_alone), rel_err(y_log, y_ref),
                                     rel_err(y_log_ref, y_ref)),
                           "state": max(rel_err(p_tri[idx], p_ref[idx]), rel_err(p_ref[idx], rows_alone),
                                        rel_err(p_log[idx], p_ref[idx])),
                           "inactive_identical": bool(torch.equal(p_tri.cpu()[others], pool[others])
                                                      and torch.equal(p_ref[others], pool[others]))}
    return out


def _small_dt_cases():
    """Raw dt from -15 to -5 (softplus in its small range, where log(1 + e^v) loses digits; the default dt_min
    puts dt_bias near -6.9): per-head relative errors (a whole-tensor error would hide the small heads behind
    the large ones) of y, final states and every gradient against the fp64 torch code, and of the decode step."""
    import torch
    from conftest import rel_err as _rel
    from mamba2.ssd import ssd
    from mamba2.ssd.step import ssd_step_torch as torch_step
    from mamba2.ssd.triton.backend import ssd_step_triton

    def rel_err(out, ref):
        return _rel(out.cpu(), ref.cpu())

    b, L, h, p, g, n = 2, 40, 5, 4, 1, 8
    gen = torch.Generator().manual_seed(11)
    raw = torch.tensor([-15.0, -14.9, -13.0, -10.0, -5.0])
    ins = dict(x=torch.randn(b, L, h, p, generator=gen), dt=raw.expand(b, L, h) + 0.1 * torch.rand(b, L, h, generator=gen),
               A=-torch.rand(h, generator=gen) - 0.5, B=torch.randn(b, L, g, n, generator=gen),
               C=torch.randn(b, L, g, n, generator=gen))
    out = {}
    runs = {}
    for name, dtype, dev in (("triton", torch.float32, DEVICE), ("chunked", torch.float64, "cpu")):
        leaves = {k: v.detach().to(dev, dtype).requires_grad_(True) for k, v in ins.items()}
        y, s = ssd(**leaves, chunk_size=16, return_final_states=True, backend=name)
        (y.sum() + s.sum()).backward()
        runs[name] = (y, s, {k: v.grad for k, v in leaves.items()})
    (y, s, gr), (y_r, s_r, gr_r) = runs["triton"], runs["chunked"]
    for i in range(h):
        out[f"head{i}_y"] = rel_err(y[:, :, i], y_r[:, :, i])
        out[f"head{i}_final_states"] = rel_err(s[:, i], s_r[:, i])
        out[f"head{i}_ddt"] = rel_err(gr["dt"][:, :, i], gr_r["dt"][:, :, i])
        out[f"head{i}_dx"] = rel_err(gr["x"][:, :, i], gr_r["x"][:, :, i])
    out["dA"] = rel_err(gr["A"], gr_r["A"])
    # from a zero state the new state is dt·x⊗B itself (an increment on a nonzero fp32 state would be lost to its
    # rounding: dt is ~3e-7 here)
    step_in = (ins["x"][:, 0], ins["dt"][:, 0], ins["A"], ins["B"][:, 0], ins["C"][:, 0])
    s_ref, s_tri = torch.zeros(b, h, p, n, dtype=torch.float64), torch.zeros(b, h, p, n, device=DEVICE)
    torch_step(s_ref, *(t.double() for t in step_in))
    ssd_step_triton(s_tri, *(t.to(DEVICE) for t in step_in))
    for i in range(h):
        out[f"step_head{i}_state"] = rel_err(s_tri[:, i], s_ref[:, i])
    return out


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(2)
    from conftest import print_script_results
    print_script_results(ssd={name: functools.partial(_case, name, spec) for name, spec in CASES.items()},
                         step=_step_cases, small_dt=_small_dt_cases)


@pytest.mark.parametrize("name", list(CASES))
def test_ssd_outputs_and_every_gradient(kernel_results, name):
    errs = kernel_results["ssd"][name]
    assert "error" not in errs, errs
    budget = BF16 if CASES[name][7].get("dtype") == "bf16" else F32
    bad = {k: v for k, v in errs.items() if not v <= budget}
    assert not bad, f"{name}: over budget {budget}: {bad} (all: {errs})"
    expected = {"y", "final_states", "dx", "ddt", "dA", "dB", "dC"}
    assert expected <= set(errs)


def test_step_kernel(kernel_results):
    res = kernel_results["step"]
    assert "error" not in res, res
    for name, r in res.items():
        assert r["y"] <= F32 and r["state"] <= F32, (name, r)
        assert r["inactive_identical"], name


def test_small_dt_softplus_per_head(kernel_results):
    """2e-5 (the old log(1 + e^v) softplus was off by 0.06-0.12 here)."""
    res = kernel_results["small_dt"]
    assert "error" not in res, res
    bad = {k: v for k, v in res.items() if not v <= 2e-5}
    assert not bad, bad


if __name__ == "__main__":
    _main()
