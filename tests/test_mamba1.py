"""The Mamba-1 selective scan and mixer: chunked scan = sequential recurrence (float64, every chunk boundary),
gradients by gradcheck, extreme decay, decode step, cache = forward, padding, packing, the official layout
(issue 5, docs/design.md §5: 1, 2, 6, 7, 8, 9, 16)."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mamba2.config import Mamba2Config
from mamba2.layers.mamba1 import Mamba1Mixer
from mamba2.layers.selective_scan import selective_scan, selective_scan_recurrent, selective_scan_step
from mamba2.models import Mamba2LM
from mamba2.interop.official import config_from_mamba_ssm

F64 = dict(dtype=torch.float64)


def scan_inputs(b=2, L=13, d=5, n=3, seed=0, dt_scale=1.0, a_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, **F64)
    return dict(u=r(b, L, d), delta=r(b, L, d) * dt_scale, A=-torch.rand(d, n, generator=g, **F64) * a_scale - 0.1,
                B=r(b, L, n), C=r(b, L, n)), dict(D=r(d), z=r(b, L, d), delta_bias=r(d), initial_state=r(b, d, n))


@pytest.mark.parametrize("Q", [1, 4, 8])
@pytest.mark.parametrize("L", [1, 3, 4, 5, 8, 19])
@pytest.mark.parametrize("seed", [0, 1])
def test_chunked_scan_equals_recurrence(Q, L, seed):
    x, opt = scan_inputs(L=L, seed=seed)
    seq_idx = torch.tensor([[0] * (L // 2) + [1] * (L - L // 2), [2] * L])
    for kw in (dict(), dict(opt, delta_softplus=True), dict(opt, delta_softplus=True, seq_idx=seq_idx)):
        y, h = selective_scan(**x, **kw, chunk_size=Q, return_final_state=True)
        y_ref, h_ref = selective_scan_recurrent(**x, **kw, return_final_state=True)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_recurrence_matches_official_reference_formula():
    """mamba_ssm's selective_scan_ref, in (b, d, L) layout: deltaA = exp(Δ·A), deltaB_u = Δ·B·u, y = h·C + D·u."""
    x, opt = scan_inputs(L=6)
    u, delta, A, B, C = (x[k] for k in "u delta A B C".split())
    dt = F.softplus(delta + opt["delta_bias"]).transpose(1, 2)                      # (b, d, L)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", dt, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", dt, B.transpose(1, 2), u.transpose(1, 2))
    h = torch.zeros(2, 5, 3, **F64)
    ys = []
    for t in range(6):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = (torch.stack(ys, 2) + u.transpose(1, 2) * opt["D"][:, None]) * F.silu(opt["z"].transpose(1, 2))
    out = selective_scan(**x, D=opt["D"], z=opt["z"], delta_bias=opt["delta_bias"], delta_softplus=True, chunk_size=4)
    torch.testing.assert_close(out, y.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_gradcheck_every_input():
    x, opt = scan_inputs(b=2, L=7, d=3, n=2)
    names = list(x) + list(opt)
    tensors = [t.clone().requires_grad_() for t in (*x.values(), *opt.values())]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0] * 7])

    def f(*ts):
        kw = dict(zip(names, ts))
        y, h = selective_scan(**kw, delta_softplus=True, seq_idx=seq_idx, chunk_size=3, return_final_state=True)
        return y, h

    assert torch.autograd.gradcheck(f, tensors)


