"""Layouts of one LM: hybrids of Mamba-2, Mamba-1 and attention, Transformer++, official hybrid checkpoints;
decode = forward, packed = separate, padded = alone, training on real text, config errors (issue 5)."""

from __future__ import annotations

import re
import sysconfig
from pathlib import Path

import pytest
import torch

from mamba2.config import ARCHS, Mamba2Config
from mamba2.generation import generate
from mamba2.models import Mamba2LM
from mamba2.interop.official import config_from_mamba_ssm, config_to_mamba_ssm

ALL_KINDS = "mamba2,attention+mlp,mamba1,attention,mamba2+mlp"


def tiny(layout: str = ALL_KINDS, **kw) -> Mamba2Config:
    n = len(layout.split(","))
    base = dict(d_model=32, n_layer=n, vocab_size=61, d_state=8, headdim=8, chunk_size=4, layout=layout,
                d_intermediate=48 if "+mlp" in layout else 0, dt_rank=3, attn_num_heads=4, attn_num_heads_kv=2, attn_rotary_dim=4, attn_d_conv=4)
    return Mamba2Config(**{**base, **kw})


def model64(cfg: Mamba2Config, seed: int = 0) -> Mamba2LM:
    torch.manual_seed(seed)
    m = Mamba2LM(cfg).double().eval()
    with torch.no_grad():  # random, non-trivial values everywhere the init leaves constants
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm2.weight", ".D", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    return m


def cache64(m: Mamba2LM, batch: int):
    return m.empty_cache(batch, dtype=torch.float64, ssm_dtype=torch.float64)


# ------------------------------------------------------------------------------------------ decode = forward
@pytest.mark.parametrize("layout", [ALL_KINDS, "attention+mlp,attention+mlp", "mamba1,mamba2,attention"])
def test_step_by_step_equals_full_forward(layout):
    m = model64(tiny(layout))
    L = 13
    ids = torch.randint(0, 61, (2, L))
    full = m(ids)
    for a in (1, 2, 3, 5, 8, 12):
        cache = cache64(m, 2)
        parts = [m(ids[:, :a], cache=cache)]
        b2 = min(L, a + 4)
        parts.append(m(ids[:, a:b2], cache=cache))
        parts += [m(ids[:, t:t + 1], cache=cache) for t in range(b2, L)]
        assert cache.seqlen_offset == L
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10, msg=f"split {a}")


def test_cache_select_keeps_rows():
    m = model64(tiny())
    ids = torch.randint(0, 61, (3, 10))
    full = m(ids)
    cache = cache64(m, 3)
    m(ids[:, :6], cache=cache)
    sub = cache.select(torch.tensor([2, 0]))
    assert sub.batch_size == 2 and sub.seqlen_offset == 6
    torch.testing.assert_close(m(ids[[2, 0], 6:], cache=sub), full[[2, 0], 6:], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------- packed, padded, causal
def test_packed_documents_equal_separate():
    m = model64(tiny())
    lengths = [6, 1, 3, 9, 2]  # documents shorter than d_conv, and ones that straddle chunks
    docs = [torch.randint(0, 61, (1, n)) for n in lengths]
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(torch.int32)
    packed = m(torch.cat(docs, 1), seq_idx=seq_idx)
    torch.testing.assert_close(packed, torch.cat([m(d) for d in docs], 1), rtol=1e-10, atol=1e-10)


def test_padded_batch_equals_rows_alone():
    m = model64(tiny())
    prompts = [[3, 14, 15, 9, 2, 6, 5], [35, 8], [9, 7, 9, 3]]
    logits_alone = [m(torch.tensor([p])) for p in prompts]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 7 - len(p):] = torch.tensor(p)
        mask[i, 7 - len(p):] = 1
    logits = m(ids, attention_mask=mask)
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i, 7 - len(p):], logits_alone[i][0], rtol=1e-10, atol=1e-10)
    together = generate(m, prompts, 6, temperature=0)
    assert together == [generate(m, [p], 6, temperature=0)[0] for p in prompts]


def test_generation_matches_greedy_without_cache():
    for arch in ARCHS:
        cfg = Mamba2Config.preset("tiny", arch=arch, n_layer=3, attn_num_heads=4)
        m = model64(cfg)
        out = generate(m, [[1, 2, 3]], 5, temperature=0)[0]
        seq = [1, 2, 3]
        for _ in range(5):
            seq.append(int(m(torch.tensor([seq]))[0, -1, :cfg.vocab_size].argmax()))
        assert out == seq[3:], arch


