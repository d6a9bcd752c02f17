"""The continuous-batching engine: a fixed pool of state slots, requests joining and leaving the decode batch at
any step, one static decode step (CUDA-graph replayed on a GPU), sampling on the device (docs/design.md §7).

A Mamba-2 request's whole decoding state is O(1): a conv window and an fp32 SSM state per layer. The engine keeps
``max_batch`` such rows (plus one scratch row that pads decode batches up to a graph's size); attention layers of
hybrid models keep ``max_len`` key/value positions per slot. Waiting requests are prefilled together (packed in
one row, each leaving exactly the state it would leave alone) and their states copied into free slots; from then
on each :meth:`Engine.step` advances every running request by one token with one call of :meth:`mamba2.models.Mamba2LM.decode_step` over
their slots. Slots of other requests are neither read nor written.

Tokens stay on the device until the host needs them: at once for requests that stream or have stop tokens (one
step behind, so that the next step is already queued when the host reads), otherwise when the request ends.

Not thread-safe: one thread owns an engine (the HTTP server runs it in a worker thread).
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from mamba2.layers.slots import Slots, put, take, write_slots
from mamba2.models.cache import InferenceCache
from mamba2.models.lm import Mamba2LM
from mamba2.serving.graphs import DecodeGraphs
from mamba2.serving.sampling import SamplingParams, SlotSampler


@dataclass
class Prefix:
    """The decoding state after a fixed token prefix (a system prompt, a few-shot header), made once by
    :meth:`Engine.make_prefix` and shared by every request whose prompt starts with it: those requests prefill
    only the rest of their prompt. For a Mamba-2 model this is a few MB whatever the prefix length."""

    ids: tuple[int, ...]
    cache: InferenceCache
    logits: Tensor            # (1, padded_vocab) after the last prefix token


@dataclass
class Request:
    """One request's host-side record. ``output`` holds the tokens read back so far; ``finish_reason`` is
    None while running, then ``"stop"`` (a stop token), ``"length"`` (max_tokens) or ``"abort"``."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    prefix: Prefix | None = None
    stream: bool = False
    output: list[int] = field(default_factory=list)
    slot: int | None = None
    scheduled: int = 0
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_each_token(self) -> bool:
        return self.stream or bool(self.params.stop_token_ids)


@dataclass
class RequestOutput:
    """What one :meth:`Engine.step` produced for one request: its new tokens (read back this step), and whether
    it has finished."""

    request_id: str
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None


@dataclass
class _Launched:
    requests: list[Request]
    tokens: Tensor            # (len(requests),) int64 on the device


