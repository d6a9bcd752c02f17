"""Corpus loading, split, tokenizers and the packing loader."""

import json
import string
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba2.data import (IGNORE_INDEX, Document, PackedLoader, eval_batches, load_corpus, load_documents,
                         split_documents, tokenize)
from mamba2.errors import UserError
from mamba2.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, load_tokenizer_from_dir, save_tokenizer

LETTERS = string.ascii_letters  # 52 distinct one-byte tokens: one per synthetic document


def letter_docs(lengths):
    """Document i is LETTERS[i] repeated: each token tells which document it came from."""
    return [Document(f"d{i}", LETTERS[i] * n) for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def letter_stream():
    rng = np.random.default_rng(0)
    lengths = [1, 2, 3, 4, 5] + rng.integers(1, 60, size=40).tolist()  # many docs shorter than a row
    return tokenize(letter_docs(lengths), ByteTokenizer()), lengths


def check_rows(batch, row_len):
    ids, tgt, seq = (t.numpy() for t in batch)
    assert ids.dtype == np.int64 and tgt.dtype == np.int64 and seq.dtype == np.int32
    assert ids.shape == tgt.shape == seq.shape and ids.shape[1] == row_len - 1
    assert set(np.unique(ids)) <= set(LETTERS.encode()), "a position holds something other than text: padding"
    for r in range(ids.shape[0]):
        assert seq[r, 0] == 0
        starts_new = np.concatenate([[False], ids[r, 1:] != ids[r, :-1]])
        # seq_idx steps by one exactly where the document changes, never elsewhere
        np.testing.assert_array_equal(np.diff(seq[r]), starts_new[1:].astype(np.int32))
        # targets are the next tokens, masked exactly where the next token is in another document
        same_doc = ids[r, 1:] == ids[r, :-1]
        np.testing.assert_array_equal(tgt[r, :-1][same_doc], ids[r, 1:][same_doc])
        assert np.all(tgt[r, :-1][~same_doc] == IGNORE_INDEX)
        assert tgt[r, -1] in (IGNORE_INDEX, ids[r, -1])


def test_packing_has_no_padding_and_marks_documents(letter_stream):
    stream, lengths = letter_stream
    seq_len = 16
    loader = PackedLoader(stream, batch_size=3, seq_len=seq_len, seed=1)
    for k in range(12):
        check_rows(loader.batch(k), seq_len + 1)


def test_an_epoch_cuts_disjoint_rows_from_the_documents(letter_stream):
    stream, lengths = letter_stream
    seq_len, bsz = 10, 2
    loader = PackedLoader(stream, batch_size=bsz, seq_len=seq_len, seed=3)
    epoch_rows = loader.rows_per_epoch
    assert epoch_rows == len(stream.tokens) // (seq_len + 1)
    counts = np.zeros(256, dtype=np.int64)
    for k in range(epoch_rows // bsz):
        ids, tgt, _ = loader.batch(k)
        last = np.where(tgt[:, -1].numpy() == IGNORE_INDEX, -1, tgt[:, -1].numpy())
        for r in range(bsz):
            counts[ids[r].numpy()] += 1
            if last[r] >= 0:
                counts[last[r]] += 1
    # no document contributes more tokens than it has: rows never overlap within an epoch
    for i, n in enumerate(lengths):
        assert counts[ord(LETTERS[i])] <= n
    assert counts.sum() <= len(stream.tokens)


def test_batches_are_a_function_of_seed_and_index(letter_stream):
    stream, _ = letter_stream
    a = PackedLoader(stream, batch_size=4, seq_len=8, seed=7)
    b = PackedLoader(stream, batch_size=4, seq_len=8, seed=7)
    other = PackedLoader(stream, batch_size=4, seq_len=8, seed=8)
    ks = [0, 1, 5, a.rows_per_epoch // 4, a.rows_per_epoch // 4 + 1, 3 * a.rows_per_epoch]  # crosses epochs
    forward = [a.batch(k) for k in ks]
    backward = [b.batch(k) for k in reversed(ks)][::-1]  # random access, other order, fresh loader
    for x, y in zip(forward, backward):
        for tx, ty in zip(x, y):
            assert np.array_equal(tx.numpy(), ty.numpy())
    assert not all(np.array_equal(a.batch(k).input_ids, other.batch(k).input_ids) for k in range(3))
    assert not np.array_equal(a.batch(0).input_ids, a.batch(a.rows_per_epoch // 4 + 1).input_ids)


def test_loader_needs_one_row():
    stream = tokenize(letter_docs([3, 4]), ByteTokenizer())
    with pytest.raises(UserError, match="fewer than seq_len"):
        PackedLoader(stream, batch_size=1, seq_len=7)


def test_eval_batches_predict_every_token_once(letter_stream):
    stream, _ = letter_stream
    n = len(stream.tokens)
    seen = 0
    for batch in eval_batches(stream, batch_size=3, seq_len=9):
        check_rows(batch, batch.input_ids.shape[1] + 1)
        seen += batch.targets.numel()
    assert seen == n - 1
    for cap in (40, 5, 9):                      # at most max_tokens predictions, also below one row
        capped = list(eval_batches(stream, batch_size=2, seq_len=9, max_tokens=cap))
        assert sum(b.input_ids.numel() for b in capped) == cap


def test_split_is_deterministic_disjoint_and_nonempty():
    docs = [Document(f"pkg/mod{i}.py", f"x = {i}\n") for i in range(300)]
    train, val = split_documents(docs, 0.02)
    assert split_documents(list(reversed(docs)), 0.02)[1] == list(reversed(val))  # by name, not position
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == 300 and 1 <= len(val) < 20
    for few in (docs[:2], docs[:3]):
        tr, va = split_documents(few, 0.02)
        assert len(tr) >= 1 and len(va) >= 1


def test_single_document_is_cut_at_a_line():
    text = "".join(f"line {i}\n" for i in range(200))
    (train,), (val,) = split_documents([Document("book.txt", text)], 0.05)
    assert train.text + val.text == text
    assert train.text.endswith("\n") and 0.03 < len(val.text) / len(text) < 0.07


def test_stdlib_corpus_excludes_tests_and_is_sorted():
    docs = load_documents(None)
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) > 100
    assert "os.py" in names and "json/decoder.py" in names
    skipped = {"test", "tests", "idle_test", "site-packages"}
    assert not [n for n in names if skipped & set(Path(n).parts[:-1])]
    assert Path(sysconfig.get_paths()["stdlib"], "test").is_dir()  # so the exclusion was exercised


def test_folder_jsonl_and_text_corpora(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bravo")
    (tmp_path / "sub" / "a.md").write_text("alpha")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    (tmp_path / ".hidden").write_text("secret")
    assert [(d.name, d.text) for d in load_documents(tmp_path)] == [("b.txt", "bravo"), ("sub/a.md", "alpha")]
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert [d.text for d in load_documents(jl)] == ["one", "two"]
    assert [d.text for d in load_documents(tmp_path / "b.txt")] == ["bravo"]


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"), ("empty_dir", "empty"), ("blank_file", "empty"), ("not_utf8", "not UTF-8"),
    ("no_text_field", '"text"'), ("bad_json", "not valid JSON"), ("unreadable", "cannot read"),
])
def test_corpus_errors_are_user_errors(tmp_path, monkeypatch, case, match):
    path = tmp_path / "corpus.txt"
    if case == "empty_dir":
        path = tmp_path / "d"
        path.mkdir()
    elif case == "blank_file":
        path.write_text("\n \n")
    elif case == "not_utf8":
        path.write_bytes(b"caf\xe9 latin-1")
    elif case == "no_text_field":
        path = tmp_path / "c.jsonl"
        path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    elif case == "bad_json":
        path = tmp_path / "c.jsonl"
        path.write_text('{"text": "ok"\n')
    elif case == "unreadable":
        path.write_text("fine")

        def deny(self):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(Path, "read_bytes", deny)  # chmod does not stop root
    with pytest.raises(UserError, match=match):
        load_documents(path)


def test_vocab_check_names_the_id_and_the_size():
    stream = tokenize([Document("a", "az")], ByteTokenizer())
    stream.check_vocab(123)
    with pytest.raises(UserError, match=r"token id 122 .*vocab_size=100"):
        stream.check_vocab(100)


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_tokenizer_decodes_cut_characters_with_replacement():
    ids = ByteTokenizer().encode("é")
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


@pytest.fixture
def hf_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def main():\n    return 0\n"] * 20 + ["class A:\n    pass\n"] * 20, trainer)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_hf_tokenizer_round_trip_eos_and_checkpoint_copy(hf_tokenizer_file, tmp_path):
    tok = load_tokenizer(hf_tokenizer_file)
    assert isinstance(tok, HFTokenizer) and tok.eos_token_id == 0 and tok.vocab_size <= 300
    text = "def main():\n    return 1\n"
    assert tok.decode(tok.encode(text)) == text
    stream = tokenize([Document("a", text), Document("b", "class A:\n")], tok)
    assert stream.tokens[stream.offsets[1] - 1] == 0 and stream.tokens[-1] == 0  # EOS ends each document
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_tokenizer(tok, ckpt)
    hf_tokenizer_file.unlink()  # the checkpoint keeps its own copy
    again = load_tokenizer_from_dir(ckpt)
    assert again.encode(text) == tok.encode(text) and again.vocab_size == tok.vocab_size
    (ckpt / "tokenizer.json").unlink()   # the copy lost too: the error says which file to put back, and where
    with pytest.raises(UserError, match=r"tokenizer file tokenizer\.json is missing .*copy that file back to "):
        load_tokenizer_from_dir(ckpt)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match=r"is a directory: give the tokenizer\.json file in it"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="the tokenizer path is empty"):
        load_tokenizer("")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer(bad)
    with pytest.raises(UserError, match="tokenizer_spec.json"):
        load_tokenizer_from_dir(tmp_path)


def test_load_corpus_gives_train_and_val(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}.py").write_text(f"x{i} = {i}\n" * (i + 1))
    train, val = load_corpus(tmp_path, ByteTokenizer())
    assert train.n_docs + val.n_docs == 30 and val.n_docs >= 1
    assert train.tokens.dtype == np.uint16 and train.tokens_per_byte == 1.0
