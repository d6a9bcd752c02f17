"""The layer kernels on one GPU (issue 3, item 4): the Triton causal conv1d and grouped gated RMSNorm checked
against the torch code at realistic shapes, and timed alone and inside a whole Mamba-2 mixer.

    python benchmarks/layers_gpu.py --check             # kernels vs the torch code in float64, realistic shapes
    python benchmarks/layers_gpu.py --bench --out DIR   # table + JSON: conv, norm, mixer (kernels on / off / official)
    python benchmarks/layers_gpu.py --conv-variants --out DIR   # the conv backward's launch parameters, swept

"on" = every Triton kernel (SSD, conv, norm); "off" = the Triton SSD with the torch conv and norm (what the mixer
ran before these kernels). The official column is mamba_ssm 2.3.2's ``Mamba2`` module (benchmarks/oracle.py) with
``use_mem_eff_path=False``: its Triton SSD and gated norm, and torch's ``nn.Conv1d`` (we do not build the
causal-conv1d CUDA extension, docs/benchmarks.md). Timings are medians of ``triton.testing.do_bench`` (CUDA events,
warm-up first); floors are bytes over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_util import bench, copy_tbs, import_oracle, profile, rel  # noqa: E402
from mamba2.config import Mamba2Config  # noqa: E402
from mamba2.layers import CausalConv1d, GatedRMSNorm, Mamba2Mixer  # noqa: E402
from mamba2.kernels import kernels  # noqa: E402

DEV = "cuda"


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_(True)


def _as_tuple(o):
    return o if isinstance(o, tuple) else (o,)


def _run_grads(fn, ins, gout):
    """Outputs of fn(**ins) and the gradients of <outputs, gout> w.r.t. every floating input and every parameter
    of the module behind fn (``fn.params``)."""
    outs = _as_tuple(fn(**ins))
    loss = sum((o.double() * g.double()).sum() for o, g in zip(outs, gout))
    leaves = {k: v for k, v in ins.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    leaves.update({"param." + k: v for k, v in fn.params.items()})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return outs, dict(zip(leaves, grads))


def compare(fn_mod, make, dtype, mode):
    """Run ``fn_mod`` with the kernels ``mode`` on ``dtype`` copies of the inputs and with the torch code in
    float64 on the same rounded values; relative errors of every output and gradient."""
    raw = make()
    gen = torch.Generator(device=DEV).manual_seed(1)
    ins = {k: (_leaf(v, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in raw.items()}
    ref = {k: (_leaf(v, dtype).double().detach().requires_grad_(True) if isinstance(v, torch.Tensor)
               and v.is_floating_point() else v) for k, v in raw.items()}
    with torch.no_grad(), kernels(mode):
        shapes = [o.shape for o in _as_tuple(fn_mod(dtype)(**ins))]
    gout = [torch.randn(s, generator=gen, device=DEV, dtype=torch.float64) for s in shapes]
    with kernels(mode):
        outs, grads = _run_grads(fn_mod(dtype), ins, gout)
    with kernels("off"):
        routs, rgrads = _run_grads(fn_mod(torch.float64), ref, gout)
    errs = {f"out{i}": rel(o, r) for i, (o, r) in enumerate(zip(outs, routs))}
    for k in grads:
        if grads[k] is not None or rgrads[k] is not None:
            errs["d" + k] = rel(grads[k], rgrads[k]) if grads[k] is not None else math.inf
    return errs


def conv_fn(ch, K):
    torch.manual_seed(0)
    mod = CausalConv1d(ch, K).to(DEV)

    def fn_mod(dtype):
        m = CausalConv1d(ch, K).to(DEV, dtype)
        m.load_state_dict(mod.state_dict())

        def f(x, conv_state=None, seq_idx=None):
            return m(x, conv_state=conv_state, seq_idx=seq_idx, activation="silu")
        f.params = dict(m.named_parameters())
        return f
    return fn_mod


def conv_inputs(b, L, ch, K, seq=False, state=False, wide=True):
    def make():
        gen = torch.Generator(device=DEV).manual_seed(L + ch)
        buf = torch.randn(b, L, ch + 64 if wide else ch, generator=gen, device=DEV)
        d = {"x": buf[..., 32:32 + ch] if wide else buf}        # a slice of a wider buffer, like in_proj's split
        if state:
            d["conv_state"] = torch.randn(b, K - 1, ch, generator=gen, device=DEV)
        if seq:
            d["seq_idx"] = torch.sort(torch.randint(0, 4, (b, L), generator=gen, device=DEV), dim=1).values.int()
        return d
    return make


def norm_fn(d, ngroups, nbg=False):
    torch.manual_seed(0)
    w = torch.randn(d, device=DEV) * 0.5 + 1

    def fn_mod(dtype):
        m = GatedRMSNorm(d, d // ngroups, norm_before_gate=nbg).to(DEV, dtype)
        with torch.no_grad():
            m.weight.copy_(w)

        def f(y, z):
            return m(y, z)
        f.params = dict(m.named_parameters())
        return f
    return fn_mod


def norm_inputs(rows, d):
    def make():
        gen = torch.Generator(device=DEV).manual_seed(rows + d)
        zbuf = torch.randn(rows, 2 * d, generator=gen, device=DEV)
        return {"y": torch.randn(rows, d, generator=gen, device=DEV), "z": zbuf[:, d:]}
    return make


def check():
    cases = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cases += [
            (f"conv_2.7b_ch5376_L2048_{tag}", conv_fn(5376, 4), conv_inputs(2, 2048, 5376, 4), dtype),
            (f"conv_seq_state_L1000_{tag}", conv_fn(1792, 4), conv_inputs(3, 1000, 1792, 4, seq=True, state=True),
             dtype),
            (f"conv_update_b64_L1_{tag}", conv_fn(5376, 4), conv_inputs(64, 1, 5376, 4, state=True), dtype),
            (f"norm_d5120_g1_{tag}", norm_fn(5120, 1), norm_inputs(4096, 5120), dtype),
            (f"norm_d2048_g8_nbg_{tag}", norm_fn(2048, 8, nbg=True), norm_inputs(3000, 2048), dtype),
        ]
    ok = True
    out = {}
    for name, fn_mod, make, dtype in cases:
        e = compare(fn_mod, make, dtype, "on")
        budget = 2e-2 if dtype == torch.bfloat16 else 1e-5
        bad = {k: v for k, v in e.items() if not v <= budget}
        ok &= not bad
        out[name] = e
        print(f"{'OK ' if not bad else 'BAD'} {name:30s} budget {budget:.0e} " +
              " ".join(f"{k}={v:.1e}" for k, v in e.items()), flush=True)
    ok &= check_mixer(out)
    return ok, out


def mixer_config(d_model):
    return Mamba2Config(d_model=d_model, n_layer=1, vocab_size=256, d_state=128, headdim=64, expand=2,
                        chunk_size=256)


def check_mixer(out):
    """A whole mixer in bf16, kernels on and off, each against the same mixer in fp32 with the torch code."""
    torch.manual_seed(0)
    ref = Mamba2Mixer(mixer_config(768)).to(DEV)
    u = torch.randn(2, 1000, 768, device=DEV)
    g = torch.randn(2, 1000, 768, device=DEV)
    res = {}
    for mode in ("on", "off", "ref"):
        m = Mamba2Mixer(mixer_config(768)).to(DEV, torch.float32 if mode == "ref" else torch.bfloat16)
        m.load_state_dict(ref.state_dict())
        x = u.to(m.in_proj.weight.dtype).requires_grad_(True)
        with kernels("off" if mode == "ref" else mode):
            y = m(x)
            (y.float() * g).sum().backward()
        res[mode] = (y.float(), x.grad.float(), {k: p.grad.float() for k, p in m.named_parameters()})
    errs = {}
    for mode in ("on", "off"):
        y, dx, gp = res[mode]
        errs[f"{mode}:y"] = rel(y, res["ref"][0])
        errs[f"{mode}:du"] = rel(dx, res["ref"][1])
        errs[f"{mode}:dparams_max"] = max(rel(gp[k], res["ref"][2][k]) for k in gp)
    ok = all(errs[f"on:{k}"] <= max(2e-2, 1.5 * errs[f"off:{k}"]) for k in ("y", "du", "dparams_max"))
    out["mixer_bf16_vs_fp32"] = errs
    print(f"{'OK ' if ok else 'BAD'} mixer bf16 vs fp32 (on must be <= max(2e-2, 1.5x off)) " +
          " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
    return ok


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------

def time_pair(make_call, modes=("on", "off")):
    """{mode: (fwd ms, fwd+bwd ms)} for a callable factory make_call() -> (fwd, fwd_bwd)."""
    res = {}
    for mode in modes:
        with kernels(mode):
            f, fb = make_call()
            with torch.no_grad():
                tf = bench(f, rep=30)
            tb = bench(fb, rep=30)
        res[mode] = (tf, tb)
        del f, fb
        torch.cuda.empty_cache()
    return res


def conv_calls(b, L, ch):
    m = CausalConv1d(ch, 4).to(DEV, torch.bfloat16)
    buf = torch.randn(b, L, ch + 256, device=DEV, dtype=torch.bfloat16)
    x = buf[..., :ch]
    xg = buf[..., :ch].detach().clone().requires_grad_(True)
    g = torch.randn(b, L, ch, device=DEV, dtype=torch.bfloat16)
    return (lambda: m(x, activation="silu")), (lambda: m(xg, activation="silu")[0].backward(g))


def norm_calls(rows, d, ngroups):
    m = GatedRMSNorm(d, d // ngroups).to(DEV, torch.bfloat16)
    y = torch.randn(rows, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    z = torch.randn(rows, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(rows, d, device=DEV, dtype=torch.bfloat16)
    return (lambda: m(y, z)), (lambda: m(y, z).backward(g))


def mixer_calls(d_model, b, L, official=None):
    cfg = mixer_config(d_model)
    if official is None:
        m = Mamba2Mixer(cfg).to(DEV, torch.bfloat16)
    else:
        m = official(d_model, d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
                     use_mem_eff_path=False, device=DEV, dtype=torch.bfloat16)
    u = torch.randn(b, L, d_model, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(u)
    return (lambda: m(u)), (lambda: m(u).backward(g))


def profile_mixer(d_model, b, L):
    with kernels("on"):
        f, fb = mixer_calls(d_model, b, L)
        profile(fb, f"mixer d_model {d_model}, kernels on, fwd+bwd, {b} x {L}", rows=16)


def run_bench(outdir: Path):
    tbs = copy_tbs()
    print(f"copy bandwidth {tbs:.2f} TB/s")
    official = import_oracle("modules.mamba2", "Mamba2")
    rows = []
    T = 65536

    def add(name, res, floor_fwd_bytes=None, extra=None):
        r = {"name": name, **{f"{k}_fwd": v[0] for k, v in res.items()}, **{f"{k}_fb": v[1] for k, v in res.items()}}
        if floor_fwd_bytes:
            r["floor_fwd_ms"] = floor_fwd_bytes / (tbs * 1e12) * 1e3
        r.update(extra or {})
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)

    ch = 5376   # the 2.7b model's conv channels: d_ssm 5120 + 2·ngroups·d_state
    add(f"conv1d+silu bf16, {T} tokens x {ch} ch", time_pair(lambda: conv_calls(32, 2048, ch)),
        floor_fwd_bytes=2 * T * ch * 2)
    for d, ng in ((5120, 1), (2048, 8)):
        add(f"gated RMSNorm bf16, {T} rows x d {d}, {ng} group(s)", time_pair(lambda: norm_calls(T, d, ng)),
            floor_fwd_bytes=3 * T * d * 2)
    m = CausalConv1d(ch, 4).to(DEV, torch.bfloat16)
    x1 = torch.randn(64, 1, ch, device=DEV, dtype=torch.bfloat16)
    st = torch.randn(64, 3, ch, device=DEV, dtype=torch.bfloat16)
    upd = {}
    for mode in ("on", "off"):
        with kernels(mode), torch.no_grad():
            upd[mode] = (bench(lambda: m(x1, conv_state=st, activation="silu")), float("nan"))
    add(f"conv1d decode update, batch 64 x {ch} ch (fwd only)", upd, floor_fwd_bytes=64 * ch * 2 * (1 + 3 + 1 + 3))
    for d_model, b, L in ((768, 32, 2048), (2560, 8, 2048)):
        res = time_pair(lambda: mixer_calls(d_model, b, L))
        if official is not None:
            try:
                f, fb = mixer_calls(d_model, b, L, official)
                with torch.no_grad():
                    tf = bench(f, rep=30)
                res["official"] = (tf, bench(fb, rep=30))
                del f, fb
            except Exception as e:  # noqa: BLE001
                print("official mixer failed:", repr(e)[:300])
            torch.cuda.empty_cache()
        add(f"Mamba-2 mixer d_model {d_model} bf16, {b} x {L}", res)
    profile_mixer(768, 32, 2048)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
           "copy_TBs": tbs, "rows": rows}
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "layers_gpu.json").write_text(json.dumps(res, indent=1))
    print_table(res)
    return res


def print_table(res):
    print(f"\nLayer kernels, median ms ({res['device']}, {res['date']}); on = Triton conv + norm + SSD, "
          f"off = torch conv + norm with the Triton SSD")
    print("| what | on fwd | off fwd | official fwd | on f+b | off f+b | official f+b | on/off f+b | on/official f+b "
          "| floor fwd |")
    print("|---" * 10 + "|")
    for r in res["rows"]:
        def g(k):
            v = r.get(k)
            return "—" if v is None or v != v else f"{v:.3f}"
        ratio = r["on_fb"] / r["off_fb"] if r["off_fb"] == r["off_fb"] else float("nan")
        ro = f"{r['on_fb'] / r['official_fb']:.2f}" if "official_fb" in r else "—"
        print(f"| {r['name']} | {g('on_fwd')} | {g('off_fwd')} | {g('official_fwd')} | {g('on_fb')} | {g('off_fb')} "
              f"| {g('official_fb')} | {ratio:.2f} | {ro} | {g('floor_fwd_ms')} |")


def conv_variants(outdir: Path, b: int = 32, L: int = 2048, ch: int = 5376, only: str | None = None) -> list[dict]:
    """Forward+backward ms of the conv (bf16, SiLU, the 2.7b width) for launch parameters of its two backward
    kernels: pass 1 ("bwd": dpre, and dweight by a reduction per tap and tile, docs/triton_notes.md) over
    warps × token block × channel block, then pass 2
    ("dx") over warps × token block; the default first. ``only``: just the default and the variants of that
    tuning entry whose parameters include it as a key (e.g. "BC")."""
    from itertools import product

    from mamba2.layers.triton.conv import TUNING

    rows = []
    variants = [{}] + [{"bwd": dict(num_warps=w, BT=bt, BC=bc)} for w, bt, bc in product((1, 2, 4, 8), (16, 32, 64),
                                                                                         (32, 64, 128))]
    variants += [{"dx": dict(num_warps=w, BT=bt)} for w, bt in product((2, 4, 8), (32, 64, 128))]
    if only is not None:
        variants = [v for v in variants if not v or any(only in p for p in v.values())]
    with kernels("on"):
        _, fb = conv_calls(b, L, ch)
        for over in variants:
            with TUNING.tuned(**over):
                try:
                    ms = bench(fb, rep=30)
                except Exception as e:  # noqa: BLE001  (a launch that does not fit: recorded, not fatal)
                    ms, over = float("nan"), {**over, "error": repr(e)[:120]}
            rows.append({"over": over, "fb_ms": ms})
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["fb_ms"]
    print(f"\nconv1d+silu fwd+bwd, {b} x {L} x {ch} bf16, default {base:.3f} ms; the ten fastest:")
    for r in sorted(rows, key=lambda r: r["fb_ms"] if r["fb_ms"] == r["fb_ms"] else math.inf)[:10]:
        print(f"  {r['fb_ms']:.3f} ms ({r['fb_ms'] / base:.2f}x)  {r['over'] or 'default'}")
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "conv_variants.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                           "date": time.strftime("%Y-%m-%d %H:%M"),
                                                           "shape": [b, L, ch], "rows": rows}, indent=1))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--conv-variants", action="store_true")
    ap.add_argument("--conv-only", default=None, metavar="PARAM",
                    help="with --conv-variants: only the default and the variants that set PARAM (e.g. BC)")
    ap.add_argument("--out", default="runs/layers_gpu")
    a = ap.parse_args()
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton",
          __import__("triton").__version__)
    ok = True
    t0 = time.time()
    if a.check:
        ok &= check()[0]
        print(f"check done in {time.time() - t0:.0f}s", flush=True)
    if a.bench:
        run_bench(Path(a.out))
        print(f"bench done in {time.time() - t0:.0f}s", flush=True)
    if a.conv_variants:
        conv_variants(Path(a.out), only=a.conv_only)
        print(f"conv variants done in {time.time() - t0:.0f}s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
