"""Layers: causal conv (docs/design.md §5.8, §5.11), grouped gated RMSNorm (§5.4), mixer shapes and init
(§5.13)."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from mamba2.config import Mamba2Config
from mamba2.layers import CausalConv1d, GatedRMSNorm, Mamba2Mixer, RMSNorm


def _conv_reference(conv: CausalConv1d, x: torch.Tensor) -> torch.Tensor:
    """torch's own conv1d with left padding: an independent oracle."""
    K = conv.d_conv
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), conv.weight, conv.bias, groups=conv.channels)
    return y.transpose(1, 2)


@pytest.mark.parametrize("L", [1, 2, 4, 64])
@pytest.mark.parametrize("channels", [13, 16])
def test_conv_returns_exactly_L_outputs(L, channels):
    conv = CausalConv1d(channels, 4).double()
    x = torch.randn(channels, 2, L, dtype=torch.float64).permute(1, 2, 0)       # non-contiguous (b, L, ch)
    assert not x.is_contiguous()
    y, state = conv(x)
    assert y.shape == (2, L, channels) and state.shape == (2, 3, channels)
    assert rel_err(y, _conv_reference(conv, x.contiguous())) <= 1e-12


def test_conv_state_continuation_every_split():
    conv = CausalConv1d(10, 4).double()
    x = torch.randn(2, 12, 10, dtype=torch.float64)
    full, _ = conv(x)
    for a in range(1, 12):
        y1, s = conv(x[:, :a])
        y2, _ = conv(x[:, a:], conv_state=s)
        assert rel_err(torch.cat([y1, y2], 1), full) <= 1e-12


def test_conv_window_resets_at_document_boundaries():
    conv = CausalConv1d(7, 4).double()
    lengths = [1, 2, 5, 3, 9]                    # documents shorter than d_conv included
    x = torch.randn(1, sum(lengths), 7, dtype=torch.float64)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1)
    y, _ = conv(x, seq_idx=seq_idx)
    ref = torch.cat([conv(part)[0] for part in torch.split(x, lengths, dim=1)], dim=1)
    assert rel_err(y, ref) <= 1e-12


def test_conv_cu_seqlens_gives_each_documents_window():
    """cu_seqlens: the outputs of seq_idx, and one final window per document (zeros before its start), equal to
    each document run alone (docs/design.md §7), also for documents shorter than d_conv - 1."""
    conv = CausalConv1d(7, 4).double()
    lengths = [1, 2, 5, 3, 9]
    x = torch.randn(1, sum(lengths), 7, dtype=torch.float64)
    cu = torch.tensor([0] + lengths).cumsum(0)
    y, states = conv(x, cu_seqlens=cu, activation="silu")
    assert states.shape == (len(lengths), 3, 7)
    for k, part in enumerate(torch.split(x, lengths, dim=1)):
        yk, sk = conv(part, activation="silu")
        assert rel_err(y[:, cu[k]:cu[k + 1]], yk) <= 1e-12
        assert torch.equal(states[k], sk[0])
    with pytest.raises(ValueError, match="one packed row"):
        conv(x, cu_seqlens=cu, conv_state=torch.zeros(1, 3, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="end at the packed length"):
        conv(x, cu_seqlens=torch.tensor([0, 3]))


def _gated_norm_fp64(y, z, weight, ngroups, eps, norm_before_gate):
    out = []
    for yg, zg, wg in zip(y.chunk(ngroups, -1), z.chunk(ngroups, -1), weight.chunk(ngroups, -1)):
        h = yg if norm_before_gate else yg * zg * torch.sigmoid(zg)
        h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * wg
        out.append(h * zg * torch.sigmoid(zg) if norm_before_gate else h)
    return torch.cat(out, -1)


@pytest.mark.parametrize("ngroups", [1, 2, 4])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rmsnorm_per_group_forward_and_backward(ngroups, norm_before_gate):
    d = 24
    norm = GatedRMSNorm(d, d // ngroups, eps=1e-5, norm_before_gate=norm_before_gate).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d))
    y = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    z = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    out = norm(y, z)
    ref = _gated_norm_fp64(y, z, norm.weight, ngroups, 1e-5, norm_before_gate)
    assert rel_err(out, ref) <= 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), [y, z, norm.weight])
    want = torch.autograd.grad((ref * g).sum(), [y, z, norm.weight])
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    if ngroups > 1:   # per-group statistics really differ from whole-vector ones
        whole = _gated_norm_fp64(y, z, norm.weight, 1, 1e-5, norm_before_gate)
        assert rel_err(out, whole) > 1e-3


def test_rmsnorm_keeps_dtype_and_matches_formula():
    n = RMSNorm(8)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    y = n(x)
    assert y.dtype == torch.bfloat16
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert rel_err(y, ref) <= 1e-2


@pytest.mark.parametrize("kw", [dict(), dict(ngroups=2), dict(ngroups=4, D_has_hdim=True),
                                dict(d_ssm=64), dict(rmsnorm=False)])
def test_mixer_parameter_shapes_follow_official_layout(kw):
    c = Mamba2Config(d_model=64, n_layer=1, vocab_size=100, d_state=8, headdim=16, **kw)
    m = Mamba2Mixer(c)
    G, N, H = c.ngroups, c.d_state, c.nheads
    assert m.in_proj.weight.shape == (2 * c.d_inner + 2 * G * N + H, c.d_model)
    assert m.conv1d.weight.shape == (c.resolved.d_ssm + 2 * G * N, 1, c.d_conv)
    assert m.D.shape == ((c.resolved.d_ssm,) if c.D_has_hdim else (H,))
    assert m.out_proj.weight.shape == (c.d_model, c.d_inner)
    y = m(torch.randn(2, 11, c.d_model))
    assert y.shape == (2, 11, c.d_model) and torch.isfinite(y).all()


def test_mixer_init_matches_paper():
    c = Mamba2Config(d_model=256, n_layer=1, vocab_size=100, d_state=8, headdim=8)
    m = Mamba2Mixer(c)
    A = torch.exp(m.A_log)
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 1
    dt = F.softplus(m.dt_bias)
    assert (dt >= 1e-3 * (1 - 1e-5)).all() and (dt <= 0.1 * (1 + 1e-5)).all()
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert math.isclose(float(torch.log(dt).mean().detach()), (math.log(1e-3) + math.log(1e-1)) / 2, abs_tol=0.5)
