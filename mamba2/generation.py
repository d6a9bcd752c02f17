"""Autoregressive generation from the inference cache: prefill once, then O(1) work per new token."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from mamba2.models.lm import Mamba2LM


def sample_next(logits: Tensor, *, vocab_size: int, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from logits (batch, padded_vocab); rows of padded vocabulary are never chosen.

    temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
    probability reaches p (nucleus sampling). Returns (batch,) int64.

    Raises:
        ValueError: temperature < 0, top_k < 1, or top_p outside (0, 1].
    """
    if not (0 <= temperature < math.inf):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    logits = logits[:, :vocab_size].float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < vocab_size:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str | None = None
             ) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into (input_ids, attention_mask), both (batch, max_len); pad id 0, mask 0 at padding.

    Raises:
        ValueError: no prompts, an empty prompt, a token id that is not an integer or is outside [0, vocab_size).
    """
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        floats = [t for t in p if isinstance(t, float) or (isinstance(t, Tensor) and t.is_floating_point())]
        if floats:
            raise ValueError(f"prompt {i} has token id {floats[0]!r}: token ids must be integers")
        bad = [t for t in p if not (0 <= int(t) < vocab_size)]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model: Mamba2LM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | None = None, on_token: Callable[[list[int]], None] | None = None,
             vocab_size: int | None = None) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded and masked, so each row gets exactly what it gets alone (for
    greedy decoding; sampled rows draw from one shared generator). The prompt is prefilled in one chunked pass;
    each new token then costs one recurrent step per layer.

    Args:
        prompts: token-id lists, each non-empty.
        temperature: 0 for greedy. top_k, top_p: see :func:`sample_next`. generator: for reproducible sampling.
        eos_token_id: a row stops after producing it (the token is kept).
        on_token: called after each step with the new token of every row (streaming).
        vocab_size: sample only ids below this (default and maximum: the model's ``config.vocab_size``), e.g.
            the tokenizer's size when the model's vocabulary is larger than what the tokenizer can decode.
    Returns:
        The new tokens of each row (without the prompt).
    Raises:
        ValueError: an empty prompt, ids outside the vocabulary, max_new_tokens < 0, bad sampling settings.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.config.vocab_size if vocab_size is None else min(vocab_size, model.config.vocab_size)
    device = model.lm_head.weight.device
    ids, mask = left_pad(prompts, vocab, device)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    cache = model.empty_cache(len(prompts), device=device)
    padded = bool((mask == 0).any())
    logits = model(ids, attention_mask=mask if padded else None, cache=cache, logits_to_keep=1,
                   check_ids=False)[:, -1]                                    # ids were checked by left_pad
    # Without streaming or eos the tokens stay on the device until the end: no host sync per token.
    per_step = on_token is not None or eos_token_id is not None
    steps: list[Tensor] = []
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, vocab_size=vocab, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        if per_step:
            tokens = nxt.tolist()
            for i, t in enumerate(tokens):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos_token_id
            if on_token is not None:
                on_token(tokens)
            if all(done):
                break
        else:
            steps.append(nxt)
        if step + 1 < max_new_tokens:
            logits = model(nxt[:, None], cache=cache, check_ids=False)[:, -1]   # sampled ids are in range
    if steps:
        for i, row in enumerate(torch.stack(steps, dim=1).tolist()):
            out[i] = row
    return out
