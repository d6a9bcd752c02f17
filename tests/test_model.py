"""The LM (invariants of docs/design.md §5): config validation (12), causality (5), cache = forward (6), packing
(8), padding (9), D shapes (10), state precision (14), autocast (15)."""

import pytest
import torch

from conftest import rel_err
from mamba2 import Mamba2Config, Mamba2LM
from mamba2.config import PRESETS

CONFIGS = {
    "plain": dict(),
    "groups": dict(ngroups=2),
    "hdim_D_mlp": dict(D_has_hdim=True, d_ssm=32),
    "no_rmsnorm": dict(rmsnorm=False, norm_before_gate=False),
    "norm_before_gate": dict(norm_before_gate=True, ngroups=4),
}


def _model(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    base = dict(d_model=32, n_layer=2, vocab_size=61, d_state=8, headdim=8, chunk_size=8,
                pad_vocab_size_multiple=16)
    m = Mamba2LM(Mamba2Config(**{**base, **kw}))
    with torch.no_grad():          # random D, dt_bias and norm weights: never test on ones
        for blk in m.backbone.layers:
            if hasattr(blk.mixer, "D"):             # Mamba-2 and Mamba-1 (not attention)
                blk.mixer.D.normal_()
            if hasattr(blk.mixer, "dt_bias"):      # Mamba-2 (a Mamba-1 layer's dt bias is its dt_proj's)
                blk.mixer.dt_bias.normal_(mean=-2.0, std=0.5)
                if blk.mixer.norm is not None:
                    blk.mixer.norm.weight.normal_(1.0, 0.2)
            blk.norm.weight.normal_(1.0, 0.2)
    # drawn in fp32, then cast: models of two dtypes from one seed hold the same values (normal_ on a bf16 tensor
    # draws other numbers than on an fp32 one, on some torch versions)
    return m.to(dtype).eval()


def _ids(b, L, seed=1, vocab=61):
    return torch.randint(0, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bad, match", [
    (dict(d_model=64, headdim=48), "d_ssm % headdim"),
    (dict(d_model=64, headdim=16, ngroups=3), "nheads % ngroups"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(d_state=-4), "d_state must be a positive integer"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit"),
    (dict(d_ssm=1000), "d_ssm must be in"),
])
def test_config_errors_name_constraint_and_values(bad, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**{**dict(d_model=64, n_layer=1, vocab_size=10, headdim=16), **bad})


def test_presets_and_round_trip():
    for name in PRESETS:
        c = Mamba2Config.preset(name)
        assert Mamba2Config.from_dict(c.to_dict()) == c
    assert Mamba2Config.preset("130m").padded_vocab_size == 50288
    with pytest.raises(ValueError, match="unknown preset"):
        Mamba2Config.preset("7b")


def test_released_130m_parameter_count():
    with torch.device("meta"):
        m = Mamba2LM(Mamba2Config.preset("130m"))
    assert 125e6 < m.num_parameters() < 135e6


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causality(name):
    m = _model(**CONFIGS[name])
    ids = _ids(2, 21)
    ref = m(ids)
    for t in (0, 5, 8, 20):
        ids2 = ids.clone()
        ids2[:, t] = (ids2[:, t] + 1) % 61
        out = m(ids2)
        assert torch.equal(out[:, :t], ref[:, :t]) and not torch.equal(out[:, t], ref[:, t])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cache_equals_forward_for_every_split(name):
    m = _model(**CONFIGS[name])
    ids = _ids(2, 19)
    full = m(ids)
    with torch.no_grad():
        for a in range(1, 19):
            cache = m.empty_cache(2)
            out = torch.cat([m(ids[:, :a], cache=cache), m(ids[:, a:], cache=cache)], dim=1)
            assert rel_err(out, full) <= 1e-10, a
        # several multi-token continuations in a row, then single tokens
        cache = m.empty_cache(2)
        parts = [m(ids[:, s:e], cache=cache) for s, e in [(0, 2), (2, 3), (3, 11), (11, 12), (12, 17), (17, 19)]]
        assert rel_err(torch.cat(parts, 1), full) <= 1e-10
        cache = m.empty_cache(2)
        steps = [m(ids[:, t:t + 1], cache=cache) for t in range(19)]
        assert rel_err(torch.cat(steps, 1), full) <= 1e-10
        assert cache.seqlen_offset == 19


def test_cache_state_is_fp32_under_bf16_and_long_decode_stays_close():
    m32 = _model(dtype=torch.float32)
    m16 = _model(dtype=torch.bfloat16)
    cache = m16.empty_cache(1)
    assert all(s.ssm.dtype == torch.float32 for s in cache.layers)
    ids = _ids(1, 300)
    with torch.no_grad():
        ref = m32(ids)
        steps = torch.cat([m16(ids[:, t:t + 1], cache=cache) for t in range(300)], dim=1)
    assert rel_err(steps[:, -50:], ref[:, -50:]) <= 2e-2


@pytest.mark.parametrize("name", ["plain", "groups", "hdim_D_mlp"])
def test_left_padded_batch_equals_rows_alone(name):
    m = _model(**CONFIGS[name])
    rows = [_ids(1, L, seed=L)[0] for L in (13, 3, 1, 9)]
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = r
        mask[i, n - len(r):] = 1
    ids[mask == 0] = 7                          # pad id that is a real token: must not leak
    with torch.no_grad():
        cache = m.empty_cache(len(rows))
        out = m(ids, attention_mask=mask, cache=cache)
        nxt = _ids(len(rows), 4, seed=99)
        cont = torch.cat([m(nxt[:, t:t + 1], cache=cache) for t in range(4)], 1)
        for i, r in enumerate(rows):
            c1 = m.empty_cache(1)
            alone = m(r[None], cache=c1)
            alone_cont = torch.cat([m(nxt[i:i + 1, t:t + 1], cache=c1) for t in range(4)], 1)
            assert rel_err(out[i, n - len(r):], alone[0]) <= 1e-10
            assert rel_err(cont[i], alone_cont[0]) <= 1e-10


def test_right_padding_does_not_change_real_positions():
    m = _model()
    ids = _ids(1, 10)
    mask = torch.ones(1, 14, dtype=torch.long)
    mask[:, 10:] = 0
    padded = torch.cat([ids, torch.full((1, 4), 5)], 1)
    assert rel_err(m(padded, attention_mask=mask)[:, :10], m(ids)) <= 1e-10


@pytest.mark.parametrize("name", ["plain", "groups", "hdim_D_mlp"])
def test_packed_documents_equal_separate_with_gradients(name):
    m = _model(**CONFIGS[name])
    lengths = [3, 1, 12, 2, 7]                   # shorter than d_conv; starting mid-chunk
    ids = _ids(1, sum(lengths))
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1)
    packed = m(ids, seq_idx=seq_idx)
    alone = torch.cat([m(part) for part in torch.split(ids, lengths, dim=1)], 1)
    assert rel_err(packed, alone) <= 1e-10
    g = torch.randn_like(packed)
    params = [p for p in m.parameters()]
    gp = torch.autograd.grad((packed * g).sum(), params, allow_unused=True)
    ga = torch.autograd.grad((alone * g).sum(), params, allow_unused=True)
    for a, b in zip(gp, ga):
        if a is not None:
            assert rel_err(a, b) <= 1e-9


