"""The SSD family: recurrent = quadratic = chunked (docs/design.md §5: 1–8, 14–16) on fresh random inputs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import rel_err, ssd_inputs
from mamba2.ssd import (backends, seq_idx_from_cu_seqlens, ssd, ssd_chunked, ssd_quadratic, ssd_recurrent,
                        ssd_step)

FORMS = {"quadratic": ssd_quadratic, "chunked": ssd_chunked}


def _run(fn, args, kw, **extra):
    return fn(**args, **kw, return_final_states=True, **extra)


# (batch, L, nheads, headdim, ngroups, d_state, chunk_size): L = 1, Q-1, Q, Q+1, 3Q+7, several chunks.
SHAPES = [
    (2, 1, 4, 3, 1, 5, 8),
    (2, 7, 4, 3, 2, 5, 8),
    (1, 8, 4, 4, 4, 6, 8),
    (2, 9, 6, 2, 3, 4, 8),
    (2, 31, 4, 3, 2, 5, 8),
    (3, 40, 8, 2, 8, 3, 5),
    (1, 64, 2, 4, 1, 8, 16),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_seq_idx", [False, True])
@pytest.mark.parametrize("D_per_channel", [False, True])
def test_three_forms_agree_float64(shape, with_seq_idx, D_per_channel):
    b, L, h, p, g, n, Q = shape
    for seed in (0, 1):
        args, kw = ssd_inputs(b, L, h, p, g, n, seed=seed, with_seq_idx=with_seq_idx, D_per_channel=D_per_channel)
        y_ref, s_ref = _run(ssd_recurrent, args, kw)
        for name, fn in FORMS.items():
            y, s = _run(fn, args, kw, chunk_size=Q)
            assert rel_err(y, y_ref) <= 1e-10, name
            assert rel_err(s, s_ref) <= 1e-10, name


@pytest.mark.parametrize("shape", SHAPES[1::2])
def test_float32_within_budget(shape):
    b, L, h, p, g, n, Q = shape
    args, kw = ssd_inputs(b, L, h, p, g, n, seed=3, with_seq_idx=True)
    y_ref, s_ref = _run(ssd_recurrent, args, kw)
    a32 = {k: v.float() for k, v in args.items()}
    k32 = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items()}
    for fn in (ssd_recurrent, ssd_quadratic, ssd_chunked):
        y, s = _run(fn, a32, k32, chunk_size=Q)
        assert y.dtype == torch.float32 and s.dtype == torch.float32
        assert rel_err(y, y_ref) <= 1e-4 and rel_err(s, s_ref) <= 1e-4


def test_bf16_inputs_fp32_math():
    args, kw = ssd_inputs(2, 70, 4, 8, 2, 16, seed=4, dtype=torch.bfloat16)
    a64 = {k: v.double() for k, v in args.items()}
    k64 = {k: v.double() for k, v in kw.items()}
    y_ref, s_ref = _run(ssd_recurrent, a64, k64)
    y, s = _run(ssd_chunked, args, kw, chunk_size=16)
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32       # state stays fp32 (docs/design.md §5.14)
    assert rel_err(y, y_ref) <= 2e-2 and rel_err(s, s_ref) <= 2e-2


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), L=st.integers(1, 40), g=st.sampled_from([1, 2]), r=st.integers(1, 3),
       p=st.integers(1, 4), n=st.integers(1, 6), Q=st.integers(1, 17), seq=st.booleans(), seed=st.integers(0, 99))
def test_property_chunked_equals_recurrent(b, L, g, r, p, n, Q, seq, seed):
    args, kw = ssd_inputs(b, L, g * r, p, g, n, seed=seed, with_seq_idx=seq)
    y_ref, s_ref = _run(ssd_recurrent, args, kw)
    y, s = _run(ssd_chunked, args, kw, chunk_size=Q)
    assert rel_err(y, y_ref) <= 1e-10 and rel_err(s, s_ref) <= 1e-10


def _grads(fn, args, kw, **extra):
    y, s = fn(**args, **kw, return_final_states=True, **extra)
    gen = torch.Generator().manual_seed(7)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum() + \
        (s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    inputs = {**args, **{k: v for k, v in kw.items() if v.is_floating_point()}}
    return dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


@pytest.mark.parametrize("shape", [(2, 9, 4, 3, 2, 5, 8), (1, 37, 4, 2, 4, 3, 8), (2, 17, 2, 2, 1, 4, 4)])
@pytest.mark.parametrize("with_seq_idx", [False, True])
def test_gradients_match_recurrence(shape, with_seq_idx):
    b, L, h, p, g, n, Q = shape
    args, kw = ssd_inputs(b, L, h, p, g, n, seed=5, with_seq_idx=with_seq_idx, requires_grad=True)
    ref = _grads(ssd_recurrent, args, kw)
    for name, fn in FORMS.items():
        got = _grads(fn, args, kw, chunk_size=Q)
        for k in ref:
            assert rel_err(got[k], ref[k]) <= 1e-9, (name, k)


@pytest.mark.parametrize("optional", ["D", "z", "dt_bias", "dt_limit", "initial_states", "seq_idx"])
def test_gradcheck_each_optional_input(optional):
    args, kw = ssd_inputs(1, 6, 2, 2, 1, 3, seed=6, with_seq_idx=True, requires_grad=True)
    extra = {}
    if optional == "dt_limit":
        extra["dt_limit"] = (0.2, 1.5)
    keep = {k: kw[k] for k in kw if k == optional}
    tensors = list(args.values()) + [v for v in keep.values() if v.is_floating_point()]
    names = list(args) + [k for k, v in keep.items() if v.is_floating_point()]

    def f(*ts):
        d = dict(zip(names, ts))
        a = {k: d[k] for k in args}
        k2 = {k: d.get(k, keep[k]) for k in keep}
        y, s = ssd_chunked(**a, **k2, chunk_size=4, return_final_states=True, **extra)
        return y, s

    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("regime", ["large_decay", "tiny_dt", "mixed"])
def test_extreme_decay_is_finite_and_exact(regime):
    if regime == "large_decay":
        A_scale, dt_shift = 2000.0, 12.0          # |A·dt| ~ 1e4 per token
    elif regime == "tiny_dt":
        A_scale, dt_shift = 3.0, -25.0            # dt ~ 1e-11
    else:
        A_scale, dt_shift = 60.0, 3.0
    args, kw = ssd_inputs(2, 45, 4, 4, 2, 8, seed=8, A_scale=A_scale, dt_shift=dt_shift, requires_grad=True)
    y_ref, s_ref = _run(ssd_recurrent, args, kw)
    a32 = {k: v.detach().float().requires_grad_() for k, v in args.items()}
    k32 = {k: v.detach().float().requires_grad_() for k, v in kw.items()}
    y, s = _run(ssd_chunked, a32, k32, chunk_size=16)
    assert rel_err(y, y_ref) <= 1e-4 and rel_err(s, s_ref) <= 1e-4
    (y.sum() + s.sum()).backward()
    for t in list(a32.values()) + list(k32.values()):
        assert torch.isfinite(t.grad).all()
    # a later decode step from that state stays finite and exact too
    st64, st32 = s_ref.detach().clone(), s.detach().clone()
    x1 = torch.randn(2, 4, 4, dtype=torch.float64)
    dt1 = torch.full((2, 4), dt_shift, dtype=torch.float64)
    B1, C1 = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 2, 8, dtype=torch.float64)
    A = args["A"].detach()
    y64 = ssd_step(st64, x1, dt1, A, B1, C1)
    y32 = ssd_step(st32, x1.float(), dt1.float(), A.float(), B1.float(), C1.float())
    assert rel_err(y32, y64) <= 1e-4


def test_segment_sums_never_positive():
    from mamba2.ssd import segsum
    dA = -torch.rand(3, 64, dtype=torch.float32) * 1e4
    s = segsum(dA)
    assert (s[torch.isfinite(s)] <= 0).all()


def test_groups_contiguous_blocks_of_heads():
    """Head h reads group h // (H/G) (not h % G): each head alone with its own group's B, C agrees."""
    b, L, h, p, g, n = 2, 13, 8, 2, 4, 3
    args, kw = ssd_inputs(b, L, h, p, g, n, seed=9)
    kw.pop("z")
    y, s = _run(ssd_chunked, args, kw, chunk_size=4)
    r = h // g
    for head in range(h):
        grp = head // r
        one = dict(x=args["x"][:, :, head:head + 1], dt=args["dt"][:, :, head:head + 1], A=args["A"][head:head + 1],
                   B=args["B"][:, :, grp:grp + 1], C=args["C"][:, :, grp:grp + 1])
        okw = dict(D=kw["D"][head:head + 1], dt_bias=kw["dt_bias"][head:head + 1],
                   initial_states=kw["initial_states"][:, head:head + 1])
        yh, sh = _run(ssd_recurrent, one, okw)
        assert rel_err(y[:, :, head:head + 1], yh) <= 1e-10
        assert rel_err(s[:, head:head + 1], sh) <= 1e-10


