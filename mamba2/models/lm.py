"""The language model (Dao & Gu 2024, §7; layout of the official ``MambaLMHeadModel``): Mamba-2 by default, or
any layer layout of Mamba-2, Mamba-1 and attention mixers with optional SwiGLU MLPs (hybrids, Transformer++,
Mamba-1; §9.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.config import Mamba2Config
from mamba2.errors import type_name
from mamba2.layers.mixer import MIXERS
from mamba2.layers.mlp import GatedMLP
from mamba2.layers.norm import RMSNorm
from mamba2.layers.slots import Slots
from mamba2.models.cache import InferenceCache
from mamba2.ssd.varlen import Documents


def _check_input_ids(input_ids) -> Tensor:
    """``input_ids``, int64 unless int32 or int64 already (the embedding takes no other; a dtype conversion on its
    device, no host read). Raises ValueError unless it is a (batch, L) integer tensor with batch >= 1 and L >= 1
    (the shape and dtype only)."""
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor (batch, L) of token ids, got {type_name(input_ids)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, L), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[0] < 1:
        raise ValueError(f"batch size must be >= 1, got {input_ids.shape[0]}")
    if input_ids.shape[1] < 1:
        raise ValueError(f"sequence length must be >= 1, got {input_ids.shape[1]}")
    return input_ids if input_ids.dtype in (torch.int32, torch.int64) else input_ids.long()


class Block(nn.Module):
    """Pre-norm residual block: ``residual += mixer(RMSNorm(residual))``, then, if the layout gives the layer an
    MLP, ``residual += mlp(RMSNorm2(residual))`` (official names ``norm``, ``mixer``, ``norm2``, ``mlp``)."""

    def __init__(self, config: Mamba2Config, layer_idx: int):
        super().__init__()
        spec = config.layer_specs[layer_idx]
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = MIXERS[spec.mixer](config, layer_idx)
        if spec.mlp:
            self.norm2 = RMSNorm(config.d_model, eps=config.norm_eps)
            self.mlp = GatedMLP(config.d_model, config.d_intermediate)
        else:
            self.mlp = None

    def forward(self, residual: Tensor, **kw) -> Tensor:
        dtype = self.norm.weight.dtype
        residual = residual + self.mixer(self.norm(residual).to(dtype), **kw).to(residual.dtype)
        if self.mlp is not None:
            residual = residual + self.mlp(self.norm2(residual).to(dtype)).to(residual.dtype)
        return residual

    def decode(self, h: Tensor | None, residual: Tensor, pool, slots: Slots) -> tuple[Tensor, Tensor]:
        """:meth:`forward` of one token per row through the slot pool ``pool``, with the last residual add
        deferred (fused into the next norm): ``h`` is the previous block's branch output not yet added to
        ``residual`` (None for the first block); returns this block's pair. Both (batch, d_model)."""
        dtype = self.norm.weight.dtype
        x, residual = self.norm.add_forward(h, residual, dtype)
        h = self.mixer.decode(x, pool, slots)
        if self.mlp is not None:
            x, residual = self.norm2.add_forward(h, residual, dtype)
            h = self.mlp(x)
        return h, residual


class Backbone(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)


