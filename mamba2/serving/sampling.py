"""Sampling on the device with per-row settings and per-row seeds (docs/design.md §7.2).

Every row has its own temperature, top-k, top-p, min-p, repetition penalty and seed. Randomness is a hash of
(seed, position in the output, token id): no generator object and no host state, so a request draws the same
tokens alone or in any batch, the whole sampler is a fixed sequence of tensor ops (CUDA-graph capturable), and
a run is reproducible from its seeds. A row is drawn by the Gumbel-max trick: argmax over the kept tokens of
``logit / temperature + Gumbel noise``, which picks token i with probability softmax(logits / T)[i] restricted
and renormalised to the kept set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mamba2.layers.slots import Slots, as_index, take

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued (the OpenAI / vLLM field names).

    Attributes:
        max_tokens: new tokens at most (>= 0).
        temperature: 0 is greedy; > 0 divides the logits.
        top_k: keep the k most likely tokens (0: all; -1, vLLM's spelling, is taken as 0).
        top_p: keep the smallest set whose probability reaches p, after top-k (1: all).
        min_p: drop tokens less likely than min_p × the most likely one (0: none).
        repetition_penalty: > 1 makes tokens already in the prompt or output less likely (the CTRL / HF rule:
            a positive logit is divided by it, a negative one multiplied); 1 is off.
        seed: the row's random stream; None draws one.
        stop_token_ids: the request ends after producing one of these (the token is kept).
    Raises:
        ValueError: naming the field, the constraint and the value.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.max_tokens) or self.max_tokens < 0:
            bad("max_tokens", "an integer >= 0")
        if not is_num(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0")
        if not is_int(self.top_k) or not -1 <= self.top_k < 2 ** 31:
            bad("top_k", "an integer in [-1, 2**31) (0 and -1, vLLM's spelling: off)")
        object.__setattr__(self, "top_k", max(self.top_k, 0))
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a finite number > 0")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 63):
            bad("seed", "an integer in [0, 2**63) (or not given)")
        if not all(is_int(t) and 0 <= t < 2 ** 63 for t in self.stop_token_ids):
            bad("stop_token_ids", "non-negative integer token ids")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        """Temperature 0 without a repetition penalty: the argmax of the raw logits."""
        return self.temperature == 0 and self.repetition_penalty == 1


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x · c) mod 2³² for int64 x in [0, 2³²), without int64 overflow (two 16-bit halves of c)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 x in [0, 2³²)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """Uniform numbers in (0, 1), (batch, vocab_size) float32, a pure function of (seed, position, token id).

    seed, position: (batch,) int64 (seed in [0, 2⁶³)).
    """
    row = _mix32((seed & _M32) ^ _mix32((seed >> 32) & _M32))
    row = _mix32(row ^ _mul32(position & _M32, 0x9E3779B1))
    ids = torch.arange(vocab_size, device=seed.device, dtype=torch.int64)
    h = _mix32(row[:, None] ^ _mul32(ids, 0x85EBCA77)[None, :])
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: Tensor, *, vocab_size: int, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor,
           seed: Tensor, position: Tensor, repetition_penalty: Tensor | None = None, seen: Tensor | None = None,
           greedy_only: bool = False) -> Tensor:
    """One token per row from logits (batch, ≥ vocab_size); ids >= vocab_size (padding) are never chosen.

    Args:
        temperature, top_p, min_p: (batch,) float32; top_k: (batch,) int64 (0: off); seed, position: (batch,)
            int64 (the random stream and the index of the token being drawn); repetition_penalty: (batch,)
            float32 with ``seen`` (batch, vocab_size) bool, the tokens it applies to.
        greedy_only: every row is greedy (temperature 0, no penalty): the argmax alone, no sort, no noise.
    Returns:
        (batch,) int64. Rows with temperature 0 get the argmax of the (penalised) logits.
    """
    scores = logits[:, :vocab_size].float()
    if greedy_only:
        return scores.argmax(dim=-1)
    if seen is not None:
        pen = repetition_penalty[:, None]
        scores = torch.where(seen, torch.where(scores > 0, scores / pen, scores * pen), scores)
    greedy = scores.argmax(dim=-1)
    scores = scores / temperature.clamp(min=1e-6)[:, None]
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    rank = torch.arange(vocab_size, device=logits.device)
    k = torch.where(top_k > 0, top_k, vocab_size)
    ordered = ordered.masked_fill(rank[None, :] >= k[:, None], -math.inf)
    probs = torch.softmax(ordered, dim=-1)
    # a token is dropped when those ranked above it already reach top_p; the first one always stays
    keep = ((probs.cumsum(dim=-1) - probs) < top_p[:, None]) & (probs >= min_p[:, None] * probs[:, :1])
    keep[:, 0] = True
    ordered = ordered.masked_fill(~keep, -math.inf)
    gumbel = -torch.log(-torch.log(uniform_noise(seed, position, vocab_size)))
    pick = (ordered + gumbel.gather(1, order)).argmax(dim=-1, keepdim=True)
    drawn = order.gather(1, pick).squeeze(1)
    return torch.where(temperature > 0, drawn, greedy)


class SlotSampler:
    """The per-slot sampling settings of an engine, on the device, and :func:`sample` over chosen slots.

    Each setting is a (slots,) tensor; ``seen`` (slots, vocab_size) bool marks the prompt and output tokens of
    each slot for the repetition penalty; ``position`` counts the tokens drawn by each slot's request.
    """

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device | str):
        self.vocab_size = vocab_size
        f32 = dict(device=device, dtype=torch.float32)
        i64 = dict(device=device, dtype=torch.int64)
        self.temperature, self.top_p = torch.zeros(n_slots, **f32), torch.ones(n_slots, **f32)
        self.min_p, self.repetition_penalty = torch.zeros(n_slots, **f32), torch.ones(n_slots, **f32)
        self.top_k, self.seed, self.position = (torch.zeros(n_slots, **i64) for _ in range(3))
        self.seen = torch.zeros(n_slots, vocab_size, device=device, dtype=torch.bool)

    def assign(self, slots: Tensor, params: list[SamplingParams], prompts: list[list[int]]) -> None:
        """Give the slots (a (k,) int64 tensor on the device) their requests' settings (seeds set), marking
        the prompt tokens as seen for requests with a repetition penalty. A few launches whatever k."""
        dev = slots.device
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "top_k", "seed"):
            t = getattr(self, name)
            t.index_copy_(0, slots, torch.tensor([getattr(p, name) for p in params], dtype=t.dtype).to(dev))
        self.position.index_fill_(0, slots, 0)
        self.seen.index_fill_(0, slots, False)
        rows = [(i, t) for i, (p, ids) in enumerate(zip(params, prompts)) if p.repetition_penalty != 1
                for t in ids if t < self.vocab_size]
        if rows:
            r, t = torch.tensor(rows, dtype=torch.int64).to(dev).unbind(1)
            self.seen.index_put_((slots[r], t), torch.ones_like(t, dtype=torch.bool))

    def __call__(self, logits: Tensor, slots: Slots, *, greedy_only: bool, penalty: bool) -> Tensor:
        """Draw one token per row for the slots ``slots``; advances their positions and marks the tokens as seen
        (``penalty``: some row has a repetition penalty)."""
        pick = {name: take(getattr(self, name), slots)
                for name in ("temperature", "top_k", "top_p", "min_p", "seed", "position")}
        extra = {}
        if penalty:
            extra = dict(repetition_penalty=take(self.repetition_penalty, slots), seen=take(self.seen, slots))
        tokens = sample(logits, vocab_size=self.vocab_size, greedy_only=greedy_only, **pick, **extra)
        rows = as_index(slots, logits.device)
        self.position.index_add_(0, rows, torch.ones_like(rows))
        if penalty:
            self.seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        return tokens
