"""The Mamba-2 mixer's fused training path (mamba2/layers/triton/mixer.py: one autograd Function from the in_proj
output to the out_proj output, recomputing in the backward) under TRITON_INTERPRET=1 on CPU:

- output and every gradient (the mixer's input and all its parameters) equal the per-op kernel path (each op its
  own autograd Function) and the float64 torch code within docs/design.md §4's budgets, for fp32 and bf16
  autocast, packed documents (seq_idx), several groups, a per-channel D, a finite dt_limit, norm_before_gate,
  out_proj with a bias, and with y and the SSD's chunk states kept or recomputed;
- what autograd keeps for the backward: exactly the mixer's input and the in_proj output (plus y, the chunk
  states and C·Bᵀ when kept) of all the per-token tensors, far less than the per-op path;
- a whole LM's training gradients equal the per-op path's; the cases the Function does not take (an MLP half,
  a wrapped, pruned or hooked out_proj / norm, fp64, the tuning off, no grad) run the per-op path; a frozen
  out_proj gets no gradient; a malformed seq_idx gets the per-op path's error.

TRITON_INTERPRET must be set before Triton is imported, so every interpreted run happens in ONE subprocess (this
file run as a script) that prints the results as JSON. On a GPU the same cases run compiled:
``MAMBA2_TEST_DEVICE=cuda python -m pytest tests/test_fused_mixer.py``.
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
SAME_F32 = SAME_BF16 = 0.0     # fused against the per-op path: the same kernels and products, bit for bit
REF_F32, REF_BF16 = 1e-3, 2e-2            # against float64 torch code (docs/design.md §4, GPU kernel row)
# Under bf16 autocast the fp64 model does not see the rounded activations the kernels see (in_proj output, conv
# output, y), and the per-channel parameters' gradients (A_log, dt_bias, D per head; conv1d weight and bias per
# channel) are sums over every token of products of them, where cancellation magnifies the relative error (seen:
# 4.4e-2 for A_log; 2.3e-2 for conv1d.weight over the 8,192 tokens of the MQAR case on an H100): a sanity bound
# there; the exact equality with the per-op path is what tests the Function for them.
REF_BF16_TOKEN_SUM = 1e-1
TOKEN_SUMS = ("d_A_log", "d_dt_bias", "d_D", "d_conv1d.weight", "d_conv1d.bias")

BASE = dict(d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16, ngroups=2, chunk_size=16)
# name: (batch, L, config overrides, options). Options: seq (document lengths per row), bf16 (autocast),
# keep_y / keep_states (the "keep" tuning's Y / STATES)
CASES = {
    "fp32": (2, 37, {}, {}),
    "fp32_keep_y_states_seq_idx": (2, 40, {}, dict(keep_y=True, keep_states=True, seq=[[9, 1, 30], [40]])),
    "fp32_D_per_channel_dt_limit_nbg_bias": (1, 33, dict(D_has_hdim=True, dt_limit=(0.01, 0.2),
                                                         norm_before_gate=True, bias=True, ngroups=1,
                                                         conv_bias=False), {}),
    "bf16_autocast": (2, 37, {}, dict(bf16=True)),
    "bf16_autocast_keep_y_seq_idx": (2, 40, {}, dict(bf16=True, keep_y=True, seq=[[20, 20], [3, 37]])),
    "bf16_autocast_keep_y_states_bias": (2, 37, dict(bias=True), dict(bf16=True, keep_y=True, keep_states=True)),
    # the MQAR cell whose compiled backward faulted on an H200 (docs/experiments.md §1): 2 heads of 32, d_state 64,
    # its batch of 64 on the GPU (the interpreter, which never faulted there, takes 2 rows: the same blocks)
    "bf16_autocast_mqar_w32_n64": (64 if DEVICE == "cuda" else 2, 128,
                                   dict(headdim=32, d_state=64, ngroups=1, chunk_size=64), dict(bf16=True)),
}


def _mixer(cfg_over, seed):
    import torch
    from mamba2.config import Mamba2Config
    from mamba2.layers.mamba2 import Mamba2Mixer

    torch.manual_seed(seed)
    mixer = Mamba2Mixer(Mamba2Config(**{**BASE, **cfg_over}))
    with torch.no_grad():   # parameters away from their init values (norm weight 1, D 1, zero biases)
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def _run(mixer, u, seq_idx, *, fused_on, keep_y=False, keep_states=False, bf16=False, record=None, backward=True):
    """Output and gradients (u, then each parameter by name) of one forward + backward with the kernels on
    (the forward alone, no gradients, with ``backward=False``)."""
    import torch
    from mamba2.kernels import kernels
    from mamba2.layers.triton import mixer as FM

    u = u.detach().clone().requires_grad_(True)
    mixer.zero_grad(set_to_none=True)
    hooks = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t) if record is not None else None
    with kernels("on"), FM.TUNING.tuned(keep=dict(FUSED=fused_on, Y=keep_y, STATES=keep_states)), \
            torch.autocast(u.device.type, dtype=torch.bfloat16, enabled=bf16):
        if hooks is not None:
            with hooks:
                out = mixer(u, seq_idx=seq_idx)
        else:
            out = mixer(u, seq_idx=seq_idx)
    if not backward:
        return out.detach(), {}
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.double() * g.to(out.device)).sum().backward()
    grads = {"du": u.grad}
    grads.update({f"d_{k}": p.grad for k, p in mixer.named_parameters()})
    return out.detach(), grads


def _seq_idx(seq, L):
    import torch
    if seq is None:
        return None
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in seq]
    assert all(len(r) == L for r in rows)
    return torch.stack(rows).to(DEVICE)


def _case(name, spec, calls):
    import torch
    from conftest import rel_err as _rel
    from mamba2.kernels import kernels

    def rel_err(a, b):
        return _rel(a.detach().cpu(), b.detach().cpu())

    b, L, over, o = spec
    mixer = _mixer(over, seed=len(name)).to(DEVICE)
    u = torch.randn(b, L, BASE["d_model"], generator=torch.Generator().manual_seed(11)).to(DEVICE)
    seq_idx = _seq_idx(o.get("seq"), L)
    kw = dict(keep_y=o.get("keep_y", False), keep_states=o.get("keep_states", False), bf16=o.get("bf16", False))
    n0 = calls[0]
    out_f, g_f = _run(mixer, u, seq_idx, fused_on=True, **kw)
    used = calls[0] - n0
    out_p, g_p = _run(mixer, u, seq_idx, fused_on=False, **kw)
    unused = calls[0] - n0 - used

    ref = _mixer(over, seed=len(name)).double()
    ud = u.double().cpu().requires_grad_(True)
    with kernels("off"):
        out_r = ref(ud, seq_idx=None if seq_idx is None else seq_idx.cpu())
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out_r * g).sum().backward()
    g_r = {"du": ud.grad, **{f"d_{k}": p.grad for k, p in ref.named_parameters()}}

    same, refb = (SAME_BF16, REF_BF16) if kw["bf16"] else (SAME_F32, REF_F32)
    errs = {"out_vs_per_op": [rel_err(out_f, out_p), same], "out_vs_fp64": [rel_err(out_f, out_r), refb]}
    for k in g_r:
        if g_r[k] is None:
            continue
        errs[f"{k}_vs_per_op"] = [rel_err(g_f[k], g_p[k]), same]
        errs[f"{k}_vs_fp64"] = [rel_err(g_f[k], g_r[k]),
                                REF_BF16_TOKEN_SUM if kw["bf16"] and k in TOKEN_SUMS else refb]
    return {"errs": errs, "fused_calls": used, "per_op_calls": unused,
            "dtypes_same": all(g_f[k].dtype == g_p[k].dtype for k in g_f) and out_f.dtype == out_p.dtype}


def _saved_bytes():
    """Bytes of the activations autograd keeps in a fp32 mixer forward (each storage once, parameters and
    tensors smaller than one value per token left out), fused (each "keep" tuning) and per-op, next to the sizes
    of u, zxbcdt and y."""
    import torch

    b, L = 2, 64
    mixer = _mixer({}, seed=1).to(DEVICE)
    u = torch.randn(b, L, BASE["d_model"]).to(DEVICE)
    params = {p.untyped_storage().data_ptr() for p in mixer.parameters()}
    res = {}
    variants = {"fused": (True, False, False), "fused_keep_y": (True, True, False),
                "fused_keep_y_states": (True, True, True), "per_op": (False, False, False)}
    for label, (fused_on, keep_y, keep_states) in variants.items():
        seen = {}

        def record(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.numel() >= b * L:      # activations: they grow with the tokens
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        _run(mixer, u, None, fused_on=fused_on, keep_y=keep_y, keep_states=keep_states, record=record,
             backward=False)      # autograd saves in the forward
        res[label] = sum(seen.values())
    c = mixer.config
    res["u"] = b * L * c.d_model * 4
    res["zxbcdt"] = b * L * c.d_in_proj * 4
    res["y"] = b * L * mixer.d_ssm * 4
    Q = 16                                                  # the kernels' chunk for chunk_size 16
    nc = -(-L // Q)
    res["states"] = b * (nc + 1) * mixer.nheads * c.headdim * c.d_state * 4
    res["cb"] = b * nc * c.ngroups * Q * Q * 4
    return res


def _lm_gradients():
    """A 2-layer LM's loss gradients (fp32), fused against per-op."""
    import torch
    from conftest import rel_err
    from mamba2.config import Mamba2Config
    from mamba2.kernels import kernels
    from mamba2.layers.triton import mixer as FM
    from mamba2.models import Mamba2LM

    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(**{**BASE, "n_layer": 2})).to(DEVICE)
    ids = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = {}
    for fused_on in (True, False):
        model.zero_grad(set_to_none=True)
        with kernels("on"), FM.TUNING.tuned(keep=dict(FUSED=fused_on)):
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
        grads[fused_on] = {k: p.grad.detach().cpu().clone() for k, p in model.named_parameters()}
    return {k: rel_err(grads[True][k], grads[False][k]) for k in grads[True]}


