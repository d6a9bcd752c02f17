"""Corpus loading, train/validation split, tokenization and the packing loader.

A corpus is a list of documents: the files of a folder, the lines of a ``.jsonl`` file, or the Python standard
library's own source (the default: real text on every machine, no download). Documents are tokenized into one
flat array; the loader packs them back to back into fixed-length rows (no padding) and marks, per position,
which document it belongs to (``seq_idx``), so the model never mixes two documents.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from mamba2.errors import UserError
from mamba2.tokenizer import Tokenizer

STDLIB = "stdlib"
IGNORE_INDEX = -100
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str  # stable across machines: a relative path or "<file>:<line>"; decides the split
    text: str


# ---------------------------------------------------------------------------------------------- loading
def load_documents(corpus: str | Path | None = None) -> list[Document]:
    """Read a corpus into documents (empty documents dropped).

    ``corpus``: None or ``"stdlib"`` (the running interpreter's standard library ``*.py`` files, test folders
    and site-packages excluded); a ``.jsonl`` file (one document per line, from its ``"text"`` field); another
    file (one document); or a folder (every non-hidden UTF-8 text file below it, binary files skipped).
    Documents come in sorted path order.

    Raises:
        UserError: missing path, unreadable file, a file that is not UTF-8 text, a ``.jsonl`` line that is not
            a JSON object with a string ``"text"``, or a corpus with no text at all.
    """
    if corpus is None or str(corpus) == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        docs = _read_folder(root, pattern="*.py", skip_dirs=_STDLIB_SKIP_DIRS)
        where = f"the Python standard library at {root}"
    else:
        path = Path(corpus)
        where = str(path)
        if not path.exists():
            raise UserError(f"corpus not found: {path}")
        if path.is_dir():
            docs = _read_folder(path, pattern="*", skip_dirs=set())
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path)
        else:
            docs = [Document(path.name, _read_text(path))]
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise UserError(f"corpus is empty: no text in {where}")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start})") from None


def _read_folder(root: Path, pattern: str, skip_dirs: set[str]) -> list[Document]:
    docs = []
    for path in sorted(root.rglob(pattern)):
        rel = path.relative_to(root)
        if any(p.startswith(".") for p in rel.parts) or any(p in skip_dirs for p in rel.parts[:-1]):
            continue
        if not path.is_file():
            continue
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        if b"\0" in raw:
            continue  # binary file inside a folder corpus
        try:
            docs.append(Document(rel.as_posix(), raw.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    for i, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise UserError(f'{path}:{i}: each line must be a JSON object with a string "text" field')
        docs.append(Document(f"{path.name}:{i}", obj["text"]))
    return docs


# ---------------------------------------------------------------------------------------------- split
def _unit_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2.0**64


def split_documents(docs: list[Document], val_fraction: float = 0.02) -> tuple[list[Document], list[Document]]:
    """Deterministic train/validation split by a hash of each document's name (order kept).

    Each split gets at least one document. A single-document corpus is cut at a line boundary so that about
    ``val_fraction`` of its characters are held out.

    Raises:
        UserError: ``val_fraction`` not in (0, 1), or a single document too short to split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) == 1:
        return _split_single(docs[0], val_fraction)
    h = [_unit_hash(d.name) for d in docs]
    is_val = [x < val_fraction for x in h]
    if not any(is_val):
        is_val[int(np.argmin(h))] = True
    if all(is_val):
        is_val[int(np.argmax(h))] = False
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