def test_causality():
    args, kw = ssd_inputs(2, 30, 4, 3, 2, 4, seed=10)
    y = ssd_chunked(**args, **kw, chunk_size=8)
    for t in (0, 7, 8, 19, 29):
        a2 = {k: v.clone() for k, v in args.items()}
        for k in ("x", "dt", "B", "C"):
            a2[k][:, t] += torch.randn_like(a2[k][:, t])
        y2 = ssd_chunked(**a2, **kw, chunk_size=8)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert not torch.equal(y2[:, t], y[:, t])


@pytest.mark.parametrize("lengths", [[5, 1, 12, 3], [2, 2, 2], [17, 9], [1]])
@pytest.mark.parametrize("Q", [4, 8])
def test_packed_equals_separate(lengths, Q):
    """Documents packed in one row (seq_idx) = each alone, outputs, final state and gradients (docs/design.md §5.8)."""
    h, p, g, n = 4, 2, 2, 3
    total = sum(lengths)
    args, kw = ssd_inputs(1, total, h, p, g, n, seed=11, requires_grad=True)
    kw = {"D": kw["D"], "dt_bias": kw["dt_bias"]}
    cu = torch.tensor([0] + lengths).cumsum(0)
    seq_idx = seq_idx_from_cu_seqlens(cu)
    y, s = ssd_chunked(**args, **kw, seq_idx=seq_idx, chunk_size=Q, return_final_states=True)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), list(args.values()))
    ys, sep_grads = [], [torch.zeros_like(v) for v in args.values()]
    for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[:, a:e] if v.dim() > 1 else v) for k, v in args.items()}
        yi, si = ssd_recurrent(**part, **kw, return_final_states=True)
        ys.append(yi)
        gi = torch.autograd.grad((yi * gy[:, a:e]).sum(), list(args.values()))
        sep_grads = [acc + gg for acc, gg in zip(sep_grads, gi)]
    assert rel_err(y, torch.cat(ys, dim=1)) <= 1e-10
    assert rel_err(s, si) <= 1e-10
    for got, ref in zip(grads, sep_grads):
        assert rel_err(got, ref) <= 1e-10