@pytest.mark.parametrize("name", ["plain", "groups", "hdim_D_mlp", "no_rmsnorm", "with_mamba1", "hybrid",
                                  "attention_gqa"])
def test_packed_prefill_leaves_each_documents_own_state(name):
    """A packed prefill (cu_seqlens + a cache of one row per document) = each prompt prefilled alone: the logits
    at each document's end, and every layer's conv window and SSM state (docs/design.md §7), for documents shorter
    than d_conv and starting mid-chunk (Mamba-1 layers too: the selective scan's per-document states); decoding on
    from the packed cache continues exactly."""
    m = _model(**{**CONFIGS, "with_mamba1": dict(layout="mamba1,mamba2"),
                  "hybrid": dict(layout="mamba2,attention+mlp,mamba1", n_layer=3, d_intermediate=24, attn_d_conv=4),
                  "attention_gqa": dict(layout="attention,attention+mlp", d_intermediate=24, attn_num_heads=4,
                                        attn_num_heads_kv=2)}[name])
    lengths = [3, 1, 12, 2, 9]
    ids = _ids(1, sum(lengths), seed=5)
    cu = torch.tensor([0] + lengths).cumsum(0)
    cache = m.empty_cache(len(lengths))
    logits = m(ids, cu_seqlens=cu, cache=cache, logits_to_keep=1)
    assert logits.shape[:2] == (len(lengths), 1)
    alones = []
    for k, part in enumerate(torch.split(ids, lengths, dim=1)):
        alones.append(m.empty_cache(1))
        ref = m(part, cache=alones[k], logits_to_keep=1)
        assert rel_err(logits[k], ref[0]) <= 1e-10
        for packed_layer, alone_layer in zip(cache.layers, alones[k].layers):
            if hasattr(packed_layer, "ssm"):
                assert rel_err(packed_layer.ssm[k], alone_layer.ssm[0]) <= 1e-10
            else:                   # attention: document k's keys and values at positions 0 … len_k − 1
                n = lengths[k]
                assert int(packed_layer.pos[k]) == n == int(alone_layer.pos[0])
                assert bool(packed_layer.valid[k, :n].all()) and not bool(packed_layer.valid[k, n:].any())
                for name in ("k", "v"):
                    assert rel_err(getattr(packed_layer, name)[k, :n], getattr(alone_layer, name)[0, :n]) <= 1e-12
            if packed_layer.conv is not None:
                assert rel_err(packed_layer.conv[k], alone_layer.conv[0]) <= 1e-12
    nxt = _ids(len(lengths), 1, seed=6)
    after = m(nxt, cache=cache)
    for k in range(len(lengths)):
        assert rel_err(after[k], m(nxt[k:k + 1], cache=alones[k])[0]) <= 1e-10
    assert rel_err(m(ids, cu_seqlens=cu), m(ids, seq_idx=torch.repeat_interleave(
        torch.arange(len(lengths)), torch.tensor(lengths)).view(1, -1))) <= 1e-12


