"""Tokenizers: raw UTF-8 bytes, or a Hugging Face ``tokenizers`` ``tokenizer.json``.

A checkpoint keeps its own tokenizer: :func:`save_tokenizer` writes ``tokenizer_spec.json`` (and a copy of
``tokenizer.json``) into the checkpoint directory and :func:`load_tokenizer_from_dir` reads them back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mamba2.errors import UserError

SPEC_FILE = "tokenizer_spec.json"
HF_FILE = "tokenizer.json"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def to_spec(self) -> dict[str, Any]: ...


class ByteTokenizer:
    """One token per UTF-8 byte: ``vocab_size`` 256, no special tokens (``eos_token_id`` is None)."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``; bytes that were not valid UTF-8 and were decoded with ``surrogateescape`` (as
        Python decodes argv and file names) come back as themselves. Raises UnicodeEncodeError for other lone
        surrogates."""
        return list(text.encode("utf-8", "surrogateescape"))

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns a uint8 numpy array (fast path for corpora)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        """Bytes to text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.

        Raises:
            ValueError: an id outside 0..255.
        """
        return bytes(ids).decode("utf-8", errors="replace")

    def to_spec(self) -> dict[str, Any]:
        return {"type": "bytes"}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    ``vocab_size`` counts added tokens; ``eos_token_id`` is the first of ``<|endoftext|>``, ``</s>``, ``<eos>``,
    ``<|end_of_text|>`` present in the vocabulary, else None.

    Raises:
        UserError: the file is missing or is not a valid tokenizer.json.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tok

        if not str(path):
            raise UserError("the tokenizer path is empty: give 'bytes' or a tokenizer.json file")
        self.path = Path(path)
        if self.path.is_dir():
            raise UserError(f"tokenizer {self.path} is a directory: give the tokenizer.json file in it")
        if not self.path.is_file():
            raise UserError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = _Tok.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"cannot load tokenizer {self.path}: {str(e).splitlines()[0]}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        ids = (self._tok.token_to_id(t) for t in _EOS_CANDIDATES)
        self.eos_token_id = next((i for i in ids if i is not None), None)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Raises UnicodeEncodeError for text that is not valid Unicode (lone surrogates,
        e.g. invalid UTF-8 bytes decoded with ``surrogateescape``), as :class:`ByteTokenizer` does for most."""
        text.encode("utf-8")           # tokenizers would raise a bare TypeError
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def to_spec(self) -> dict[str, Any]:
        return {"type": "huggingface", "file": HF_FILE}


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """``"bytes"`` gives a :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json``.

    Raises:
        UserError: missing or invalid tokenizer file.
    """
    if str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def same_tokenizer(a: ByteTokenizer | HFTokenizer, b: ByteTokenizer | HFTokenizer) -> bool:
    """Whether two tokenizers map text to the same ids: both byte-level, or both Hugging Face tokenizers with the
    same serialized definition (vocabulary, merges, normalizer, pre-tokenizer, added tokens)."""
    if isinstance(a, HFTokenizer) and isinstance(b, HFTokenizer):
        return a._tok.to_str() == b._tok.to_str()
    return type(a) is type(b)


def save_tokenizer(tokenizer: ByteTokenizer | HFTokenizer, directory: str | Path) -> None:
    """Write ``tokenizer_spec.json`` (and a copy of ``tokenizer.json`` for a Hugging Face tokenizer)."""
    directory = Path(directory)
    if isinstance(tokenizer, HFTokenizer):
        shutil.copyfile(tokenizer.path, directory / HF_FILE)
    (directory / SPEC_FILE).write_text(json.dumps(tokenizer.to_spec()) + "\n")


def load_tokenizer_from_dir(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """Read the tokenizer a checkpoint directory keeps (written by :func:`save_tokenizer`).

    Raises:
        UserError: missing or unknown tokenizer spec, or a missing/invalid ``tokenizer.json``.
    """
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    try:
        spec = json.loads(spec_path.read_text())
        kind = spec["type"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{directory}: missing or invalid {SPEC_FILE}") from None
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "huggingface":
        file = directory / spec.get("file", HF_FILE)
        if not file.exists():   # the model's ids mean nothing without it: say how to put it back
            raise UserError(f"{directory}: its tokenizer file {file.name} is missing (the directory keeps a copy of "
                            f"the tokenizer.json the model was trained with: copy that file back to {file})")
        return HFTokenizer(file)
    raise UserError(f"{spec_path}: unknown tokenizer type {kind!r}")