def test_initial_states_used_at_batch_one_and_get_gradient():
    for b in (1, 3):
        args, kw = ssd_inputs(b, 11, 2, 3, 1, 4, seed=12, requires_grad=True)
        kw = {"initial_states": kw["initial_states"]}
        y0 = ssd_chunked(**args, chunk_size=4)
        y = ssd_chunked(**args, **kw, chunk_size=4)
        assert rel_err(y0, y) > 1e-3
        g_ref = _grads(ssd_recurrent, args, kw)["initial_states"]
        g = _grads(ssd_chunked, args, kw, chunk_size=4)["initial_states"]
        assert g.abs().sum() > 0 and rel_err(g, g_ref) <= 1e-10


@pytest.mark.parametrize("D_per_channel", [False, True])
def test_step_by_step_equals_scan(D_per_channel):
    b, L, h, p, g, n = 2, 9, 4, 3, 2, 5
    args, kw = ssd_inputs(b, L, h, p, g, n, seed=13, D_per_channel=D_per_channel)
    y_ref, s_ref = _run(ssd_chunked, args, kw, chunk_size=4)
    state = kw["initial_states"].clone()
    ys = [ssd_step(state, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t],
                   D=kw["D"], z=kw["z"][:, t], dt_bias=kw["dt_bias"]) for t in range(L)]
    assert rel_err(torch.stack(ys, 1), y_ref) <= 1e-10 and rel_err(state, s_ref) <= 1e-10