def test_packed_prefill_errors():
    m = _model()
    ids, cu = _ids(1, 6), torch.tensor([0, 2, 6])
    with pytest.raises(ValueError, match="fresh cache of one row per document"):
        m(ids, cu_seqlens=cu, cache=m.empty_cache(3))
    used = m.empty_cache(2)
    m(_ids(2, 1), cache=used)
    with pytest.raises(ValueError, match="holds 2 rows and 1 tokens"):
        m(ids, cu_seqlens=cu, cache=used)
    with pytest.raises(ValueError, match="logits_to_keep=3 needs documents"):
        m(ids, cu_seqlens=cu, logits_to_keep=3)
    with pytest.raises(ValueError, match="not both"):
        m(ids, cu_seqlens=cu, seq_idx=torch.zeros_like(ids))
    with pytest.raises(ValueError, match=r"input_ids must have batch 1, got 2"):
        m(_ids(2, 3), cu_seqlens=cu)
    torch.manual_seed(0)
    hybrid = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=61, d_state=8, headdim=8, chunk_size=8,
                                   layout="mamba2,attention")).double().eval()
    assert hybrid(ids, cu_seqlens=cu).shape[:2] == (1, 6)           # without a cache: seq_idx for every layer


def test_loss_and_weight_decay_groups():
    m = _model()
    ids = _ids(2, 12)
    loss = m.loss(ids[:, :-1], ids[:, 1:])
    assert 3.0 < loss.item() < 6.0                    # about ln(61) at init
    names = m.no_decay_param_names()
    for suffix in ("A_log", "dt_bias", "mixer.D", "norm.weight", "conv1d.bias", "norm_f.weight"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert not any(n.endswith(("in_proj.weight", "out_proj.weight", "conv1d.weight")) for n in names)


def test_bad_token_ids_and_cache_batch_errors():
    m = _model()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="cache holds 2 rows"):
        m(_ids(1, 3), cache=m.empty_cache(2))
    with pytest.raises(ValueError, match="integer token ids, got dtype torch.float32"):
        m(_ids(1, 3).float())
    for dtype in (torch.uint8, torch.int16, torch.int32):       # the embedding takes int32/int64: others as int64
        assert torch.equal(m(_ids(2, 3).to(dtype)), m(_ids(2, 3)))
    with pytest.raises(ValueError, match=r"attention_mask must have input_ids' shape \(2, 3\), got \(2, 4\)"):
        m(_ids(2, 3), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"seq_idx must have input_ids' shape \(2, 3\), got \(3,\)"):
        m(_ids(2, 3), seq_idx=torch.zeros(3, dtype=torch.int32))


