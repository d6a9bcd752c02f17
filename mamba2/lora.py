"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning, through the ``peft`` library (an optional extra:
``pip install 'mamba2[lora]'``).

A LoRA run trains, for each targeted ``nn.Linear`` (by default every mixer's ``in_proj`` and ``out_proj``), a pair
``A`` (rank, in_features), ``B`` (out_features, rank) with ``W' = W + (alpha / rank)·B·A``; every other parameter is
frozen. Checkpoints hold the merged weights ``W'`` (so ``generate``, ``eval``, ``convert`` and ``--export`` read them
like any model) and the adapter tensors in the trainer state; ``--save-adapter`` also writes the adapter alone in
peft's format (``adapter/``), which ``peft.PeftModel.from_pretrained`` loads over this package's model
(``mamba2.interop.load(dir).model``: transformers' Mamba2 classes name their layers otherwise). A resumed run takes the frozen weights back as ``W' − (alpha / rank)·B·A``, equal to
the original ones up to float32 rounding (one unit in the last place).
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from mamba2.errors import UserError

ADAPTER_DIR = "adapter"
_NAME = "default"     # peft's adapter name: one adapter per run


def _peft():
    try:
        import peft
    except ImportError:
        raise UserError("--lora-rank needs the peft library: pip install 'mamba2[lora]' (or pip install peft)") \
            from None
    return peft


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's ``nn.Linear`` modules (what ``targets`` may name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def attach(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], dropout: float = 0.0,
           adapter: dict[str, Tensor] | None = None) -> nn.Module:
    """Wrap ``model`` (a :class:`~mamba2.models.Mamba2LM`, changed in place) in a peft model with LoRA pairs on
    the linear layers named ``targets``; only the pairs require gradients.

    ``adapter`` (from :func:`adapter_state` of a saved run) resumes that run: ``model`` then holds the merged
    weights, from which the pairs' product is taken back out before the pairs are loaded.

    Raises:
        UserError: peft missing, rank < 1, a target that names no linear layer (the message lists those that do).
    """
    peft = _peft()
    if rank < 1:
        raise UserError(f"--lora-rank must be ≥ 1, got {rank}")
    known = linear_names(model)
    if not targets:
        raise UserError(f"--lora-targets names no layer; this model's linear layers are {', '.join(known)}")
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise UserError(f"--lora-targets {','.join(targets)}: {', '.join(unknown)} names no linear layer of this "
                        f"model; its linear layers are {', '.join(known)}")
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = sorted({name.rsplit(".", 1)[-1] for name, m in chosen if uses[id(m.weight)] > 1})
    if tied:
        raise UserError(f"--lora-targets: {', '.join(tied)} shares its weight with another layer (the tied "
                        f"embedding): an adapter there cannot be merged into one weight; target other layers")
    widest = min(min(m.in_features, m.out_features) for _, m in chosen)
    if rank > widest:
        raise UserError(f"--lora-rank {rank} exceeds the narrowest targeted layer's width {widest}: a rank above "
                        f"min(in_features, out_features) adds nothing but parameters")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout,
                             bias="none")
    with warnings.catch_warnings():      # peft's notes on embeddings it does not touch here
        warnings.simplefilter("ignore", UserWarning)
        wrapped = peft.get_peft_model(model, config, adapter_name=_NAME)
    if adapter is not None:
        layers = _lora_layers(wrapped)
        peft.set_peft_model_state_dict(wrapped, adapter, adapter_name=_NAME)
        with torch.no_grad():
            for layer in layers.values():
                layer.base_layer.weight.sub_(layer.get_delta_weight(_NAME).to(layer.base_layer.weight.dtype))
    return wrapped


def _lora_layers(wrapped: nn.Module) -> dict[str, nn.Module]:
    """Module name (in the plain model) → peft LoRA layer."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in wrapped.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def adapter_state(wrapped: nn.Module) -> dict[str, Tensor]:
    """The adapter tensors (peft's key names), on the CPU: what a checkpoint stores to resume the run."""
    peft = _peft()
    return {k: v.detach().cpu().clone() for k, v in peft.get_peft_model_state_dict(wrapped, adapter_name=_NAME).items()}


@torch.no_grad()
def merged_state_dict(wrapped: nn.Module) -> dict[str, Tensor]:
    """The plain model's state dict with each targeted weight replaced by ``W + (alpha / rank)·B·A``; the
    training model is left as it is (merging in place and back would change its frozen weights by rounding)."""
    deltas = {f"{name}.weight": layer.get_delta_weight(_NAME) for name, layer in _lora_layers(wrapped).items()}
    merged: dict[str, Tensor] = {}
    for key, value in wrapped.get_base_model().state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        merged[key] = value + deltas[key].to(value.dtype) if key in deltas else value
    return merged


def save_adapter(wrapped: nn.Module, directory) -> None:
    """Write the adapter alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``): load it
    with ``peft.PeftModel.from_pretrained(model, directory)`` over the model the run started from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        wrapped.save_pretrained(str(directory), selected_adapters=[_NAME])


def describe(wrapped: nn.Module) -> str:
    """``'N trainable of M parameters (p%)'``."""
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"


def settings(cfg: Any) -> dict[str, Any]:
    """The LoRA settings of a :class:`~mamba2.train_config.TrainConfig` as :func:`attach` keywords."""
    return {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank,
            "targets": tuple(cfg.lora_targets), "dropout": cfg.lora_dropout}