def test_step_inactive_rows_untouched():
    b, h, p, g, n = 4, 4, 3, 2, 5
    state = torch.randn(b, h, p, n)
    before = state.clone()
    active = torch.tensor([True, False, True, False])
    ssd_step(state, torch.randn(b, h, p), torch.randn(b, h), -torch.rand(h), torch.randn(b, g, n),
             torch.randn(b, g, n), active=active)
    assert torch.equal(state[~active], before[~active])
    assert not torch.equal(state[active], before[active])


def test_dispatcher_and_errors():
    args, kw = ssd_inputs(1, 5, 2, 2, 1, 3, seed=14)
    assert "chunked" in backends()
    y = ssd(**args, chunk_size=4)
    assert rel_err(y, ssd_recurrent(**args)) <= 1e-10
    with pytest.raises(ValueError, match="unknown SSD backend"):
        ssd(**args, backend="nope")
    with pytest.raises(ValueError, match="dt must have shape"):
        ssd(args["x"], args["dt"][:, :-1], args["A"], args["B"], args["C"])
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(**args, chunk_size=0)
    with pytest.raises(ValueError, match="nheads % ngroups"):
        a = dict(args, B=torch.randn(1, 5, 3, 3, dtype=torch.float64), C=torch.randn(1, 5, 3, 3, dtype=torch.float64))
        ssd(**a)
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_idx_from_cu_seqlens(torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got dtype torch.int64"):
        ssd(**dict(args, x=torch.ones_like(args["x"], dtype=torch.int64)))
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match="^x must be a torch.Tensor, got numpy.ndarray$"):
        ssd(**dict(args, x=args["x"].numpy()))
    with pytest.raises(ValueError, match="^D must be a torch.Tensor, got list$"):
        ssd(**args, D=[1.0, 2.0])
    with pytest.raises(ValueError, match="^B must be a torch.Tensor, got numpy.ndarray$"):
        ssd_step(torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2), torch.zeros(1, 2), -torch.ones(2),
                 np.zeros((1, 1, 3)), torch.zeros(1, 1, 3))
    with pytest.raises(ValueError, match="x must be a floating-point tensor"):
        ssd_step(torch.zeros(1, 2, 2, 3), torch.ones(1, 2, 2, dtype=torch.int32), torch.zeros(1, 2), -torch.ones(2),
                 torch.zeros(1, 1, 3), torch.zeros(1, 1, 3))