def test_autocast_bf16_close_to_fp32():
    m = _model(dtype=torch.float32)
    ids = _ids(2, 30)
    ref = m(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids)
    assert rel_err(out, ref) <= 2e-2


@pytest.mark.parametrize("name", ["plain", "groups", "hdim_D_mlp"])
def test_cpu_inference_in_segments_equals_one_pass(monkeypatch, name):
    """Long CPU inference runs the mixer in segments through its decoding state: same logits as one pass."""
    import mamba2.layers.mamba2 as mixer_module
    m = _model(**CONFIGS[name])
    ids = _ids(2, 53)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    one_pass = m(ids, attention_mask=mask)                      # grad enabled: never segmented
    monkeypatch.setattr(mixer_module, "CPU_SEGMENT_TOKENS", 16)
    monkeypatch.setattr(mixer_module, "CPU_SEGMENT_MIN", 4)
    calls = []
    original = mixer_module.Mamba2Mixer._forward_in_segments
    monkeypatch.setattr(mixer_module.Mamba2Mixer, "_forward_in_segments",
                        lambda self, *a: calls.append(1) or original(self, *a))
    with torch.no_grad():
        segmented = m(ids, attention_mask=mask)
        cache = m.empty_cache(2)
        with_cache = torch.cat([m(ids[:, :20], attention_mask=mask[:, :20], cache=cache),
                                m(ids[:, 20:], cache=cache)], dim=1)
    assert calls, "the segmented path did not run"
    assert rel_err(segmented, one_pass) <= 1e-10
    assert rel_err(with_cache, one_pass) <= 1e-10


def test_logits_to_keep_returns_the_last_positions():
    m = _model()
    ids = _ids(2, 13)
    full = m(ids)
    assert torch.equal(m(ids, logits_to_keep=3), full[:, -3:])
    assert torch.equal(m(ids, logits_to_keep=0), full)


@pytest.mark.parametrize("layout", [None, ("mamba2", "attention")])
def test_labelled_only_loss_equals_the_full_loss_with_gradients(layout):
    """loss(labelled_only=True) runs the head at the labelled positions only (logits_at): the same loss, mean and
    sum, and the same gradients, with sparse targets as MQAR's; logits_at selects those rows of the full logits."""
    m = _model(layout=layout).train()
    ids = _ids(3, 17)
    targets = _ids(3, 17, seed=2)
    targets[torch.rand(3, 17, generator=torch.Generator().manual_seed(3)) < 0.7] = -100
    targets[1] = -100                                   # a row without labels
    keep = targets != -100
    assert rel_err(m(ids, logits_at=keep), m(ids)[keep]) < 1e-12       # a GEMM of fewer rows may round otherwise
    for reduction in ("mean", "sum"):
        grads = []
        for labelled_only in (False, True):
            m.zero_grad()
            loss = m.loss(ids, targets, reduction=reduction, labelled_only=labelled_only)
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
        (full, g_full), (sel, g_sel) = grads
        assert rel_err(sel, full) < 1e-6, (reduction, sel, full)          # the cross-entropy runs in fp32
        assert max(rel_err(a, b) for a, b in zip(g_sel, g_full)) < 1e-6