def _split_single(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    cut = int(len(text) * (1.0 - val_fraction))
    line_cut = text.rfind("\n", 0, cut) + 1
    cut = line_cut if 0 < line_cut < len(text) else cut
    cut = min(max(cut, 1), len(text) - 1)
    if cut <= 0 or not text[:cut].strip() or not text[cut:].strip():
        raise UserError(f"corpus {doc.name!r} is too short to hold out a validation part")
    return [Document(doc.name + "#train", text[:cut])], [Document(doc.name + "#val", text[cut:])]


# ---------------------------------------------------------------------------------------------- tokens
@dataclass
class TokenStream:
    """Documents tokenized back to back.

    ``tokens``: (n,) uint16 (vocab ≤ 65536) or int32; document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
    (an EOS token ends each document when the tokenizer has one). ``n_bytes``: UTF-8 bytes of the text.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    n_bytes: int
    n_eos: int = 0

    @property
    def n_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def tokens_per_byte(self) -> float:
        """Text tokens (EOS excluded) per UTF-8 byte: turns nats per token into bits per byte."""
        return (len(self.tokens) - self.n_eos) / max(self.n_bytes, 1)

    def check_vocab(self, vocab_size: int) -> None:
        """Raises UserError if a token id is ≥ ``vocab_size`` (the model's vocabulary)."""
        if len(self.tokens) and int(self.tokens.max()) >= vocab_size:
            bad = int(self.tokens.max())
            raise UserError(f"token id {bad} is outside the model's vocabulary (vocab_size={vocab_size})")


def tokenize(docs: list[Document], tokenizer: Tokenizer) -> TokenStream:
    """Tokenize documents into one :class:`TokenStream` (appending the tokenizer's EOS, if any, to each)."""
    eos = tokenizer.eos_token_id
    texts = [d.text for d in docs]
    if hasattr(tokenizer, "encode_array"):
        pieces = [tokenizer.encode_array(t) for t in texts]
    elif hasattr(tokenizer, "encode_batch"):
        pieces = [np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(texts)]
    else:
        pieces = [np.asarray(tokenizer.encode(t), dtype=np.int64) for t in texts]
    if eos is not None:
        pieces = [np.append(p, eos) for p in pieces]
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(pieces).astype(dtype) if pieces else np.zeros(0, dtype)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return TokenStream(tokens, offsets, n_bytes, n_eos=len(docs) if eos is not None else 0)


def load_corpus(corpus: str | Path | None, tokenizer: Tokenizer,
                val_fraction: float = 0.02) -> tuple[TokenStream, TokenStream]:
    """Read, split and tokenize a corpus: ``(train, validation)`` streams. Raises UserError (see above)."""
    train_docs, val_docs = split_documents(load_documents(corpus), val_fraction)
    return tokenize(train_docs, tokenizer), tokenize(val_docs, tokenizer)


def corpus_spec(corpus: str | Path | None) -> str:
    """A string that names the corpus again later (for checkpoints): ``"stdlib"`` or an absolute path."""
    return STDLIB if corpus is None or str(corpus) == STDLIB else str(Path(corpus).resolve())


# ---------------------------------------------------------------------------------------------- batches
class Batch(NamedTuple):
    """``input_ids`` (b, L) int64; ``targets`` (b, L) int64, -100 where the next token starts another document;
    ``seq_idx`` (b, L) int32, the document index of each position counted from 0 within each row."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    seq_idx: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))


def _make_batch(tokens: np.ndarray, doc_of: np.ndarray) -> Batch:
    """tokens, doc_of: (b, L+1) arrays of a row and the document id of each position."""
    seq = doc_of - doc_of[:, :1]
    targets = tokens[:, 1:].astype(np.int64)
    targets[seq[:, 1:] != seq[:, :-1]] = IGNORE_INDEX
    return Batch(torch.from_numpy(tokens[:, :-1].astype(np.int64)), torch.from_numpy(targets),
                 torch.from_numpy(seq[:, :-1].astype(np.int32)))


class PackedLoader:
    """Fixed-length rows of ``seq_len + 1`` tokens cut from documents packed back to back, no padding.

    Each epoch shuffles the document order and then the row order, from ``(seed, epoch)``. Batch ``k`` is a
    pure function of ``(seed, k)``: resuming at step k needs nothing but k.

    Raises:
        UserError: the stream holds fewer than ``seq_len + 1`` tokens.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch size and sequence length must be ≥ 1, got {batch_size} and {seq_len}")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.rows_per_epoch = len(stream.tokens) // (seq_len + 1)
        if self.rows_per_epoch == 0:
            raise UserError(f"the training split has {len(stream.tokens)} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}; use a smaller --seq-len or a bigger corpus")
        self._cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens in this epoch's document order, their offsets, row permutation)."""
        if self._cache is None or self._cache[0] != epoch:
            s = self.stream
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(s.n_docs)
            lengths = np.diff(s.offsets)[order]
            new_offsets = np.concatenate([[0], np.cumsum(lengths)])
            index = np.repeat(s.offsets[order] - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
            self._cache = (epoch, s.tokens[index], new_offsets, rng.permutation(self.rows_per_epoch))
        return self._cache[1:]

    def batch(self, k: int) -> Batch:
        """The k-th batch (k ≥ 0): tensors of shape (batch_size, seq_len)."""
        row_len = self.seq_len + 1
        rows = k * self.batch_size + np.arange(self.batch_size)
        tokens = np.empty((self.batch_size, row_len), dtype=np.int64)
        docs = np.empty((self.batch_size, row_len), dtype=np.int64)
        for epoch in np.unique(rows // self.rows_per_epoch):
            sel = rows // self.rows_per_epoch == epoch
            stream, offsets, perm = self._epoch(int(epoch))
            starts = perm[rows[sel] % self.rows_per_epoch] * row_len
            pos = starts[:, None] + np.arange(row_len)
            tokens[sel] = stream[pos]
            docs[sel] = np.searchsorted(offsets, pos, side="right") - 1
        return _make_batch(tokens, docs)


def eval_batches(stream: TokenStream, batch_size: int, seq_len: int,
                 max_tokens: int | None = None) -> Iterator[Batch]:
    """Consecutive rows over a stream in order (no shuffling), for evaluation.

    Rows overlap by one token so every token but the first is predicted once; covers the whole stream (the
    tail as a last, shorter row), or only its first ``max_tokens`` + 1 tokens (at most ``max_tokens`` predictions).
    """
    row_len = seq_len + 1
    n = len(stream.tokens) if max_tokens is None else min(len(stream.tokens), max_tokens + 1)
    starts = list(range(0, max(n - 1, 0), seq_len))  # stride seq_len: every token is a target exactly once
    full = [s for s in starts if s + row_len <= n]
    tail = [s for s in starts if s + row_len > n][:1]
    docs_all = np.searchsorted(stream.offsets, np.arange(n), side="right") - 1
    for i in range(0, len(full), batch_size):
        pos = np.asarray(full[i:i + batch_size])[:, None] + np.arange(row_len)
        yield _make_batch(stream.tokens[pos].astype(np.int64), docs_all[pos])
    for s in tail:
        yield _make_batch(stream.tokens[None, s:n].astype(np.int64), docs_all[None, s:n])