def test_causal():
    m = model64(tiny())
    ids = torch.randint(0, 61, (1, 12))
    base = m(ids)
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % 61
    out = m(ids2)
    torch.testing.assert_close(out[:, :7], base[:, :7], rtol=0, atol=0)
    assert not torch.allclose(out[:, 7], base[:, 7])


# ------------------------------------------------------------------------------------------------ training
def stdlib_rows(n_rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Real text: the standard library's own .py files as bytes, packed into rows with per-row document ids."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tokens, doc = [], []
    for i, path in enumerate(sorted(root.glob("*.py"))):
        data = list(path.read_bytes())[:4000]
        tokens += data
        doc += [i] * len(data)
        if len(tokens) >= n_rows * (seq_len + 1):
            break
    t = torch.tensor(tokens[:n_rows * (seq_len + 1)]).view(n_rows, seq_len + 1)
    d = torch.tensor(doc[:n_rows * (seq_len + 1)]).view(n_rows, seq_len + 1)
    return t, d - d[:, :1]


def test_layout_with_all_three_mixers_trains_on_real_text():
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, n_layer=3, vocab_size=256, d_state=16, headdim=16, chunk_size=32,
                       layout="mamba2,attention+mlp,mamba1", d_intermediate=128, attn_num_heads=4, attn_num_heads_kv=2,
                       attn_d_conv=4)
    m = Mamba2LM(cfg)
    tokens, doc = stdlib_rows(40, 128)
    targets = tokens[:, 1:].clone()
    targets[doc[:, 1:] != doc[:, :-1]] = -100
    inputs, seq_idx = tokens[:, :-1], doc[:, :-1].to(torch.int32)
    held = slice(32, 40)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

    def held_out() -> float:
        with torch.no_grad():
            return float(m.loss(inputs[held], targets[held], seq_idx=seq_idx[held]))

    before = held_out()
    for step in range(30):
        rows = torch.arange(8) + 8 * (step % 4)
        loss = m.loss(inputs[rows], targets[rows], seq_idx=seq_idx[rows])
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
    after = held_out()
    assert before > 5.0 and after < before - 1.5, (before, after)


# ------------------------------------------------------------------------------------ official checkpoints
def official_state_shapes(off: dict) -> dict[str, tuple[int, ...]]:
    """Key → shape of mamba_ssm's MambaLMHeadModel state dict, from its module definitions (Mamba2, MHA,
    GatedMLP with hidden rounded up to 128, Block norm/norm2)."""
    d, n = off["d_model"], off["n_layer"]
    ssm, attn = off["ssm_cfg"], off["attn_cfg"]
    m = off["pad_vocab_size_multiple"]
    vocab = (off["vocab_size"] + m - 1) // m * m
    out = {"backbone.embedding.weight": (vocab, d), "backbone.norm_f.weight": (d,), "lm_head.weight": (vocab, d)}
    di = 2 * d
    N, P = ssm["d_state"], ssm["headdim"]
    H = di // P
    hidden = (off["d_intermediate"] + 127) // 128 * 128
    for i in range(n):
        p = f"backbone.layers.{i}."
        out[p + "norm.weight"] = (d,)
        if i in off["attn_layer_idx"]:
            hd, h = attn["head_dim"], attn["num_heads"]
            qkv = hd * (h + 2 * attn.get("num_heads_kv", h))
            out.update({p + "mixer.in_proj.weight": (qkv, d), p + "mixer.out_proj.weight": (d, hd * h)})
            if attn.get("d_conv", 0):
                out.update({p + "mixer.conv1d.weight": (qkv, 1, attn["d_conv"]), p + "mixer.conv1d.bias": (qkv,)})
        else:
            out.update({p + "mixer.in_proj.weight": (2 * di + 2 * N + H, d), p + "mixer.conv1d.weight": (di + 2 * N, 1, 4),
                        p + "mixer.conv1d.bias": (di + 2 * N,), p + "mixer.dt_bias": (H,), p + "mixer.A_log": (H,),
                        p + "mixer.D": (H,), p + "mixer.norm.weight": (di,), p + "mixer.out_proj.weight": (d, di)})
        if hidden:
            out.update({p + "norm2.weight": (d,), p + "mlp.fc1.weight": (2 * hidden, d),
                        p + "mlp.fc2.weight": (d, hidden)})
    return out