def _fallbacks():
    """Whether :func:`applies` takes the mixer in cases it must not (and does in the plain case)."""
    import torch
    from torch import nn
    from torch.nn.utils import prune
    from mamba2.kernels import kernels
    from mamba2.layers.triton import mixer as FM

    res = {}
    with kernels("on"):
        plain = _mixer({}, 0).to(DEVICE)
        z = torch.randn(1, 4, plain.config.d_in_proj, device=DEVICE)
        res["plain"] = FM.applies(plain, z)
        with torch.no_grad():
            res["no_grad"] = FM.applies(plain, z)
        with FM.TUNING.tuned(keep=dict(FUSED=False)):
            res["tuning_off"] = FM.applies(plain, z)
        mlp = _mixer(dict(d_ssm=32), 0).to(DEVICE)
        res["mlp_half"] = FM.applies(mlp, torch.randn(1, 4, mlp.config.d_in_proj, device=DEVICE))

        class Wrapped(nn.Module):       # what a LoRA adapter does to out_proj
            def __init__(self, inner):
                super().__init__()
                self.base_layer, self.weight, self.bias = inner, inner.weight, inner.bias

        wrapped = _mixer({}, 0).to(DEVICE)
        wrapped.out_proj = Wrapped(wrapped.out_proj)
        res["wrapped_out_proj"] = FM.applies(wrapped, z)
        res["fp64"] = FM.applies(_mixer({}, 0).to(DEVICE).double(), z.double())
        pruned = _mixer({}, 0).to(DEVICE)
        prune.l1_unstructured(pruned.out_proj, "weight", amount=0.2)   # weight from a pre-hook
        res["pruned_out_proj"] = FM.applies(pruned, z)
        hooked = _mixer({}, 0).to(DEVICE)
        hooked.norm.register_forward_hook(lambda mod, args, out: None)
        res["hooked_norm"] = FM.applies(hooked, z)

        frozen = _mixer({}, 0).to(DEVICE)
        frozen.out_proj.weight.requires_grad_(False)
        u = torch.randn(2, 9, BASE["d_model"], device=DEVICE)
        grads = {}
        for fused_on in (True, False):
            _, g = _run(frozen, u, None, fused_on=fused_on)
            grads[fused_on] = g
        res["frozen_out_proj_no_grad"] = grads[True]["d_out_proj.weight"] is None
        res["frozen_out_proj_rest_equal"] = all(
            torch.equal(grads[True][k], grads[False][k]) for k in grads[True] if k != "d_out_proj.weight")
        try:
            with FM.TUNING.tuned(keep=dict(FUSED=True)), torch.enable_grad():
                plain(u.requires_grad_(True), seq_idx=torch.zeros(1, 9, dtype=torch.int64, device=DEVICE))
            res["bad_seq_idx"] = "no error"
        except ValueError as e:
            res["bad_seq_idx"] = str(e)
    with kernels("off"):
        res["kernels_off"] = FM.applies(plain, z)
    return res


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(2)
    from conftest import count_calls, print_script_results
    from mamba2.layers.triton import mixer as FM

    calls = count_calls(FM, "mixer_core")
    print_script_results(cases={name: functools.partial(_case, name, spec, calls) for name, spec in CASES.items()},
                         saved=_saved_bytes, lm=_lm_gradients, fallbacks=_fallbacks)


