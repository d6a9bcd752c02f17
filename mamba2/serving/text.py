"""Output text of a request as its tokens arrive: stop strings, and text released only once it is final (shared by
``mamba2 generate`` and the HTTP server)."""

from __future__ import annotations

from typing import Any, Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first of ``stops`` (empty strings never match), and whether one was found."""
    hits = [text.index(st) for st in stops if st and st in text]
    return (text[:min(hits)], True) if hits else (text, False)


class TextStream:
    """The text of a growing list of token ids, released as it becomes final.

    Held back: an incomplete multi-byte character at the end (the tokenizer decodes it to U+FFFD until its last
    byte arrives; no stop string is matched in it before then) and any tail that could still become a stop
    string. The text ends before the first stop
    string; :attr:`stopped` says one was found. The whole list is decoded on each :meth:`add`, because tokens do
    not decode one by one (a character may span tokens; some decoders join tokens).

    Args:
        tokenizer: anything with ``decode(ids) -> str``.
        stops: stop strings (empty ones are ignored).
        skip_ids: token ids that are not text (the EOS a request stops at): left out of :attr:`ids` and the text.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), skip_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.stops = [st for st in stops if st]
        self.skip_ids = frozenset(skip_ids)
        self.ids: list[int] = []
        self.stopped = False
        self._cut = ""            # the text, fixed once a stop string is found
        self._hold = max((len(st) for st in self.stops), default=1) - 1
        self._released = 0

    def add(self, ids: Sequence[int]) -> str:
        """Take new token ids; returns the text that became final (possibly ""; always "" once stopped)."""
        self.ids.extend(t for t in ids if t not in self.skip_ids)
        if self.stopped:
            return ""
        # a trailing U+FFFD may be a character whose last bytes are still to come: no stop is matched in it and
        # it is not released until the next character (or the end) settles it
        text = self._cut_at_stop(self.tokenizer.decode(self.ids).rstrip("\ufffd"))
        return self._release(text if self.stopped else text[:max(0, len(text) - self._hold)])

    @property
    def text(self) -> str:
        """The whole text so far, held back or not, up to the first stop string."""
        return self._cut if self.stopped else cut_at_stop(self.tokenizer.decode(self.ids), self.stops)[0]

    def finish(self) -> str:
        """The rest of :attr:`text` (the request has ended: a trailing U+FFFD is final now, and may be a stop)."""
        if not self.stopped:
            self._cut_at_stop(self.tokenizer.decode(self.ids))
        return self._release(self.text)

    def _cut_at_stop(self, text: str) -> str:
        """``text`` cut at its first stop string; a cut is kept as the final text."""
        text, self.stopped = cut_at_stop(text, self.stops)
        if self.stopped:
            self._cut = text
        return text

    def _release(self, text: str) -> str:
        new = text[self._released:]
        self._released = max(self._released, len(text))
        return new