MAMBA2ATTN_2_7B = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
    "attn_layer_idx": [9, 18, 27, 36, 45, 56],
    "attn_cfg": {"causal": True, "d_conv": 4, "head_dim": 128, "num_heads": 30, "out_proj_bias": False,
                 "qkv_proj_bias": False, "rotary_emb_dim": 64},
    "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
    "tie_embeddings": True}


def test_mamba2attn_2_7b_layout_has_official_keys_and_shapes():
    cfg = config_from_mamba_ssm(MAMBA2ATTN_2_7B)
    assert cfg.resolved.attn_rotary_dim == 64 and cfg.resolved.attn_head_dim == 128 and cfg.attn_d_conv == 4
    with torch.device("meta"):
        model = Mamba2LM(cfg)
    expected = official_state_shapes({**MAMBA2ATTN_2_7B, "ssm_cfg": {"d_state": 128, "headdim": 64}})
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("d_intermediate", [0, 100])
def test_official_hybrid_state_dict_loads_and_generates(d_intermediate):
    off = {**MAMBA2ATTN_2_7B, "d_model": 64, "n_layer": 4, "vocab_size": 100, "d_intermediate": d_intermediate,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8}, "attn_layer_idx": [1, 3],
           "attn_cfg": {**MAMBA2ATTN_2_7B["attn_cfg"], "head_dim": 32, "num_heads": 3, "rotary_emb_dim": 16}}
    torch.manual_seed(0)
    state = {k: 0.1 * torch.randn(s) for k, s in official_state_shapes(off).items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    for k in state:
        if k.endswith("A_log"):
            state[k] = torch.rand_like(state[k])
    model = Mamba2LM(config_from_mamba_ssm(off))
    model.load_state_dict(state)          # strict: every official key, nothing else
    ids = torch.randint(0, 100, (1, 12))
    full = model(ids)
    assert torch.isfinite(full).all()
    cache = model.empty_cache(1)
    steps = torch.cat([model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)], 1)
    assert (steps - full).norm() / full.norm() < 1e-4


def test_mamba_ssm_config_round_trip():
    for cfg in (Mamba2Config.preset("tiny", arch="hybrid", n_layer=4, attn_num_heads=2),
                Mamba2Config.preset("tiny", arch="mamba1"), Mamba2Config.preset("tiny"),
                tiny("attention+mlp,mamba2+mlp", d_intermediate=128)):
        off = config_to_mamba_ssm(cfg)
        again = config_from_mamba_ssm(off)
        assert config_to_mamba_ssm(again) == off
        assert again.layer_specs == cfg.layer_specs
    assert config_from_mamba_ssm(config_to_mamba_ssm(Mamba2Config.preset("tiny"))).layout is None
    with pytest.raises(ValueError, match="both Mamba-1 and Mamba-2"):
        config_to_mamba_ssm(tiny())
    with pytest.raises(ValueError, match="unknown keys"):
        config_from_mamba_ssm({**MAMBA2ATTN_2_7B, "n_heads": 3})
    with pytest.raises(ValueError, match=r"attn_layer_idx \[9, 99\]"):
        config_from_mamba_ssm({**MAMBA2ATTN_2_7B, "attn_layer_idx": [9, 99]})


# ------------------------------------------------------------------------------------- Transformer++, presets
def test_transformer_pp_is_attention_swiglu_rmsnorm_rotary_without_biases():
    cfg = Mamba2Config.preset("small", arch="transformer++")
    assert cfg.n_layer == 2 and all(s == ("attention", True) for s in cfg.layer_specs)
    assert cfg.resolved.attn_rotary_dim == cfg.resolved.attn_head_dim and cfg.d_intermediate % 64 == 0
    m = Mamba2LM(cfg)
    names = {k for k, _ in m.named_parameters()}
    assert not any(k.endswith("bias") for k in names)
    assert {k.split(".", 3)[3] for k in names if k.startswith("backbone.layers.")} == {
        "norm.weight", "mixer.in_proj.weight", "mixer.out_proj.weight", "norm2.weight", "mlp.fc1.weight",
        "mlp.fc2.weight"}
    assert "backbone.layers.0.norm2.weight" in m.no_decay_param_names()
    assert Mamba2Config.preset("small", arch="transformer++", n_layer=3).n_layer == 3


