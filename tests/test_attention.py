"""The attention mixer: a naive reference, KV cache = full forward for every split, left padding, packed
documents, causality, grouped KV heads and partial rotary (issue 5, docs/design.md §5: 5, 6, 8, 9)."""

from __future__ import annotations

import math

import pytest
import torch

from mamba2.config import Mamba2Config
from mamba2.layers.attention import Attention
from mamba2.layers.rotary import apply_rotary, rotary_cos_sin

D_MODEL = 32


def make(seed: int = 0, **kw) -> Attention:
    torch.manual_seed(seed)
    base = dict(d_model=D_MODEL, n_layer=1, vocab_size=64, layout=["attention"], attn_num_heads=4,
                attn_num_heads_kv=2, attn_head_dim=8, attn_rotary_dim=4)
    att = Attention(Mamba2Config(**{**base, **kw})).double()
    if att.conv1d is not None:
        torch.nn.init.normal_(att.conv1d.bias)
    return att


VARIANTS = [
    dict(),
    dict(attn_num_heads_kv=4, attn_rotary_dim=None),                 # MHA, full rotary
    dict(attn_num_heads_kv=1, attn_rotary_interleaved=True),         # MQA, interleaved rotary
    dict(attn_d_conv=4, attn_rotary_dim=0),                          # conv on qkv (mamba2attn), no rotary
    dict(attn_d_conv=3, attn_qkv_bias=True, attn_out_bias=True, attn_softmax_scale=0.2),
]


