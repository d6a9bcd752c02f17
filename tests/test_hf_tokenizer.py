"""A byte-tokenizer model exported ``--to hf`` carries a ``tokenizer.json`` that transformers' ``AutoTokenizer``
loads and that encodes exactly as :class:`mamba2.tokenizer.ByteTokenizer` does (issue 15)."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from mamba2 import Mamba2Config, Mamba2LM
from mamba2.interop import add_convert_command, load, save_pretrained
from mamba2.tokenizer import HF_FILE, ByteTokenizer, HFTokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

TEXTS = ["hello", "héllo 世界\n\tx", "  two  spaces\n\nand a 😀", "\x00\x7f control", "Ā is not byte 0", ""]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=8))
    return save_pretrained(model, tmp_path_factory.mktemp("hf") / "out", format="hf", tokenizer=ByteTokenizer())


def test_auto_tokenizer_encodes_and_decodes_bytes(hf_dir):
    tok = AutoTokenizer.from_pretrained(hf_dir)
    assert len(tok) == 256
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text
    assert tok("héllo")["input_ids"] == [104, 195, 169, 108, 108, 111]


def test_id_b_is_byte_b(hf_dir):
    """Every one of the 256 ids, including bytes no valid UTF-8 text holds, is GPT-2's stand-in for that byte."""
    vocab = AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    assert vocab == {c: b for b, c in bytes_to_unicode().items()}


def test_our_loader_reads_it_back(hf_dir):
    loaded = load(hf_dir)
    assert loaded.format == "hf" and isinstance(loaded.tokenizer, ByteTokenizer)
    bare = HFTokenizer(hf_dir / HF_FILE)          # a directory without our tokenizer_spec.json
    assert bare.vocab_size == 256 and bare.eos_token_id is None
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == bare.encode(text) == list(text.encode("utf-8"))
        assert bare.decode(bare.encode(text)) == text


def test_convert_cli_writes_it(tmp_path):
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=8, chunk_size=8))
    save_pretrained(model, tmp_path / "ours", tokenizer=ByteTokenizer())
    parser = argparse.ArgumentParser(prog="mamba2")
    add_convert_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"])
    assert args.func(args) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode("héllo 世界\n\tx") == list("héllo 世界\n\tx".encode())


def test_without_the_files_transformers_encodes_nothing(hf_dir, tmp_path):
    """The old export (our tokenizer_spec.json only): AutoTokenizer silently falls back to an empty GPT-NeoX
    tokenizer that encodes text to [], which the tests above reject."""
    old = tmp_path / "old"
    old.mkdir()
    for f in hf_dir.iterdir():
        if f.name not in (HF_FILE, "tokenizer_config.json"):
            (old / f.name).write_bytes(f.read_bytes())
    assert AutoTokenizer.from_pretrained(old).encode("héllo") == []