class Mamba2LM(nn.Module):
    """embedding → n_layer blocks (mixer per ``config.layer_specs``) → RMSNorm → lm_head (tied by default).

    State-dict keys match the official checkpoints: ``backbone.embedding.weight``,
    ``backbone.layers.{i}.norm.weight``, ``backbone.layers.{i}.mixer.*`` (Mamba-2, Mamba-1 or MHA names),
    ``backbone.layers.{i}.norm2.weight`` and ``.mlp.fc1/fc2.weight`` for layers with an MLP,
    ``backbone.norm_f.weight``, ``lm_head.weight``.
    """

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @classmethod
    def from_state_dict(cls, config: Mamba2Config, state_dict: dict[str, Tensor]) -> "Mamba2LM":
        """A model holding ``state_dict``'s tensors themselves (no initialisation, no copy; a tied head is tied
        again). Raises RuntimeError on missing or unexpected keys, as ``load_state_dict`` does."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.backbone.embedding.weight
        return model

    @torch.no_grad()
    def _init_weights(self) -> None:
        c = self.config
        nn.init.normal_(self.backbone.embedding.weight, std=c.initializer_range)
        if not c.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=c.initializer_range)
        n_branches = sum(1 + s.mlp for s in c.layer_specs)
        for block in self.backbone.layers:
            for lin in block.modules():
                if isinstance(lin, nn.Linear) and lin.bias is not None and not getattr(lin.bias, "_no_reinit", False):
                    nn.init.zeros_(lin.bias)
            if c.rescale_prenorm_residual:
                # GPT-2 style: scale the residual-branch output projections by 1/sqrt(number of residual branches).
                for lin in (block.mixer.out_proj, None if block.mlp is None else block.mlp.fc2):
                    if lin is not None:
                        lin.weight.div_(math.sqrt(n_branches))

    def empty_cache(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None, ssm_dtype: torch.dtype | None = None,
                    max_len: int = 0) -> InferenceCache:
        """A zero decoding state for ``batch_size`` rows.

        SSM states are ``ssm_dtype``: by default float32 (float64 for a float64 model), whatever the weights' dtype.
        ``max_len`` > 0 preallocates that many key/value positions per row in attention layers: a slot pool for
        :meth:`decode_step` (Mamba layers' states do not depend on it).
        """
        device = device if device is not None else self.lm_head.weight.device
        if ssm_dtype is None:
            ssm_dtype = torch.float64 if self.lm_head.weight.dtype == torch.float64 else torch.float32
        return InferenceCache([blk.mixer.empty_state(batch_size, device, dtype, ssm_dtype, max_len=max_len)
                               for blk in self.backbone.layers])

    def decode_step(self, input_ids: Tensor, cache: InferenceCache, slots: Slots) -> Tensor:
        """Next-token logits for one new token per row, read from and written to the slot pool ``cache``.

        Args:
            input_ids: (batch,) int64, already validated (nothing is checked here: the step issues no host read
                and has static shapes, so it can be captured in a CUDA graph; docs/design.md §7).
            cache: a pool from :meth:`empty_cache` (``max_len`` > 0 when the model has attention layers).
            slots: (batch,) int64, distinct rows of ``cache``, or a slice of consecutive rows
                (:data:`mamba2.layers.slots.Slots`); other rows are not read or written.
        Returns:
            logits (batch, padded_vocab_size) in the model dtype.
        """
        h = self.backbone.embedding(input_ids)
        residual = h.float() if self.config.residual_in_fp32 and h.dtype in (torch.float16, torch.bfloat16) else h
        h = None
        for block, pool in zip(self.backbone.layers, cache.layers):
            h, residual = block.decode(h, residual, pool, slots)
        h, _ = self.backbone.norm_f.add_forward(h, residual, self.lm_head.weight.dtype)
        return self.lm_head(h)

    def forward(self, input_ids: Tensor, *, seq_idx: Tensor | None = None,
                cu_seqlens: Tensor | Documents | None = None, attention_mask: Tensor | None = None,
                cache: InferenceCache | None = None, logits_to_keep: int = 0, check_ids: bool = True,
                logits_at: Tensor | None = None) -> Tensor:
        """Next-token logits.

        Args:
            input_ids: (batch, L) integer token ids in [0, vocab_size); batch >= 1 and L >= 1; int64 or int32,
                any other integer dtype (uint8, int16, …) is taken as int64.
            seq_idx: optional (batch, L) ints, document index per token of packed rows (nothing crosses documents).
            cu_seqlens: optional (K + 1,) int boundaries of K documents packed in one row (input_ids (1, T)),
                instead of ``seq_idx``. With ``cache`` (a fresh one of K rows) row k receives the state after
                document k, in every kind of layer (an attention layer's keys at positions 0 … len_k − 1), and
                ``cache.seqlen_offset`` the longest document's length: the packed prefill of docs/design.md §7. ``logits_to_keep`` then counts positions at the end of each
                document: logits are (K, logits_to_keep, vocab).
            attention_mask: optional (batch, L), 0 at (left) padding positions.
            cache: optional :class:`InferenceCache`, updated in place (prefill, chunked prefill or one-token decode).
            check_ids: check that every id lies in the vocabulary. This reads the ids on the host (one device
                sync); callers that validated them already (generation, the trainer's loader) pass False, and the
                forward then issues no host sync at all (a decode step stays queued on the GPU).
            logits_at: optional (batch, L) torch.bool tensor: the head runs only at these positions (one host
                sync, before the layers are queued), and the logits are (number of True, padded_vocab_size) in
                row-major order — a loss over a few labelled positions (MQAR) then skips the rest of the head and
                the cross-entropy. Not with ``cache``, ``cu_seqlens`` or ``logits_to_keep``.
        Returns:
            logits (batch, L, padded_vocab_size) in the model dtype; only the last ``logits_to_keep`` positions
            when that is > 0 (prefill for generation needs one: the head is then not run on the whole prompt);
            (number of True, padded_vocab_size) with ``logits_at``.
        Raises:
            ValueError: input_ids not a 2-D integer tensor, an empty batch or sequence (batch or L of 0), ids
                outside the vocabulary, seq_idx or attention_mask not a tensor of input_ids' shape, or a cache of
                another batch size; with ``cu_seqlens``: boundaries that do not fit, a used cache, a document
                shorter than ``logits_to_keep``; ``logits_at`` not a torch.bool tensor of input_ids' shape (a numpy
                array or a list is refused, naming its type), or given with a cache, ``cu_seqlens`` or
                ``logits_to_keep``.
        """
        input_ids = _check_input_ids(input_ids)
        for name, t in (("seq_idx", seq_idx), ("attention_mask", attention_mask), ("logits_at", logits_at)):
            if t is not None and not isinstance(t, Tensor):
                what = "a torch.bool tensor" if name == "logits_at" else "a torch.Tensor"
                raise ValueError(f"{name} must be {what} of input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{type_name(t)}")
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(t.shape)}")
        if logits_at is not None:
            if logits_at.dtype != torch.bool:
                raise ValueError(f"logits_at must be a bool mask, got dtype {logits_at.dtype}")
            if cache is not None or cu_seqlens is not None or logits_to_keep > 0:
                raise ValueError("logits_at selects positions of a plain forward: not with cache, cu_seqlens or "
                                 "logits_to_keep")
            rows = logits_at.flatten().nonzero().squeeze(1)     # the sync, while the device has little queued
        if check_ids:
            self._check_ids(input_ids)                                             # one device sync
        kw = {}
        if cu_seqlens is not None:
            docs = self._check_packed(input_ids, seq_idx, cu_seqlens, cache, logits_to_keep)
            cu = docs.cu
            if cache is None:       # the documents are all that matters: every mixer takes seq_idx
                seq_idx = docs.seq_idx
            else:
                kw = dict(cu_seqlens=docs)
        elif cache is not None and cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {input_ids.shape[0]}")
        h = self.backbone.embedding(input_ids)
        residual = h.float() if self.config.residual_in_fp32 and h.dtype in (torch.float16, torch.bfloat16) else h
        for i, block in enumerate(self.backbone.layers):
            residual = block(residual, seq_idx=seq_idx, attention_mask=attention_mask,
                             state=None if cache is None else cache.layers[i], **kw)
        if cu_seqlens is not None:
            if cache is not None:
                cache.seqlen_offset = max(b - a for a, b in zip(cu, cu[1:]))
            if logits_to_keep > 0:
                residual = residual[0][docs.windows(logits_to_keep)[0]]          # (K, logits_to_keep, d_model)
        elif cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        if logits_to_keep > 0 and cu_seqlens is None:
            residual = residual[:, -logits_to_keep:]
        if logits_at is not None:
            residual = residual.flatten(0, 1).index_select(0, rows)
        h = self.backbone.norm_f(residual).to(self.lm_head.weight.dtype)
        return self.lm_head(h)

    def _check_ids(self, input_ids: Tensor, targets: Tensor | None = None) -> None:
        """Raises ValueError for an id of ``input_ids`` outside [0, vocab_size), or a target (same shape) neither
        in [0, vocab_size) nor the ignore index -100. One host read of four numbers, whatever the batch: the ids'
        and the labelled targets' minimum and maximum (a target in [vocab_size, padded_vocab_size) would
        otherwise train a padding row of the head without a word)."""
        v = self.config.vocab_size
        stats = list(torch.aminmax(input_ids))
        if targets is not None:
            stats += [targets.masked_fill(targets == -100, 0).min(), targets.max()]
        lo, hi, *t = torch.stack([x.long() for x in stats]).tolist()                # one device sync
        if lo < 0 or hi >= v:
            raise ValueError(f"token id {hi if hi >= v else lo} is outside the vocabulary [0, {v})")
        if t and (t[0] < 0 or t[1] >= v):
            raise ValueError(f"target {t[1] if t[1] >= v else t[0]} is outside the vocabulary [0, {v}) and is not "
                             f"the ignore index -100")

    def _check_packed(self, input_ids: Tensor, seq_idx: Tensor | None, cu_seqlens: Tensor | Documents,
                      cache: InferenceCache | None, logits_to_keep: int) -> Documents:
        docs = Documents.packed(cu_seqlens, input_ids.shape[0], input_ids.shape[1], input_ids.device,
                                seq_idx=seq_idx, what="input_ids")
        cu = docs.cu
        if logits_to_keep > 0 and min(b - a for a, b in zip(cu, cu[1:])) < logits_to_keep:
            raise ValueError(f"logits_to_keep={logits_to_keep} needs documents of at least that many tokens, "
                             f"cu_seqlens gives lengths {[b - a for a, b in zip(cu, cu[1:])]}")
        if cache is not None:
            if cache.batch_size != len(cu) - 1 or cache.seqlen_offset != 0:
                raise ValueError(f"a packed prefill fills a fresh cache of one row per document: cu_seqlens gives "
                                 f"{len(cu) - 1} documents, the cache holds {cache.batch_size} rows and "
                                 f"{cache.seqlen_offset} tokens")
        return docs

    def loss(self, input_ids: Tensor, targets: Tensor, *, seq_idx: Tensor | None = None,
             attention_mask: Tensor | None = None, check_ids: bool = True, reduction: str = "mean",
             labelled_only: bool = False) -> Tensor:
        """Next-token cross-entropy in nats over targets != -100, their mean (``reduction="sum"``: their sum;
        "none": one value per position, 0 where ignored).

        With no labelled target at all (every target -100) the mean is 0 / 0 = NaN, as with
        ``torch.nn.functional.cross_entropy`` (the sum is 0): a caller that may meet such a batch takes
        ``reduction="sum"`` and divides by its own count of labelled targets, as the distributed loss does.

        Args:
            input_ids: (batch, L) integer token ids, as in :meth:`forward`.
            targets: (batch, L) integer ids aligned with input_ids, each in [0, vocab_size) or -100 (ignored);
                any integer dtype (taken as int64).
            check_ids: check input_ids and targets against the vocabulary: one host read for both (a device sync
                on a GPU). Callers that validated them (the trainer, whose token streams were checked once) pass
                False and the step reads nothing back; nothing is checked then, and a target in
                [vocab_size, padded_vocab_size) counts as a class of the padded head.
            labelled_only: the head and the cross-entropy run at the labelled positions only (``logits_at``; two
                host syncs, both before the layers are queued): the same loss, cheaper where few positions are
                labelled.
        Returns:
            a float32 scalar (a (batch·L,) tensor with ``reduction="none"``).
        Raises:
            ValueError: targets not an integer tensor of input_ids' shape on input_ids' device; with
                ``check_ids``, a target outside [0, vocab_size) other than -100; ``labelled_only`` with a
                reduction other than "mean" or "sum"; what :meth:`forward` raises."""
        input_ids = _check_input_ids(input_ids)
        if not isinstance(targets, Tensor):
            raise ValueError(f"targets must be a torch.Tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{type_name(targets)}")
        if tuple(targets.shape) != tuple(input_ids.shape):
            raise ValueError(f"targets must have input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(targets.shape)}")
        if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
            raise ValueError(f"targets must hold integer token ids (or -100), got dtype {targets.dtype}")
        if targets.device != input_ids.device:
            raise ValueError(f"targets are on {targets.device} but input_ids on {input_ids.device}")
        if labelled_only and reduction not in ("mean", "sum"):
            raise ValueError(f"labelled_only takes reduction 'mean' or 'sum', got {reduction!r}")
        targets = targets.long()
        if check_ids:
            self._check_ids(input_ids, targets)       # ids and targets in one read; the forward checks nothing
        if labelled_only:
            keep = targets != -100
            labels = targets[keep]
            logits = self(input_ids, seq_idx=seq_idx, attention_mask=attention_mask, check_ids=False,
                          logits_at=keep)
            return F.cross_entropy(logits.float(), labels, reduction=reduction)
        logits = self(input_ids, seq_idx=seq_idx, attention_mask=attention_mask, check_ids=False)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                               reduction=reduction)

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        """Distinct parameters (a tied head is counted once)."""
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        return n - self.backbone.embedding.weight.numel() if exclude_embedding else n

    def no_decay_param_names(self) -> set[str]:
        """Parameters excluded from weight decay: A_log, dt_bias, D, every norm weight and every bias (this includes
        the Mamba-1 dt_proj bias)."""
        out = set()
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "dt_bias", "D", "bias") or ".norm" in name or name.startswith("norm"):
                out.add(name)
        return out