class Engine:
    """Continuous batching over a pool of ``max_batch`` slots.

    Args:
        model: the LM (any layout: Mamba-2, Mamba-1, attention layers).
        max_batch: slots, i.e. requests decoded together at most; more requests wait in a queue (FIFO).
        max_len: prompt + output tokens per request at most; only needed (and checked) when the model has
            attention layers, whose slots preallocate that many key/value positions.
        cuda_graphs: replay the decode step from CUDA graphs, one per batch-size bucket (powers of two up to
            max_batch); default: on when the model is on a GPU. Graphs are captured again when the kernel mode
            or a tuning (:mod:`mamba2.kernels`) changed since; a model moved or cast after the engine was made
            is refused (RuntimeError at the next step).
        vocab_size: sample only ids below this (default and maximum: the model's vocabulary), e.g. a tokenizer's.
        seed: draws the seeds of requests that give none.
        max_prefill_tokens: waiting requests are prefilled together in one forward (packed in one row) while their
            tokens stay within this (one request at least); a longer prompt (or the part after a prefix) is
            prefilled alone in pieces of this many tokens, each continuing from the state the last one left, so
            that a prefill's activations never grow past this many tokens' worth.
        prefill_share: while requests are decoding, an admission (one prefill for everything waiting) runs only
            once the time since the last one is at least (1 − share) / share times what that one cost, so that
            prefills take about this share of the time and arrivals are prefilled together instead of stalling
            every decode step (a prefill costs tens of decode steps). With no request decoding, or enough waiting
            to fill every free slot, admission is immediate. 1 admits at every step.
    Raises:
        ValueError: max_batch < 1, max_len < 1, max_prefill_tokens < 1, prefill_share not in (0, 1], a vocab_size
            that is not a positive integer, cuda_graphs on a model that is not on a GPU.
    """

    def __init__(self, model: Mamba2LM, *, max_batch: int = 8, max_len: int = 4096, cuda_graphs: bool | None = None,
                 vocab_size: int | None = None, seed: int | None = None, max_prefill_tokens: int = 16384,
                 prefill_share: float = 0.2):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
        if not 0 < prefill_share <= 1:
            raise ValueError(f"prefill_share must be in (0, 1], got {prefill_share!r}")
        if isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {max_prefill_tokens!r}")
        self.prefill_share = prefill_share
        self._next_admission = 0.0
        self.model = model.eval()
        self.device = model.lm_head.weight.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs needs a model on a CUDA device, this one is on {self.device}")
        c = model.config
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                       or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer (ids below it are sampled), got {vocab_size!r}")
        self.vocab_size = c.vocab_size if vocab_size is None else min(vocab_size, c.vocab_size)
        self.has_attention = any(s.mixer == "attention" for s in c.layer_specs)
        self.max_batch, self.max_len, self.max_prefill_tokens = max_batch, max_len, max_prefill_tokens
        self.pad_slot = max_batch                                   # scratch row: pads graph batches
        rows = max_batch + 1 if cuda_graphs else max_batch
        with torch.inference_mode():
            self.pool = model.empty_cache(rows, max_len=max_len if self.has_attention else 0)
            self.sampler = SlotSampler(rows, self.vocab_size, self.device)
            self.last = torch.zeros(rows, dtype=torch.int64, device=self.device)
        self.graphs = DecodeGraphs(self._decode, max_batch, self.pad_slot, self.device) if cuda_graphs else None
        self._weights = self._where_weights_are()
        self._free = list(range(max_batch - 1, -1, -1))              # lowest slot first: runs stay contiguous
        self._waiting: list[Request] = []
        self._running: dict[str, Request] = {}
        self._launched: list[_Launched] = []
        self._ids = itertools.count()
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------------------------------ requests
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, prefix: Prefix | None = None, stream: bool = False) -> str:
        """Queue a request; it joins the decode batch at the next :meth:`step` with a free slot.

        Args:
            prompt: token ids (non-empty), each in [0, vocab_size). With ``prefix`` it must start with the
                prefix's ids (and may equal them).
            stream: report each token as soon as possible (otherwise tokens are read back when it ends).
        Returns:
            The request id.
        Raises:
            ValueError: an empty prompt, ids that are not integers or lie outside the vocabulary, a prompt that
                does not start with ``prefix``, a duplicate request id, or (attention layers) prompt +
                max_tokens - 1 > max_len.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt)
        if prefix is not None and tuple(prompt[:len(prefix.ids)]) != prefix.ids:
            raise ValueError(f"the prompt does not start with the prefix's {len(prefix.ids)} tokens")
        # the last new token is never fed back: prompt + max_tokens - 1 key/value positions are written
        if self.has_attention and len(prompt) + params.max_tokens - 1 > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"engine's max_len {self.max_len} by more than 1 (the key/value positions per slot)")
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if request_id in self._running or any(r.request_id == request_id for r in self._waiting):
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.seed is None:
            params = _with_seed(params, self._rng.randrange(2 ** 63))
        self._waiting.append(Request(request_id, prompt, params, prefix, stream))
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its slot; False when no such request is waiting or running."""
        for r in self._waiting:
            if r.request_id == request_id:
                self._waiting.remove(r)
                r.finish_reason = "abort"
                return True
        r = self._running.get(request_id)
        if r is None:
            return False
        self._finish(r, "abort")
        return True

    def make_prefix(self, ids: Sequence[int], after: Prefix | None = None) -> Prefix:
        """Prefill ``ids`` once and keep the state (docs/design.md §7.3). With ``after`` (a prefix that ``ids``
        extends: a conversation so far) only the tokens after it are prefilled, from a copy of its state.

        Raises:
            ValueError: bad ids, or ``ids`` that do not extend ``after``.
        """
        ids = self._check_prompt(ids)
        done = 0 if after is None else len(after.ids)
        if after is not None and (tuple(ids[:done]) != after.ids or len(ids) == done):
            raise ValueError(f"the ids must extend the prefix's {done} tokens by at least one")
        with torch.inference_mode():
            cache = (self.model.empty_cache(1, max_len=0) if after is None
                     else after.cache.select(torch.tensor([0], device=self.device)))
            logits = self._prefill(torch.tensor([ids[done:]], device=self.device), cache)
        return Prefix(tuple(ids), cache, logits)

    @torch.inference_mode()
    def warm_up(self, *, penalty: bool = False) -> None:
        """Compile and capture ahead of the first requests: prefills of a few shapes (Triton specialises its
        kernels on lengths that are 1 or multiples of 16, and on one chunk or several), and the decode step's
        CUDA graph of every batch-size bucket for greedy and sampled batches (and, with ``penalty``,
        repetition-penalised ones). Otherwise each is made when first needed, stalling the requests running then
        (a server calls this before it accepts any). Leaves no state behind."""
        for lengths in ((1,), (1, 1), (7, 9), (150, 150), (256, 256)):
            if sum(lengths) <= self.max_prefill_tokens and max(lengths) <= self.max_len:
                self._prefill_many([[0] * n for n in lengths])
        if self.graphs is not None:
            with torch.cuda.device(self.device):
                for size in self.graphs.buckets:
                    for greedy_only in (True, False):
                        for pen in (False, True) if penalty else (False,):
                            self.graphs.prepare(size, greedy_only=greedy_only, penalty=pen)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit waiting requests into free slots (prefill), advance every running request by one token, and
        report what was read back."""
        if self._where_weights_are() != self._weights:
            raise RuntimeError("the model was moved or cast (dtype, device or storage of its weights) after this "
                               "Engine was made: its state slots and captured graphs belong to the old weights; "
                               "make a new Engine")
        outputs: dict[str, RequestOutput] = {}
        admitted: list[Request] = []
        start = time.perf_counter()
        if self._running and start < self._next_admission and len(self._waiting) < len(self._free):
            start = None                                     # not yet: let arrivals gather (prefill_share)
        while start is not None and self._waiting and len(admitted) < len(self._free):
            r = self._waiting[0]
            if r.params.max_tokens == 0:
                self._waiting.pop(0)
                r.finish_reason = "length"
                outputs[r.request_id] = RequestOutput(r.request_id, [], True, "length")
                continue
            cost = len(r.prompt) + sum(len(q.prompt) for q in admitted)
            if admitted and cost > self.max_prefill_tokens:
                break
            admitted.append(self._waiting.pop(0))
        for r in admitted:
            if r.prefix is not None:
                self._admit_with_prefix(r)
        plain = [r for r in admitted if r.prefix is None]
        if plain:
            self._admit_batch(plain)
        if admitted:
            now = time.perf_counter()
            self._next_admission = now + (now - start) * (1 - self.prefill_share) / self.prefill_share
        batch = sorted((r for r in self._running.values() if not r.finished and r.scheduled < r.params.max_tokens),
                       key=lambda r: r.slot)
        if batch:
            rows = [r.slot for r in batch]
            params = [r.params for r in batch]
            greedy_only = all(p.greedy for p in params)
            penalty = any(p.repetition_penalty != 1 for p in params)
            if self.graphs is not None:
                tokens = self.graphs.run(torch.tensor(rows), greedy_only=greedy_only, penalty=penalty)
            else:
                consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
                slots = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=self.device)
                tokens = self._decode(slots, greedy_only=greedy_only, penalty=penalty)
            for r in batch:
                r.scheduled += 1
            self._launched.append(_Launched(batch, tokens))
        self._read_back(outputs)
        return list(outputs.values())

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work():
            self.step()

    # ------------------------------------------------------------------------------------------ internals
    def _where_weights_are(self) -> tuple:
        """Storage, dtype and device of the head's weight: ``model.to(…)`` changes them for every weight."""
        w = self.model.lm_head.weight
        return w.data_ptr(), w.dtype, w.device

    def _check_prompt(self, prompt: Sequence[int]) -> list[int]:
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
            raise ValueError(f"a prompt must be a sequence of token ids, got {type(prompt).__name__}")
        ids = []
        for t in prompt:
            if isinstance(t, Tensor):
                t = t.item() if t.numel() == 1 and not t.is_floating_point() else t
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"token ids must be integers, got {t!r}")
            if not 0 <= t < self.model.config.vocab_size:
                raise ValueError(f"token id {t} is outside the vocabulary [0, {self.model.config.vocab_size})")
            ids.append(t)
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        return ids

    def _prefill(self, ids: Tensor, cache: InferenceCache) -> Tensor:
        """Run ``ids`` (1, L) into ``cache`` (continuing from its state) in pieces of at most max_prefill_tokens;
        the last position's logits."""
        for start in range(0, ids.shape[1], self.max_prefill_tokens):
            logits = self.model(ids[:, start:start + self.max_prefill_tokens], cache=cache, logits_to_keep=1,
                                check_ids=False)[:, -1]
        return logits

    def _admit_with_prefix(self, r: Request) -> None:
        """Prefill the part of the prompt after its prefix, from a copy of the prefix state."""
        cache = r.prefix.cache.select(torch.tensor([0], device=self.device))
        rest = torch.tensor(r.prompt[len(r.prefix.ids):], dtype=torch.int64, device=self.device)
        logits = r.prefix.logits if rest.numel() == 0 else self._prefill(rest[None], cache)
        self._start([r], cache, logits)

    def _admit_batch(self, requests: list[Request]) -> None:
        """Prefill several prompts in one forward and start them (:meth:`_prefill_many`)."""
        cache, logits = self._prefill_many([r.prompt for r in requests])
        self._start(requests, cache, logits)

    def _prefill_many(self, prompts: list[list[int]]) -> tuple[InferenceCache, Tensor]:
        """One forward over several prompts packed in one row (``cu_seqlens``: no padding, each prompt leaves its
        own state in every layer, computed on its own chunk grid), so each row gets what it gets alone
        (docs/design.md §7). Returns the cache (a row per prompt) and the last position's logits. A prompt over
        max_prefill_tokens comes alone (admission) and is prefilled in pieces (:meth:`_prefill`)."""
        cache = self.model.empty_cache(len(prompts), max_len=0)
        if len(prompts) == 1 and len(prompts[0]) > self.max_prefill_tokens:
            return cache, self._prefill(torch.tensor([prompts[0]], dtype=torch.int64, device=self.device), cache)
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)[None].to(self.device)
        cu = torch.tensor([0] + list(itertools.accumulate(len(p) for p in prompts)), dtype=torch.int64)
        logits = self.model(ids, cu_seqlens=cu, cache=cache, logits_to_keep=1, check_ids=False)[:, -1]
        return cache, logits

    def _start(self, requests: list[Request], cache: InferenceCache, logits: Tensor) -> None:
        """Move prefilled rows into free slots and draw each request's first token."""
        rows = [self._free.pop() for _ in requests]
        slots = torch.tensor(rows, dtype=torch.int64).to(self.device)
        for pool, state in zip(self.pool.layers, cache.layers):
            write_slots(pool, rows, state)
        self.sampler.assign(slots, [r.params for r in requests], [r.prompt for r in requests])
        for r, slot in zip(requests, rows):
            r.slot, r.scheduled = slot, 1
            self._running[r.request_id] = r
        first = self.sampler(logits, slots, greedy_only=all(r.params.greedy for r in requests),
                             penalty=any(r.params.repetition_penalty != 1 for r in requests))
        self.last.index_copy_(0, slots, first)
        self._launched.append(_Launched(list(requests), first))

    def _decode(self, slots: Slots, *, greedy_only: bool, penalty: bool) -> Tensor:
        """The static decode step over the pool rows ``slots``: returns the new tokens (a fresh tensor)."""
        logits = self.model.decode_step(take(self.last, slots), self.pool, slots)
        tokens = self.sampler(logits, slots, greedy_only=greedy_only, penalty=penalty)
        put(self.last, slots, tokens)
        return tokens

    def _read_back(self, outputs: dict[str, RequestOutput]) -> None:
        """Read launched tokens back: all of them when a request has all its tokens scheduled, else all but the
        newest step when some request needs each token (the newest one is still running on the device)."""
        if not self._launched:
            return
        done = any(r.scheduled >= r.params.max_tokens and not r.finished for r in self._launched[-1].requests)
        if done:
            n = len(self._launched)
        else:
            needed = [i for i, e in enumerate(self._launched[:-1]) if any(r.needs_each_token for r in e.requests)]
            n = needed[-1] + 1 if needed else 0
        if n == 0:
            return
        entries, self._launched = self._launched[:n], self._launched[n:]
        values = torch.cat([e.tokens for e in entries]).tolist()          # one device sync
        it = iter(values)
        for e in entries:
            for r in e.requests:
                t = next(it)
                if r.finished:
                    continue
                r.output.append(t)
                out = outputs.setdefault(r.request_id, RequestOutput(r.request_id, [], False, None))
                out.new_tokens.append(t)
                if t in r.params.stop_token_ids:
                    self._finish(r, "stop")
                elif len(r.output) >= r.params.max_tokens:
                    self._finish(r, "length")
                if r.finished:
                    out.finished, out.finish_reason = True, r.finish_reason

    def _finish(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self._running.pop(r.request_id, None)
        if r.slot is not None:
            self._free.append(r.slot)
            self._free.sort(reverse=True)
            r.slot = None


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(params, seed=seed)