def naive_attention(att: Attention, u: torch.Tensor, keep: torch.Tensor | None = None,
                    doc: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, per head, per query: explicit scores, masks and softmax, following mamba_ssm's MHA order
    (in_proj → conv without activation → split q | k | v → rotary on the first rotary_dim channels → attend)."""
    c = att.config
    b, L, _ = u.shape
    r = c.resolved
    H, Hkv, d, rd = r.attn_num_heads, r.attn_num_heads_kv, r.attn_head_dim, r.attn_rotary_dim
    keep = torch.ones(b, L, dtype=torch.bool) if keep is None else keep.bool()
    doc = torch.zeros(b, L, dtype=torch.long) if doc is None else doc
    qkv = att.in_proj(u)
    if att.conv1d is not None:
        qkv = qkv * keep[..., None]
        K, w = c.attn_d_conv, att.conv1d.weight[:, 0]
        out = att.conv1d.bias.expand_as(qkv).clone()
        for t in range(L):
            for j in range(K):
                s = t - (K - 1) + j
                if s >= 0:
                    out[:, t] += w[:, j] * qkv[:, s] * doc[:, s].eq(doc[:, t])[:, None]
        qkv = out
    q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    q, k, v = q.view(b, L, H, d), k.view(b, L, Hkv, d), v.view(b, L, Hkv, d)
    y = torch.zeros(b, L, H, d, dtype=u.dtype)
    scale = c.attn_softmax_scale or 1 / math.sqrt(d)
    for r in range(b):
        pos, seen = [], {}
        for t in range(L):
            key = int(doc[r, t])
            pos.append(seen.get(key, 0))
            seen[key] = pos[-1] + int(keep[r, t])
        angle = torch.tensor(pos, dtype=torch.float64)[:, None] / c.attn_rotary_base ** (
            torch.arange(0, rd, 2, dtype=torch.float64) / rd) if rd else None

        def rot(x):  # x (L, heads, d)
            if not rd:
                return x
            z = x[..., :rd]
            if c.attn_rotary_interleaved:
                zc = torch.complex(z[..., 0::2], z[..., 1::2]) * torch.polar(torch.ones_like(angle), angle)[:, None]
                z = torch.stack([zc.real, zc.imag], dim=-1).flatten(-2)
            else:
                zc = torch.complex(z[..., :rd // 2], z[..., rd // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
                z = torch.cat([zc.real, zc.imag], dim=-1)
            return torch.cat([z, x[..., rd:]], dim=-1)

        qr, kr = rot(q[r]), rot(k[r])
        for h in range(H):
            g = h // (H // Hkv)
            for t in range(L):
                ok = [s for s in range(t + 1) if doc[r, s] == doc[r, t] and (keep[r, s] or s == t)]
                scores = torch.stack([qr[t, h] @ kr[s, g] for s in ok]) * scale
                y[r, t, h] = torch.softmax(scores, 0) @ v[r, ok, g]
    return att.out_proj(y.reshape(b, L, H * d))


@pytest.mark.parametrize("kw", VARIANTS)
def test_matches_naive_reference(kw):
    att = make(**kw)
    u = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(att(u), naive_attention(att, u), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", VARIANTS)
def test_cache_equals_full_forward_for_every_split(kw):
    att = make(**kw)
    L = 11
    u = torch.randn(2, L, D_MODEL, dtype=torch.float64)
    full = att(u)
    for a in range(1, L):
        st = att.empty_state(2, dtype=torch.float64)
        parts = [att(u[:, :a], state=st)]
        # the rest in several multi-token continuations, then single tokens
        b2 = min(L, a + 3)
        if b2 > a:
            parts.append(att(u[:, a:b2], state=st))
        parts += [att(u[:, t:t + 1], state=st) for t in range(b2, L)]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10, msg=f"split {a}")
    st = att.empty_state(2, dtype=torch.float64)
    steps = torch.cat([att(u[:, t:t + 1], state=st) for t in range(L)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", VARIANTS[:4])
def test_left_padding_equals_rows_alone(kw):
    att = make(**kw)
    lengths, L = [7, 3, 5], 7
    rows = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in lengths]
    u = torch.zeros(3, L, D_MODEL, dtype=torch.float64).normal_()  # garbage at padding must not leak
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        u[i, L - lengths[i]:] = r[0]
        mask[i, L - lengths[i]:] = 1
    st = att.empty_state(3, dtype=torch.float64)
    out = att(u, attention_mask=mask, state=st)
    torch.testing.assert_close(att(u, attention_mask=mask), out, rtol=1e-10, atol=1e-10)
    nxt = torch.randn(3, 2, D_MODEL, dtype=torch.float64)
    cont = torch.cat([att(nxt[:, t:t + 1], state=st) for t in range(2)], 1)
    for i, r in enumerate(rows):
        alone = att(torch.cat([r, nxt[i:i + 1]], 1))
        torch.testing.assert_close(out[i, L - lengths[i]:], alone[0, :lengths[i]], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(cont[i], alone[0, lengths[i]:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw", VARIANTS[:4])
def test_packed_documents_equal_separate(kw):
    att = make(**kw)
    lengths = [5, 1, 2, 6]
    docs = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in lengths]
    packed = torch.cat(docs, 1)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    out = att(packed, seq_idx=seq_idx)
    torch.testing.assert_close(out, naive_attention(att, packed, doc=seq_idx), rtol=1e-10, atol=1e-10)
    alone = torch.cat([att(d) for d in docs], 1)
    torch.testing.assert_close(out, alone, rtol=1e-10, atol=1e-10)


def test_padding_and_packing_together_match_naive():
    att = make(attn_d_conv=4)
    u = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[0, :3] = False
    doc = torch.tensor([[0] * 6 + [1] * 4, [0] * 2 + [3] * 8])
    torch.testing.assert_close(att(u, seq_idx=doc, attention_mask=keep), naive_attention(att, u, keep, doc),
                               rtol=1e-10, atol=1e-10)


def test_causal():
    att = make(attn_d_conv=4)
    u = torch.randn(1, 12, D_MODEL, dtype=torch.float64)
    base = att(u)
    for t in (0, 5, 11):
        v = u.clone()
        v[:, t] += torch.randn(D_MODEL, dtype=torch.float64)
        out = att(v)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.allclose(out[:, t], base[:, t])


def test_gqa_head_h_reads_kv_head_h_over_group_size():
    att = make(attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=0)
    with torch.no_grad():  # give KV head 1 a zero value projection: query heads 2, 3 must then output zero
        att.in_proj.weight[4 * 8 + 2 * 8 + 8:] = 0
    u = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    qkv = att.in_proj(u)
    q, k, v = qkv.split([32, 16, 16], -1)
    y = torch.nn.functional.scaled_dot_product_attention(
        q.view(1, 6, 4, 8).transpose(1, 2), k.view(1, 6, 2, 8).repeat_interleave(2, 2).transpose(1, 2),
        v.view(1, 6, 2, 8).repeat_interleave(2, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
    assert y[..., 2:, :].abs().max() == 0 and y[..., :2, :].abs().max() > 0
    torch.testing.assert_close(att(u), att.out_proj(y.reshape(1, 6, 32)), rtol=1e-10, atol=1e-10)


def test_rotary_is_relative_and_partial():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    y = torch.randn(1, 1, 2, 8, dtype=torch.float64)

    def score(pq, pk, rd):
        cq, sq = rotary_cos_sin(torch.tensor([[pq]]), rd)
        ck, sk = rotary_cos_sin(torch.tensor([[pk]]), rd)
        return (apply_rotary(x, cq, sq) * apply_rotary(y, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3, 4), score(104, 100, 4))
    c, s = rotary_cos_sin(torch.tensor([[5]]), 4)
    assert torch.equal(apply_rotary(x, c, s)[..., 4:], x[..., 4:])
    assert not torch.allclose(apply_rotary(x, c, s)[..., :4], x[..., :4])


def test_state_grows_and_select_keeps_rows():
    from mamba2.models.cache import InferenceCache

    att = make()
    st = att.empty_state(3, dtype=torch.float64)
    u = torch.randn(3, 40, D_MODEL, dtype=torch.float64)
    full = att(u)
    att(u[:, :20], state=st)
    cache = InferenceCache([st]).select(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    out = att(u[[2, 0], 20:], state=cache.layers[0])
    torch.testing.assert_close(out, full[[2, 0], 20:], rtol=1e-10, atol=1e-10)


def test_seq_idx_with_state_is_refused():
    att = make()
    with pytest.raises(ValueError, match="seq_idx"):
        att(torch.randn(1, 3, D_MODEL, dtype=torch.float64), seq_idx=torch.zeros(1, 3, dtype=torch.long),
            state=att.empty_state(1, dtype=torch.float64))


def test_bf16_close_to_fp32():
    att = make(attn_d_conv=4)
    att32 = att.float()
    u = torch.randn(2, 16, D_MODEL)
    ref = att32(u)
    out = make(attn_d_conv=4).to(torch.bfloat16)(u.bfloat16()).float()
    assert (out - ref).norm() / ref.norm() < 2e-2