@pytest.mark.parametrize("name", list(CASES))
def test_fused_mixer_equals_per_op_path_and_fp64(kernel_results, name):
    r = kernel_results["cases"][name]
    assert "error" not in r, r
    assert r["fused_calls"] == 1 and r["per_op_calls"] == 0, r
    assert r["dtypes_same"], r
    bad = {k: v for k, (v, budget) in r["errs"].items() if not v <= budget}
    assert not bad, f"{name}: over budget: {bad} (all: {r['errs']})"
    over = CASES[name][2]
    n_params = 8 + 2 * bool(over.get("bias")) - (over.get("conv_bias") is False)
    assert len(r["errs"]) == 2 * (2 + n_params), sorted(r["errs"])     # out, du and every parameter, both refs


def test_fused_mixer_keeps_only_its_input_and_zxbcdt(kernel_results):
    s = kernel_results["saved"]
    assert "error" not in s, s
    assert s["fused"] == s["u"] + s["zxbcdt"], s
    assert s["fused_keep_y"] == s["u"] + s["zxbcdt"] + s["y"], s
    assert s["fused_keep_y_states"] == s["u"] + s["zxbcdt"] + s["y"] + s["states"] + s["cb"], s
    assert s["per_op"] > s["fused"] + 2 * s["y"], s


def test_lm_gradients_fused_equal_per_op(kernel_results):
    errs = kernel_results["lm"]
    assert "error" not in errs, errs
    assert len(errs) > 10
    bad = {k: v for k, v in errs.items() if not v <= SAME_F32}
    assert not bad, bad


def test_fused_path_only_where_it_applies(kernel_results):
    r = kernel_results["fallbacks"]
    assert "error" not in r, r
    assert r.pop("bad_seq_idx").startswith("seq_idx must be (2, 9)"), r
    assert r == {"plain": True, "no_grad": False, "tuning_off": False, "mlp_half": False,
                 "wrapped_out_proj": False, "fp64": False, "pruned_out_proj": False, "hooked_norm": False,
                 "frozen_out_proj_no_grad": True, "frozen_out_proj_rest_equal": True, "kernels_off": False}, r


if __name__ == "__main__":
    _main()
