"""``generate()``: continue a list of prompts, on the serving engine (:mod:`mamba2.serving`): each prompt is
prefilled once, then every new token costs one recurrent step per layer (CUDA-graph replayed on a GPU)."""

from __future__ import annotations

import numbers
import weakref
from typing import Callable, Sequence

import torch

from mamba2.models.lm import Mamba2LM
from mamba2.serving import Engine, SamplingParams

_ENGINES: "weakref.WeakKeyDictionary[Mamba2LM, tuple[tuple, Engine]]" = weakref.WeakKeyDictionary()


def _engine(model: Mamba2LM, n: int, max_len: int, vocab_size: int | None, cuda_graphs: bool | None) -> Engine:
    """An engine for ``model`` with at least ``n`` slots, reused across calls while the model's parameters
    (storage, dtype, device) are unchanged: its captured graphs read them in place."""
    params = tuple((p.data_ptr(), p.dtype, p.device) for p in model.parameters())
    key = (params, vocab_size, cuda_graphs)
    cached = _ENGINES.get(model)
    if cached is not None:
        old_key, engine = cached
        if old_key == key and engine.max_batch >= n and engine.max_len >= max_len and not engine.has_work():
            return engine
    engine = Engine(model, max_batch=n, max_len=max_len, cuda_graphs=cuda_graphs, vocab_size=vocab_size)
    _ENGINES[model] = (key, engine)
    return engine


def _as_lists(value, what: str):
    """A torch tensor or numpy array of integers as (nested) lists, read once; other values as they are.

    Raises:
        ValueError: a tensor or array of another dtype (floats, bools), naming it.
    """
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got a tensor of dtype {value.dtype}")
        return value.tolist()
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        if value.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integer token ids, got a numpy array of dtype {value.dtype}")
        return value.tolist()
    return value


def generate(model: Mamba2LM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             repetition_penalty: float = 1.0, generator: torch.Generator | None = None,
             eos_token_id: int | None = None, on_token: Callable[[list[int]], None] | None = None,
             vocab_size: int | None = None, cuda_graphs: bool | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Each row gets exactly what it gets alone (greedy or sampled: a row's random stream is its own seed, see
    :mod:`mamba2.serving.sampling`). Seeds are drawn from ``generator`` (or torch's global generator), so a run is
    reproducible with ``torch.manual_seed`` or a seeded generator.

    Args:
        prompts: token-id lists, each non-empty; or a (batch, L) integer torch tensor or numpy array (one prompt
            per row; numpy integers are taken as ints).
        temperature: 0 for greedy. top_k (None/0/-1: off), top_p (None/1: off), min_p (None/0: off),
            repetition_penalty (1: off): see :class:`mamba2.serving.SamplingParams`.
        eos_token_id: a row stops after producing it (the token is kept).
        on_token: called with one new token per row, step by step (streaming); a row that has already
            stopped repeats ``eos_token_id``.
        vocab_size: sample only ids below this (default and maximum: the model's ``config.vocab_size``), e.g.
            the tokenizer's size when the model's vocabulary is larger than what the tokenizer can decode.
        cuda_graphs: replay the decode step from CUDA graphs (default: on a GPU).
    Returns:
        The new tokens of each row (without the prompt).
    Raises:
        ValueError: no prompts, an empty prompt, ids outside the vocabulary, max_new_tokens < 0, bad sampling
            settings.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    given, prompts = prompts, _as_lists(prompts, "prompts")       # a 0-d tensor or array becomes an int
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(given).__name__}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    prompts = [_as_lists(p, "a prompt") for p in prompts]
    if any(isinstance(p, (int, str, bytes)) or not hasattr(p, "__len__") for p in prompts):
        raise ValueError("prompts must be a list of token-id lists (one list per prompt), e.g. [[1, 2, 3]]")
    # numpy integers (a row of an array, list(array)) as ints; anything else is left for the engine to name
    prompts = [[int(t) if isinstance(t, numbers.Integral) and type(t).__module__ == "numpy" else t for t in p]
               if isinstance(p, list) else p for p in prompts]
    seeds = torch.randint(0, 2 ** 62, (len(prompts),), generator=generator,
                          device=generator.device if generator is not None else "cpu").tolist()
    base = dict(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0,
                top_p=1.0 if top_p is None else top_p, min_p=min_p or 0.0, repetition_penalty=repetition_penalty,
                stop_token_ids=() if eos_token_id is None else (eos_token_id,))
    params = [SamplingParams(**base, seed=s) for s in seeds]
    engine = _engine(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, vocab_size, cuda_graphs)
    ids = [engine.add_request(p, q, stream=on_token is not None) for p, q in zip(prompts, params)]
    rows: dict[str, list[int]] = {i: [] for i in ids}
    try:
        while engine.has_work():
            outs = {o.request_id: o.new_tokens for o in engine.step()}
            for i, new in outs.items():
                rows[i].extend(new)
            if on_token is not None and outs:
                width = max(len(v) for v in outs.values())
                for j in range(width):
                    on_token([outs[i][j] if i in outs and j < len(outs[i]) else eos_token_id for i in ids])
    except BaseException:
        for i in ids:
            engine.abort(i)
        raise
    return [rows[i] for i in ids]