def test_hybrid_arch_places_about_ten_percent_attention():
    cfg = Mamba2Config.preset("130m", arch="hybrid")
    attn = [i for i, s in enumerate(cfg.layer_specs) if s.mixer == "attention"]
    assert len(attn) == 2 and 0 < attn[0] < attn[1] < 23


def test_config_round_trips_and_checkpoints_every_arch(tmp_path):
    from mamba2 import checkpoints
    from mamba2.tokenizer import ByteTokenizer

    for arch in ARCHS:
        cfg = Mamba2Config.preset("tiny", arch=arch, n_layer=3, attn_num_heads=2)
        assert Mamba2Config.from_dict(cfg.to_dict()) == cfg
        m = Mamba2LM(cfg)
        checkpoints.save(tmp_path / arch, m, cfg, ByteTokenizer())
        loaded, cfg2, _, _ = checkpoints.load(tmp_path / arch)
        assert cfg2 == cfg
        ids = torch.randint(0, 256, (1, 9))
        torch.testing.assert_close(loaded(ids), m.eval()(ids))


def test_layout_string_form():
    cfg = Mamba2Config(d_model=32, n_layer=5, vocab_size=64, layout="mamba2*2, attention+mlp ,MAMBA1*2",
                       d_intermediate=64, d_state=8, headdim=8)
    assert cfg.layout == ("mamba2", "mamba2", "attention+mlp", "mamba1", "mamba1")
    assert cfg.to_dict()["layout"] == list(cfg.layout)


# ------------------------------------------------------------------------------------------- config errors
BAD = [
    (dict(layout="mamba2,transformer"), r"layout\[1\] = 'transformer': unknown mixer 'transformer'"),
    (dict(layout="mamba2*3"), r"layout has 3 entries but n_layer=2"),
    (dict(layout="mamba2*0,mamba2"), r"'mamba2\*0'.*positive integer"),
    (dict(layout="mamba2,attention+mlp"), r"layers \[1\] have '\+mlp' but d_intermediate=0"),
    (dict(layout="mamba2,attention", d_intermediate=64), r"d_intermediate=64 but no layer in layout has '\+mlp'"),
    (dict(layout="mamba2,attention", attn_num_heads=4, attn_num_heads_kv=3),
     r"attn_num_heads % attn_num_heads_kv == 0 .* attn_num_heads=4, attn_num_heads_kv=3"),
    (dict(layout="attention,attention", attn_num_heads=5), r"d_model % attn_num_heads == 0 .* d_model=32, attn_num_heads=5"),
    (dict(layout="attention,attention", attn_num_heads=4, attn_rotary_dim=3), r"attn_rotary_dim must be an even .* got 3"),
    (dict(layout="attention,attention", attn_num_heads=4, attn_rotary_dim=10), r"attn_head_dim=8\], got 10"),
    (dict(layout="attention,attention", attn_d_conv=-1), r"attn_d_conv must be an integer >= 0"),
    (dict(layout="mamba1,mamba1", dt_rank=0), r"dt_rank must be a positive integer, got 0"),
    (dict(layout="mamba2,mamba1", headdim=12), r"d_ssm % headdim == 0 required, got d_ssm=64, headdim=12"),
    (dict(d_intermediate=-1), r"d_intermediate must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("kw,message", BAD)
def test_impossible_layouts_fail_clearly(kw, message):
    with pytest.raises(ValueError, match=message):
        Mamba2Config(**{**dict(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=8), **kw})


def test_constraints_of_absent_mixers_are_not_checked():
    cfg = Mamba2Config(d_model=30, n_layer=2, vocab_size=64, headdim=64, layout="attention,attention",
                       attn_num_heads=3)   # d_inner=60 is no multiple of headdim, but no layer is Mamba-2
    assert Mamba2LM(cfg)(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 64)
    with pytest.raises(ValueError, match=re.escape("unknown arch 'gpt'")):
        Mamba2Config.preset("tiny", arch="gpt")