def test_logits_at_errors():
    m = _model()
    ids = _ids(2, 5)
    with pytest.raises(ValueError, match="logits_at must be a bool mask, got dtype torch.int64"):
        m(ids, logits_at=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits_at must have input_ids' shape \(2, 5\), got \(2, 4\)"):
        m(ids, logits_at=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not with cache, cu_seqlens or logits_to_keep"):
        m(ids, logits_at=torch.ones(2, 5, dtype=torch.bool), logits_to_keep=1)
    with pytest.raises(ValueError, match=r"targets must have input_ids' shape \(2, 5\), got \(2, 4\)"):
        m.loss(ids, _ids(2, 4), labelled_only=True)
    with pytest.raises(ValueError, match="labelled_only takes reduction 'mean' or 'sum', got 'none'"):
        m.loss(ids, _ids(2, 5), labelled_only=True, reduction="none")
    np = pytest.importorskip("numpy")
    for given, name in ((np.ones((2, 5), dtype=bool), "numpy.ndarray"), ([[True] * 5] * 2, "list")):
        with pytest.raises(ValueError, match=rf"logits_at must be a torch.bool tensor of input_ids' shape "
                                             rf"\(2, 5\), got {name}$"):
            m(ids, logits_at=given)
    with pytest.raises(ValueError, match=r"seq_idx must be a torch.Tensor of input_ids' shape \(2, 5\), got list"):
        m(ids, seq_idx=[[0] * 5] * 2)
    with pytest.raises(ValueError, match="input_ids must be a torch.Tensor .*, got list"):
        m([[1, 2, 3]])


@pytest.mark.parametrize("layout", [None, ("mamba2", "attention"), ("attention+mlp",), ("mamba1",)])
def test_an_empty_batch_or_sequence_is_refused_by_every_model(layout):
    """Mamba-2, hybrid, Transformer++ and Mamba-1: one clear error at the model's entry (the layers would fail
    each in its own way: a division by zero, a reshape, an empty cat), in the forward and the loss."""
    m = _model(layout=layout, n_layer=len(layout or "a"), d_intermediate=48 if layout == ("attention+mlp",) else 0)
    for shape, match in (((0, 5), "batch size must be >= 1, got 0"), ((2, 0), "sequence length must be >= 1, got 0")):
        ids = torch.zeros(shape, dtype=torch.long)
        with pytest.raises(ValueError, match=match):
            m(ids)
        with pytest.raises(ValueError, match=match):
            m.loss(ids, ids)


def test_loss_checks_the_targets_against_the_true_vocabulary():
    """Targets in [vocab_size, padded_vocab_size) (61 … 63 here) are refused as ids are, and so are negatives other
    than the ignore index -100; other integer dtypes are taken as int64, floats refused."""
    m = _model()
    ids = _ids(2, 5)
    assert m.config.padded_vocab_size == 64
    for bad in (61, 63, -1, -99):
        targets = _ids(2, 5, seed=2)
        targets[1, 3] = bad
        for labelled_only in (False, True):
            with pytest.raises(ValueError, match=rf"target {bad} is outside the vocabulary \[0, 61\) and is not "
                                                 rf"the ignore index -100"):
                m.loss(ids, targets, labelled_only=labelled_only)
    targets = _ids(2, 5, seed=2)
    targets[0, :2] = -100
    ref = m.loss(ids, targets)
    assert torch.equal(m.loss(ids, targets.int()), ref)
    with pytest.raises(ValueError, match=r"targets must hold integer token ids \(or -100\), got dtype torch.float32"):
        m.loss(ids, targets.float())
    with pytest.raises(ValueError, match="token id 70 is outside the vocabulary"):
        m.loss(torch.full((2, 5), 70), targets)


def test_loss_without_a_labelled_target_is_nan_as_torch_cross_entropy():
    """Every target -100: the mean is 0/0 = NaN (as torch.nn.functional.cross_entropy), the sum 0 (docstring)."""
    m = _model()
    ids = _ids(2, 5)
    none = torch.full((2, 5), -100)
    for labelled_only in (False, True):
        assert torch.isnan(m.loss(ids, none, labelled_only=labelled_only))
        assert m.loss(ids, none, reduction="sum", labelled_only=labelled_only).item() == 0.0
