"""Held-out evaluation: loss, perplexity and bits per byte."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mamba2.data import IGNORE_INDEX, TokenStream, eval_batches


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    perplexity: float  # exp(loss)
    bits_per_byte: float  # loss / ln 2 * tokens / bytes: comparable across tokenizers
    tokens: int  # predicted tokens

    def __str__(self) -> str:
        return (f"loss {self.loss:.4f} nats/token | perplexity {self.perplexity:.2f} | "
                f"bits/byte {self.bits_per_byte:.4f} | {self.tokens:,} tokens")


def autocast_to(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device`` (None: bfloat16 on CUDA, off elsewhere; float32: off)."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.autocast(device.type, dtype=dtype if dtype != torch.float32 else torch.bfloat16,
                          enabled=dtype != torch.float32)


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream: TokenStream, *, batch_size: int = 8, seq_len: int = 256,
             max_tokens: int | None = None, device: str | torch.device | None = None,
             autocast: torch.dtype | None = None) -> EvalResult:
    """Cross-entropy of ``model`` on ``stream`` read in order (documents kept apart by ``seq_idx``).

    ``max_tokens`` caps the number of input tokens read (None: the whole stream). ``autocast``: the compute dtype
    (None: bfloat16 on CUDA, none on CPU; float32: none).
    Leaves the model in the train/eval mode it was in.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in eval_batches(stream, batch_size, seq_len, max_tokens):
            batch = batch.to(device)
            n = int((batch.targets != IGNORE_INDEX).sum())
            if n == 0:
                continue
            with autocast_to(device, autocast):
                loss = model.loss(batch.input_ids, batch.targets, seq_idx=batch.seq_idx)
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    loss = total / count if count else float("nan")
    return EvalResult(loss, math.exp(min(loss, 700.0)), loss / math.log(2) * stream.tokens_per_byte, count)