def test_gradients_match_recurrence_with_checkpointed_chunks():
    x, opt = scan_inputs(L=40, d=4, n=3)
    leaves = {k: v.clone().requires_grad_() for k, v in {**x, **opt}.items()}
    g = torch.randn(2, 40, 4, **F64)
    grads = []
    for fn, kw in ((selective_scan, dict(chunk_size=8)), (selective_scan_recurrent, {})):
        y = fn(**leaves, delta_softplus=True, **kw)
        grads.append(torch.autograd.grad(y, list(leaves.values()), g))
    for name, a, b in zip(leaves, *grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_extreme_decay_stays_finite_and_exact():
    for dt_scale, a_scale in ((30.0, 60.0), (1e-4, 1.0)):
        x, opt = scan_inputs(L=33, dt_scale=dt_scale, a_scale=a_scale, seed=3)
        x32 = {k: v.float() for k, v in x.items()}
        y, h = selective_scan(**x32, delta_softplus=True, chunk_size=8, return_final_state=True)
        y_ref, h_ref = selective_scan_recurrent(**x, delta_softplus=True, return_final_state=True)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        assert (y.double() - y_ref).norm() / y_ref.norm() < 1e-4
        assert (h.double() - h_ref).norm() / h_ref.norm() < 1e-4


def test_step_continues_scan():
    x, opt = scan_inputs(L=9)
    y, h = selective_scan(**x, **opt, delta_softplus=True, chunk_size=4, return_final_state=True)
    state = opt["initial_state"].clone()
    for t in range(9):
        yt = selective_scan_step(state, x["u"][:, t], x["delta"][:, t], x["A"], x["B"][:, t], x["C"][:, t],
                                 D=opt["D"], z=opt["z"][:, t], delta_bias=opt["delta_bias"], delta_softplus=True)
        torch.testing.assert_close(yt, y[:, t], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, h, rtol=1e-10, atol=1e-10)


def test_shape_errors_name_the_tensor():
    x, _ = scan_inputs()
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(**{**x, "B": x["B"][:, :, :2]})
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(**x, chunk_size=0)


# ----------------------------------------------------------------------------------------------- the mixer
def mixer(seed=0, **kw) -> Mamba1Mixer:
    torch.manual_seed(seed)
    c = Mamba2Config(**{**dict(d_model=16, n_layer=1, vocab_size=64, layout="mamba1", d_state=4, dt_rank=3), **kw})
    m = Mamba1Mixer(c).double()
    with torch.no_grad():
        m.D.normal_()
        m.conv1d.bias.normal_()
    return m


def official_mamba1_forward(m: Mamba1Mixer, u: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's ``Mamba.forward`` slow path, in its own (b, d, L) layout with nn.functional.conv1d."""
    L = u.shape[1]
    xz = (u @ m.in_proj.weight.T).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.config.d_conv - 1, groups=m.d_inner)[..., :L])
    x_dbl = x.transpose(1, 2) @ m.x_proj.weight.T
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (dt @ m.dt_proj.weight.T).transpose(1, 2)
    dt = F.softplus(dt + m.dt_proj.bias[:, None])
    A = -torch.exp(m.A_log)
    h = torch.zeros(u.shape[0], m.d_inner, m.d_state, **F64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * x[:, :, t])[..., None] * B[:, None, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = (torch.stack(ys, 2) + x * m.D[:, None]) * F.silu(z)
    return y.transpose(1, 2) @ m.out_proj.weight.T


def test_mixer_matches_official_slow_path():
    m = mixer()
    u = torch.randn(2, 10, 16, **F64)
    torch.testing.assert_close(m(u), official_mamba1_forward(m, u), rtol=1e-10, atol=1e-10)


def test_mixer_cache_equals_forward_for_every_split():
    m = mixer()
    L = 9
    u = torch.randn(2, L, 16, **F64)
    full = m(u)
    for a in range(1, L):
        st = m.empty_state(2, dtype=torch.float64, ssm_dtype=torch.float64)
        b2 = min(L, a + 2)
        parts = [m(u[:, :a], state=st), m(u[:, a:b2], state=st)] + [m(u[:, t:t + 1], state=st) for t in range(b2, L)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10, msg=f"split {a}")


def test_mixer_padding_and_packing():
    m = mixer()
    lengths = [6, 2, 1]
    docs = [torch.randn(1, n, 16, **F64) for n in lengths]
    seq_idx = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))[None]
    packed = m(torch.cat(docs, 1), seq_idx=seq_idx)
    torch.testing.assert_close(packed, torch.cat([m(d) for d in docs], 1), rtol=1e-10, atol=1e-10)
    u = torch.randn(3, 6, 16, **F64)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, (d, n) in enumerate(zip(docs, lengths)):
        u[i, 6 - n:] = d[0]
        mask[i, 6 - n:] = 1
    st = m.empty_state(3, dtype=torch.float64, ssm_dtype=torch.float64)
    out = m(u, attention_mask=mask, state=st)
    nxt = torch.randn(3, 1, 16, **F64)
    step = m(nxt, state=st)
    for i, (d, n) in enumerate(zip(docs, lengths)):
        alone = m(torch.cat([d, nxt[i:i + 1]], 1))
        torch.testing.assert_close(out[i, 6 - n:], alone[0, :n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(step[i], alone[0, n:], rtol=1e-10, atol=1e-10)


def test_official_mamba_130m_layout_loads():
    cfg = config_from_mamba_ssm({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
                                 "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8})
    with torch.device("meta"):
        model = Mamba2LM(cfg)
    d, n, r = 1536, 16, 48
    per_layer = {"norm.weight": (768,), "mixer.in_proj.weight": (2 * d, 768), "mixer.conv1d.weight": (d, 1, 4),
                 "mixer.conv1d.bias": (d,), "mixer.x_proj.weight": (r + 2 * n, d), "mixer.dt_proj.weight": (d, r),
                 "mixer.dt_proj.bias": (d,), "mixer.A_log": (d, n), "mixer.D": (d,), "mixer.out_proj.weight": (768, d)}
    expected = {f"backbone.layers.{i}.{k}": v for i in range(24) for k, v in per_layer.items()}
    expected.update({"backbone.embedding.weight": (50280, 768), "backbone.norm_f.weight": (768,),
                     "lm_head.weight": (50280, 768)})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_init_is_official():
    m = mixer(d_model=32, d_state=8, dt_rank=None)
    assert m.dt_rank == 2
    torch.testing.assert_close(m.A_log[0], torch.log(torch.arange(1, 9, **F64)))
    dt = F.softplus(m.dt_proj.bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=64, layout="mamba1*2", d_state=8))
    assert model.backbone.layers[0].mixer.dt_proj.bias.abs().min() > 0          # not zeroed by the LM init
    assert "backbone.layers.0.mixer.dt_proj.bias" in model.no_decay_param_names()



class PeakBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at once (views counted once)."""

    def __init__(self):
        super().__init__()
        self.seen: set[int] = set()
        self.live = self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(st := t.untyped_storage()) not in self.seen:
                self.seen.add(id(st))
                self.live += st.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, id(st), st.nbytes())
        return out


def test_training_memory_is_far_below_the_state_sequence():
    """fwd+bwd keeps only chunk-boundary states: the peak stays well under the (b, L, d, n) state sequence.
    Regression: a chunk's final state returned as a view kept every chunk's states alive."""
    b, L, d, n, Q = 1, 4096, 32, 64, 32
    full = 4 * b * L * d * n
    g = torch.Generator().manual_seed(0)
    u, delta, B, C = (torch.randn(*s, generator=g).requires_grad_() for s in ((b, L, d), (b, L, d), (b, L, n), (b, L, n)))
    A = (-torch.rand(d, n, generator=g)).requires_grad_()
    with PeakBytes() as mem:
        selective_scan(u, delta, A, B, C, delta_softplus=True, chunk_size=Q).sum().backward()
    boundary_states = full // Q
    assert boundary_states < mem.peak < 0.4 * full, mem.peak / full
