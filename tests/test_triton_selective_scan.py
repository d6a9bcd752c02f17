"""Triton selective scan (mamba2/layers/triton/selective_scan.py) under TRITON_INTERPRET=1 on CPU, against the
sequential reference ``selective_scan_recurrent`` in float64 on the same (rounded) inputs: y, the final state and
every gradient (u, delta, A, B, C, D, z, delta_bias, initial_state) through ``selective_scan`` with
kernels("on"). Cases: several checkpoint chunks and channel blocks, d_state not a power of two, packed documents
(a boundary right after a chunk start, one-token documents), no initial state and no final-state gradient, L = 1,
inputs that are slices of wider buffers (the Mamba-1 mixer's x_proj split), bf16 and fp16 inputs, and dB/dC by
the partial-sum buffer (the default at these sizes) and by atomic adds.

TRITON_INTERPRET must be set before Triton is imported, so every interpreted run happens in ONE subprocess (this
file run as a script) that prints the relative errors as JSON. On a GPU the same cases run compiled:
``MAMBA2_TEST_DEVICE=cuda python -m pytest tests/test_triton_selective_scan.py``.
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
F32, HALF = 1e-4, 2e-2
DEVICE = os.environ.get("MAMBA2_TEST_DEVICE", "cpu")
SMALL = {"fwd": dict(BT=4, CH=8, BD_MAX=8), "bwd": dict(BT=4, BD_MAX=8)}

# name: (batch, L, d_inner, d_state, options). Options: seq (document lengths per row), no_init (no initial state),
# no_dh (the final state is not used by the loss), noncontig, dtype, cfg (TUNING overrides).
CASES = {
    "chunks_blocks_seq_init": (2, 37, 20, 6, dict(seq=[[8, 1, 1, 27], [37]], cfg=SMALL)),
    "defaults_n16": (1, 29, 24, 16, dict()),
    # default blocks (16 tokens forward, 8 backward) and checkpoints every 64 over several chunks; resets on a
    # block's last row (63), at a chunk start (64) and a block start (80), a ragged tail
    "default_blocks_chunks_seq": (1, 150, 12, 5, dict(seq=[[63, 1, 16, 70]])),
    "no_init_no_dh": (1, 21, 12, 4, dict(no_init=True, no_dh=True, cfg=SMALL)),
    "L1": (3, 1, 10, 5, dict(cfg=SMALL)),
    "noncontig_seq": (2, 19, 16, 8, dict(noncontig=True, seq=[[3, 16], [19]], cfg=SMALL)),
    "bf16_seq": (2, 33, 20, 6, dict(dtype="bf16", seq=[[9, 24], [33]], cfg=SMALL)),
    "fp16": (2, 17, 12, 4, dict(dtype="fp16", cfg=SMALL)),
    # dB and dC by atomic adds (a partial-sum buffer over PART_BYTES) rather than by the buffer torch sums
    "atomics_chunks_blocks_seq_init": (2, 37, 20, 6, dict(seq=[[8, 1, 1, 27], [37]],
                                                         cfg={**SMALL, "bwd": {**SMALL["bwd"], "PART_BYTES": 0}})),
    "atomics_defaults_n16": (1, 29, 24, 16, dict(cfg={"bwd": dict(PART_BYTES=0)})),
}


def _case(name, spec):
    import torch
    from conftest import rel_err as _rel
    from mamba2 import kernels
    from mamba2.layers.selective_scan import selective_scan, selective_scan_recurrent
    from mamba2.layers.triton import selective_scan as TS

    def rel_err(out, ref):
        return _rel(out.detach().cpu(), ref.detach().cpu())

    b, L, d, n, o = spec
    dev = DEVICE
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(o.get("dtype"), torch.float32)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    vals = dict(u=r(b, L, d).to(dtype), delta=(r(b, L, d) * 0.5).to(dtype),
                A=(-torch.rand(d, n, generator=gen, dtype=torch.float64) * 2 - 0.2).float(),
                B=r(b, L, n).to(dtype), C=r(b, L, n).to(dtype), D=r(d).float(), z=r(b, L, d).to(dtype),
                delta_bias=(r(d) * 0.3).float(), initial_state=None if o.get("no_init") else (r(b, d, n) * 0.5).float())
    seq_idx = None
    if "seq" in o:
        seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in o["seq"]])
    gy, gh = r(b, L, d), r(b, d, n)

    def run(inputs, fn, device):
        y, h = fn(**inputs, delta_softplus=True, seq_idx=None if seq_idx is None else seq_idx.to(device),
                  return_final_state=True)
        loss = (y * gy.to(device, y.dtype)).sum() + (0 if o.get("no_dh") else (h * gh.to(device, h.dtype)).sum())
        loss.backward()
        return y, h

    ref = {k: None if v is None else v.double().requires_grad_() for k, v in vals.items()}
    y_ref, h_ref = run(ref, selective_scan_recurrent, "cpu")

    leaves = {k: None if v is None else v.clone().to(dev).requires_grad_() for k, v in vals.items()}
    inputs = dict(leaves)
    if o.get("noncontig"):        # u and B/C as slices of wider buffers, as the mixer's splits hand them over
        wide_u = torch.zeros(b, L, 3 * d, dtype=dtype, device=dev)
        wide_u[..., d:2 * d] = vals["u"].to(dev)
        wide_bc = torch.zeros(b, L, 2 * n + 3, dtype=dtype, device=dev)
        wide_bc[..., 3:3 + n], wide_bc[..., 3 + n:] = vals["B"].to(dev), vals["C"].to(dev)
        leaves["u"], leaves["B"] = wide_u.requires_grad_(), wide_bc.requires_grad_()
        inputs.update(u=wide_u[..., d:2 * d], B=wide_bc[..., 3:3 + n], C=wide_bc[..., 3 + n:])
        leaves["C"] = None
        assert not (inputs["u"].is_contiguous() or inputs["B"].is_contiguous())
    with TS.TUNING.tuned(**o.get("cfg", {})), kernels.kernels("on"):
        y, h = run(inputs, selective_scan, dev)
    errs = {"y": rel_err(y, y_ref), "final_state": rel_err(h, h_ref),
            "dtypes_ok": float(y.dtype == dtype and h.dtype == torch.float32 and y.shape == (b, L, d))}
    for k, v in ref.items():
        if v is None:
            continue
        if o.get("noncontig") and k in ("u", "B", "C"):
            g = leaves["u" if k == "u" else "B"].grad
            got = {"u": lambda: g[..., d:2 * d], "B": lambda: g[..., 3:3 + n], "C": lambda: g[..., 3 + n:]}[k]()
            errs["d" + k] = rel_err(got, v.grad)
        else:
            errs["d" + k] = rel_err(leaves[k].grad, v.grad) if leaves[k].grad is not None else math.inf
    return errs


def _packed_case():
    """cu_seqlens (a packed prefill): each document's final state (empty documents keep zeros) and y, against
    each document scanned alone by the reference."""
    import torch
    from conftest import rel_err
    from mamba2 import kernels
    from mamba2.layers.selective_scan import selective_scan, selective_scan_recurrent
    from mamba2.layers.triton import selective_scan as TS

    gen = torch.Generator().manual_seed(7)
    L, d, n = 30, 12, 5
    cu = [0, 0, 7, 8, 30, 30]
    u, delta = torch.randn(1, L, d, generator=gen), torch.randn(1, L, d, generator=gen) * 0.5
    A = -torch.rand(d, n, generator=gen) - 0.2
    B, C = torch.randn(1, L, n, generator=gen), torch.randn(1, L, n, generator=gen)
    with TS.TUNING.tuned(**SMALL), kernels.kernels("on"), torch.no_grad():
        y, states = selective_scan(*(t.to(DEVICE) for t in (u, delta, A, B, C)), delta_softplus=True,
                                   cu_seqlens=torch.tensor(cu), return_final_state=True)
    ys, refs = [], []
    for a, b in zip(cu, cu[1:]):
        if a == b:
            refs.append(torch.zeros(d, n, dtype=torch.float64))
            continue
        yk, hk = selective_scan_recurrent(*(t[:, a:b].double() for t in (u, delta)), A.double(),
                                          *(t[:, a:b].double() for t in (B, C)), delta_softplus=True,
                                          return_final_state=True)
        ys.append(yk)
        refs.append(hk[0])
    ref = torch.stack(refs)
    return {"y": rel_err(y.cpu(), torch.cat(ys, 1)), "states": rel_err(states.cpu(), ref),
            "empty_zero": float(bool((states[0] == 0).all() and (states[-1] == 0).all())),
            "shape_ok": float(tuple(states.shape) == (len(cu) - 1, d, n))}


def _main():
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import torch
    torch.set_num_threads(2)
    from conftest import print_script_results
    print_script_results(**{name: functools.partial(_case, name, spec) for name, spec in CASES.items()},
                         packed=_packed_case)


@pytest.mark.parametrize("name", list(CASES))
def test_scan_output_state_and_every_gradient(kernel_results, name):
    errs = dict(kernel_results[name])
    assert "error" not in errs, errs
    assert errs.pop("dtypes_ok") == 1.0, name
    budget = HALF if CASES[name][4].get("dtype") else F32
    bad = {k: v for k, v in errs.items() if not v <= budget}
    assert not bad, f"{name}: over the budget {budget}: {bad}"


def test_packed_documents_leave_their_own_final_states(kernel_results):
    errs = dict(kernel_results["packed"])
    assert "error" not in errs, errs
    assert errs.pop("empty_zero") == 1.0 and errs.pop("shape_ok") == 1.0
    assert errs["y"] <= F32 and errs["states"] <= F32, errs


def test_a_checkpoint_interval_that_is_not_a_multiple_of_the_token_block_is_refused():
    """Refused before any launch (so on any device), naming both values."""
    import torch
    from mamba2.layers.triton import selective_scan as TS

    b, L, d, n = 1, 8, 4, 2
    args = (torch.rand(b, L, d), torch.randn(b, L, d), -torch.rand(d, n), torch.randn(b, L, n), torch.randn(b, L, n))
    with TS.TUNING.tuned(fwd=dict(BT=8, CH=12), bwd=dict(BT=16)), pytest.raises(ValueError, match=r"CH=12, BT=8 \(fwd\) and 16"):
        TS.selective_scan_triton(*args)


if __name__ == "__main__":
    _main()