def test_autocast_bf16_close_to_fp32():
    args, kw = ssd_inputs(2, 40, 4, 8, 2, 8, seed=15, dtype=torch.float32)
    ref = ssd_chunked(**args, **kw, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ssd_chunked(**args, **kw, chunk_size=16)
    assert rel_err(y, ref) <= 2e-2


def test_compile_matches_eager_without_recompiling_per_length():
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    fn = torch.compile(lambda **a: ssd_chunked(**a, chunk_size=8), backend=counting_backend)
    for L in (19, 45):
        args, kw = ssd_inputs(2, L, 4, 2, 2, 3, seed=L, dtype=torch.float32)
        kw.pop("initial_states")
        assert rel_err(fn(**args, **kw), ssd_chunked(**args, **kw, chunk_size=8)) <= 1e-5
    first = len(compiles)
    for L in (33, 90):
        args, kw = ssd_inputs(2, L, 4, 2, 2, 3, seed=L, dtype=torch.float32)
        kw.pop("initial_states")
        fn(**args, **kw)
    assert len(compiles) == first, "recompiled for a new sequence length"


@pytest.mark.parametrize("backend", ["recurrent", "quadratic", "chunked"])
@pytest.mark.parametrize("Q", [4, 16])
def test_cu_seqlens_final_states_are_each_documents_own(backend, Q):
    """cu_seqlens: one final state per document (docs/design.md §7), equal to that document run alone, for
    documents that are empty, shorter than a chunk, start mid-chunk or span chunks; the first one starts from the
    initial state. Outputs and the gradients through the states equal the separate runs too."""
    lengths = [3, 0, 1, Q - 1, Q + 1, 2 * Q + 5, 2]
    h, p, g, n = 4, 2, 2, 3
    total = sum(lengths)
    args, kw = ssd_inputs(1, total, h, p, g, n, seed=21, requires_grad=True)
    kw = {"D": kw["D"], "dt_bias": kw["dt_bias"], "z": kw["z"], "initial_states": kw["initial_states"]}
    cu = torch.tensor([0] + lengths).cumsum(0)
    y, s = ssd(**args, **kw, cu_seqlens=cu, chunk_size=Q, return_final_states=True, backend=backend)
    assert s.shape == (len(lengths), h, p, n)
    w = torch.randn_like(s)
    leaves = list(args.values()) + [kw["initial_states"]]
    grads = torch.autograd.grad((y.sum() + (s * w).sum()), leaves)
    ref_grads = [torch.zeros_like(v) for v in leaves]
    for k, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        init = kw["initial_states"] if k == 0 else torch.zeros_like(kw["initial_states"])
        if a == e:
            assert torch.equal(s[k], init[0])
            continue
        part = {name: (v[:, a:e] if v.dim() > 1 else v) for name, v in args.items()}
        yk, sk = ssd_recurrent(**part, D=kw["D"], dt_bias=kw["dt_bias"], z=kw["z"][:, a:e], initial_states=init,
                               return_final_states=True)
        assert rel_err(y[:, a:e], yk) <= 1e-10, k
        assert rel_err(s[k], sk[0]) <= 1e-10, k
        gk = torch.autograd.grad(yk.sum() + (sk[0] * w[k]).sum(), leaves, allow_unused=True)
        ref_grads = [acc + (0 if gg is None else gg) for acc, gg in zip(ref_grads, gk)]
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref) <= 1e-10


def test_cu_seqlens_is_checked():
    args, _ = ssd_inputs(1, 10, 2, 2, 1, 3, seed=3)
    good = torch.tensor([0, 4, 10])
    for bad, match in ((torch.tensor([0, 4, 9]), "end at the packed length 10"),
                       (torch.tensor([0, 6, 4, 10]), "never decrease"),
                       (torch.tensor([1, 10]), "start at 0"),
                       (torch.tensor([0.0, 10.0]), "integer"),
                       (torch.tensor([10]), "1-D integer tensor")):
        with pytest.raises(ValueError, match=match):
            ssd(**args, cu_seqlens=bad)
    with pytest.raises(ValueError, match="not both"):
        ssd(**args, cu_seqlens=good, seq_idx=torch.zeros(1, 10, dtype=torch.int32))
    args2, kw2 = ssd_inputs(2, 10, 2, 2, 1, 3, seed=3)
    with pytest.raises(ValueError, match=r"one packed row: x must have batch 1, got 2"):
        ssd(**args2, cu_seqlens=good)
    with pytest.raises(ValueError, match="first document, which is empty"):
        ssd(**args, cu_seqlens=torch.tensor([0, 0, 10]), initial_states=kw2["initial_states"][:1])
