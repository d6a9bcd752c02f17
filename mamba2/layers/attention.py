"""Causal multi-head attention with grouped KV heads and rotary embeddings: the attention layers of the hybrid
models and of the Transformer++ baseline (Dao & Gu 2024, §9.2), laid out like mamba_ssm's ``MHA``.

Parameters: ``in_proj`` (fused [q (H·d), k (Hkv·d), v (Hkv·d)] rows), optional ``conv1d`` (depthwise causal
conv over the fused qkv, ``attn_d_conv > 0``, no activation, as in mamba2attn), ``out_proj`` (d_model, H·d).
Attention runs in ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where torch has them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.config import Mamba2Config
from mamba2.layers.conv import CausalConv1d
from mamba2.layers.slots import Slots, as_index, put, take
from mamba2.layers.rotary import apply_rotary, rotary_cos_sin
from mamba2.ssd.common import run_ids
from mamba2.ssd.varlen import Documents

_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionLayerState:
    """Decoding state of one attention layer: the keys and values seen so far (after rotary), in a buffer that
    grows by doubling.

    k, v: (batch, capacity, kv_heads, head_dim) in the model dtype, valid for the first ``length`` slots.
    valid: (batch, capacity) bool, False at padding (never attended to). pos: (batch,) int64, the position of
    each row's next real token (rotary). conv: (batch, attn_d_conv - 1, qkv_dim) or None. padded: some slot is
    padding (a key mask is needed).
    """

    k: Tensor
    v: Tensor
    valid: Tensor
    pos: Tensor
    conv: Tensor | None = None
    length: int = 0
    padded: bool = False
    growing: ClassVar[tuple[str, ...]] = ("k", "v", "valid")      # valid for the first ``length`` positions

    def fill_documents(self, k: Tensor, v: Tensor, cu: list[int]) -> None:
        """A fresh state of one row per packed document: row j takes the keys/values (T, kv_heads, head_dim) of
        tokens cu[j] … cu[j+1] − 1 at positions 0 … len_j − 1 (the rest of the row is padding)."""
        lengths = [e - s for s, e in zip(cu, cu[1:])]
        n = max(lengths)
        if n > self.k.shape[1]:
            self.k, self.v, self.valid = (_grow(t, max(n, 16)) for t in (self.k, self.v, self.valid))
        for j, (start, length) in enumerate(zip(cu, lengths)):     # host values: no device sync
            self.k[j, :length] = k[start:start + length]
            self.v[j, :length] = v[start:start + length]
            self.valid[j, :length] = True
        self.pos.copy_(torch.tensor(lengths, dtype=torch.int64))
        self.length, self.padded = n, min(lengths) < n

    def append(self, k: Tensor, v: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store L new keys/values (b, L, kv_heads, head_dim); return all of them and the key mask (None: all real)."""
        n = self.length + k.shape[1]
        if n > self.k.shape[1]:
            cap = max(n, 2 * self.k.shape[1], 16)
            self.k, self.v, self.valid = (_grow(t, cap) for t in (self.k, self.v, self.valid))
        self.k[:, self.length:n] = k
        self.v[:, self.length:n] = v
        self.valid[:, self.length:n] = True if keep is None else keep
        self.padded = self.padded or (keep is not None and not bool(keep.all()))
        self.length = n
        return self.k[:, :n], self.v[:, :n], self.valid[:, :n] if self.padded else None


def _grow(t: Tensor, capacity: int) -> Tensor:
    out = t.new_zeros(t.shape[0], capacity, *t.shape[2:])
    out[:, :t.shape[1]] = t
    return out


def token_positions(keep: Tensor | None, runs: Tensor | None, past: Tensor | None, batch: int, seqlen: int,
                    device: torch.device) -> Tensor:
    """Rotary position of every token: real tokens counted from the start of their document (run), after
    ``past`` earlier ones; padding does not count. Returns (batch, seqlen) int64 (padding gets a clamped value)."""
    real = torch.ones(batch, seqlen, dtype=torch.int64, device=device) if keep is None else keep.to(torch.int64)
    counts = real.cumsum(dim=1)
    if runs is not None:
        idx = torch.arange(seqlen, device=device).expand(batch, seqlen)
        starts = torch.ones_like(runs, dtype=torch.bool)
        starts[:, 1:] = runs[:, 1:] != runs[:, :-1]
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        counts = counts - (counts - real).gather(1, first)
    pos = counts - 1 if past is None else counts - 1 + past.unsqueeze(1)
    return pos.clamp(min=0)


def attention_mask_for(seqlen: int, total: int, key_valid: Tensor | None, runs: Tensor | None,
                       device: torch.device) -> Tensor:
    """Boolean mask (batch or 1, 1, seqlen, total): query i (absolute index total - seqlen + i) may see key j iff
    j <= i, key j is real (``key_valid``) or is i itself, and i, j lie in the same document (``runs``)."""
    q_abs = torch.arange(total - seqlen, total, device=device)
    k_idx = torch.arange(total, device=device)
    m = (k_idx[None, :] <= q_abs[:, None]).unsqueeze(0)                              # (1, L, T)
    if key_valid is not None:
        m = m & (key_valid[:, None, :] | (k_idx[None, :] == q_abs[:, None]).unsqueeze(0))
    if runs is not None:
        m = m & (runs[:, :, None] == runs[:, None, :])
    return m.unsqueeze(1)


class Attention(nn.Module):
    """Causal self-attention mixer (implements :class:`mamba2.layers.mixer.Mixer`)."""

    kind: ClassVar[str] = "attention"

    def __init__(self, config: Mamba2Config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        r = c.resolved
        self.nheads, self.nheads_kv, self.head_dim = r.attn_num_heads, r.attn_num_heads_kv, r.attn_head_dim
        self.rotary_dim = r.attn_rotary_dim
        self.in_proj = nn.Linear(c.d_model, c.attn_qkv_dim, bias=c.attn_qkv_bias)
        self.conv1d = CausalConv1d(c.attn_qkv_dim, c.attn_d_conv) if c.attn_d_conv > 0 else None
        self.out_proj = nn.Linear(self.nheads * self.head_dim, c.d_model, bias=c.attn_out_bias)
        # hooks of tensor / context parallelism (mamba2.distributed), set by its parallelize(); None on one device
        self.tp = None
        self.cp = None

    def empty_state(self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    ssm_dtype: torch.dtype = torch.float32, max_len: int = 0) -> AttentionLayerState:
        """An empty KV cache (``ssm_dtype`` is unused: keys and values are kept in ``dtype``, the model's).

        ``max_len`` > 0 preallocates that many key/value positions per row: a slot pool for :meth:`decode`,
        whose rows each hold one sequence's keys at positions ``0 … pos - 1``.
        """
        dtype = dtype or self.in_proj.weight.dtype
        kv = torch.zeros(batch, max_len, self.nheads_kv, self.head_dim, device=device, dtype=dtype)
        c = self.config
        conv = (torch.zeros(batch, c.attn_d_conv - 1, c.attn_qkv_dim, device=device, dtype=dtype)
                if self.conv1d is not None else None)
        return AttentionLayerState(kv, kv.clone(), torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                                   torch.zeros(batch, dtype=torch.int64, device=device), conv)

    def decode(self, u: Tensor, pool: AttentionLayerState, slots: Slots) -> Tensor:
        """One token per row for the pool rows ``slots`` (docs/design.md §7): u (batch, d_model) → (batch,
        d_model). Row i's key and value go to position ``pool.pos`` of its slot, which must be below the pool's
        ``max_len`` (the engine checks this when it admits a request); other slots are not touched. Static
        shapes and no host reads, so the step can be captured in a CUDA graph."""
        if self.tp is not None or self.cp is not None:
            raise ValueError("decoding runs on one device: this attention layer is sharded (tensor or context "
                             "parallel)")
        b = u.shape[0]
        qkv = self.in_proj(u)
        if self.conv1d is not None:
            qkv, conv = self.conv1d(qkv[:, None], conv_state=take(pool.conv, slots))
            qkv = qkv[:, 0]
            put(pool.conv, slots, conv)
        H, Hkv, d = self.nheads, self.nheads_kv, self.head_dim
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
        q, k, v = q.view(b, 1, H, d), k.view(b, 1, Hkv, d), v.view(b, 1, Hkv, d)
        # clamped so that the engine's scratch row (it pads graph batches and is stepped without end) stays in
        # bounds; a real slot never gets there (the engine checks prompt + max_tokens against max_len)
        pos = take(pool.pos, slots).clamp(max=pool.k.shape[1] - 1)
        if self.rotary_dim > 0:
            cos, sin = rotary_cos_sin(pos[:, None], self.rotary_dim, self.config.attn_rotary_base,
                                      torch.float64 if q.dtype == torch.float64 else torch.float32)
            q = apply_rotary(q, cos, sin, self.config.attn_rotary_interleaved)
            k = apply_rotary(k, cos, sin, self.config.attn_rotary_interleaved)
        rows = as_index(slots, u.device)
        pool.k.index_put_((rows, pos), k[:, 0].to(pool.k.dtype))
        pool.v.index_put_((rows, pos), v[:, 0].to(pool.v.dtype))
        pool.valid.index_put_((rows, pos), torch.ones_like(pos, dtype=torch.bool))
        pool.pos.index_add_(0, rows, torch.ones_like(pos))
        mask = take(pool.valid, slots)[:, None, None, :]                                # (b, 1, 1, max_len)
        y = self._attend(q, take(pool.k, slots).to(q.dtype), take(pool.v, slots).to(q.dtype), mask, causal=False)
        return self.out_proj(y.reshape(b, H * d))

    def forward(self, u: Tensor, *, seq_idx: Tensor | None = None, cu_seqlens: Tensor | Documents | None = None,
                attention_mask: Tensor | None = None, state: AttentionLayerState | None = None) -> Tensor:
        """Attend causally.

        Args:
            u: (batch, L, d_model).
            seq_idx: optional (batch, L) document index per token: no attention across a change of value, and
                rotary positions restart at each document. Not with ``state``.
            cu_seqlens: optional (K + 1,) int boundaries of K documents packed in one row (batch 1), instead of
                ``seq_idx``; with ``state`` (a fresh one of K rows) row k receives document k's keys and values at
                positions 0 … len_k − 1 and its conv window (a packed prefill, docs/design.md §7).
            attention_mask: optional (batch, L), 0 at padding: padded keys are never attended to and do not
                advance rotary positions (a left-padded row gets exactly what it gets alone).
            state: optional :class:`AttentionLayerState`, extended in place with the L new keys and values.
        Returns:
            (batch, L, d_model) in u's dtype.
        Raises:
            ValueError: ``seq_idx`` together with ``state``; ``cu_seqlens`` with ``seq_idx`` or ``attention_mask``,
                or with a state that is not fresh or not one row per document.
        """
        b, L, _ = u.shape
        if seq_idx is not None and state is not None:
            raise ValueError("seq_idx (packed documents) cannot be combined with a decoding state")
        docs = None
        if cu_seqlens is not None:
            docs = Documents.of_mixer_input(cu_seqlens, u, seq_idx=seq_idx, attention_mask=attention_mask,
                                            state_rows=None if state is None else state.k.shape[0])
            if state is not None and state.length != 0:
                raise ValueError(f"a packed prefill fills a fresh state: this one holds {state.length} positions")
            seq_idx, packed_state, state = docs.seq_idx, state, None     # the forward is the seq_idx one
        if self.cp is not None and (state is not None or attention_mask is not None):
            raise ValueError("a context-parallel attention layer takes whole sequences (seq_idx allowed): no "
                             "decoding state or attention_mask")
        keep = None if attention_mask is None else attention_mask.to(torch.bool)
        qkv = self.in_proj(u) if self.tp is None else self.tp.column_parallel(self.in_proj, u)
        if self.conv1d is not None and self.cp is not None:
            width = self.conv1d.d_conv - 1
            ext, ext_seq, _ = self.cp.halo(qkv, seq_idx, width)
            qkv = self.conv1d(ext, seq_idx=ext_seq)[0][:, width:]
        elif self.conv1d is not None:
            if keep is not None:
                qkv = qkv * keep.unsqueeze(-1).to(qkv.dtype)
            if docs is not None:
                qkv, conv_state = self.conv1d(qkv, cu_seqlens=docs)
                if packed_state is not None:
                    packed_state.conv.copy_(conv_state)
            else:
                qkv, conv_state = self.conv1d(qkv, seq_idx=seq_idx, conv_state=None if state is None else state.conv)
                if state is not None:
                    state.conv.copy_(conv_state)
        H, Hkv, d = self.nheads, self.nheads_kv, self.head_dim
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
        q, k, v = q.view(b, L, H, d), k.view(b, L, Hkv, d), v.view(b, L, Hkv, d)
        if self.cp is not None:
            return self._out(self._forward_cp(q, k, v, seq_idx))
        runs = run_ids(seq_idx, b, L, u.device)
        if self.rotary_dim > 0:
            pos = token_positions(keep, runs, None if state is None else state.pos, b, L, u.device)
            cos, sin = rotary_cos_sin(pos, self.rotary_dim, self.config.attn_rotary_base,
                                      torch.float64 if q.dtype == torch.float64 else torch.float32)
            q = apply_rotary(q, cos, sin, self.config.attn_rotary_interleaved)
            k = apply_rotary(k, cos, sin, self.config.attn_rotary_interleaved)
        key_valid = keep
        if state is not None:
            state.pos += L if keep is None else keep.sum(dim=1)
            k, v, key_valid = state.append(k, v, keep)
        y = self._sdpa(q, k.to(q.dtype), v.to(q.dtype), key_valid, runs)
        if docs is not None and packed_state is not None:
            packed_state.fill_documents(k[0], v[0], docs.cu)
        return self._out(y)

    def _out(self, y: Tensor) -> Tensor:
        y = y.reshape(*y.shape[:2], -1)
        return self.out_proj(y) if self.tp is None else self.tp.row_parallel(self.out_proj, y)

    def _forward_cp(self, q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None) -> Tensor:
        """Attention of this rank's queries over the keys and values of the whole row, all-gathered from the
        context-parallel ranks (docs/distributed.md §3); rotary positions and documents are those of the row."""
        b, L = q.shape[:2]
        lengths = self.cp.lengths(L, q.device)
        start, T = sum(lengths[:self.cp.rank]), sum(lengths)
        runs_all = run_ids(None if seq_idx is None else self.cp.gather_tokens(seq_idx, lengths), b, T, q.device)
        if self.rotary_dim > 0:
            pos = token_positions(None, runs_all, None, b, T, q.device)[:, start:start + L]
            cos, sin = rotary_cos_sin(pos, self.rotary_dim, self.config.attn_rotary_base,
                                      torch.float64 if q.dtype == torch.float64 else torch.float32)
            q = apply_rotary(q, cos, sin, self.config.attn_rotary_interleaved)
            k = apply_rotary(k, cos, sin, self.config.attn_rotary_interleaved)
        k, v = self.cp.gather_tokens(k, lengths), self.cp.gather_tokens(v, lengths)
        q_abs = torch.arange(start, start + L, device=q.device)
        mask = (torch.arange(T, device=q.device)[None, :] <= q_abs[:, None]).unsqueeze(0)
        if runs_all is not None:
            mask = mask & (runs_all[:, start:start + L, None] == runs_all[:, None, :])
        return self._attend(q, k.to(q.dtype), v.to(q.dtype), mask.unsqueeze(1), causal=False)

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None, runs: Tensor | None) -> Tensor:
        """q: (b, L, H, d); k, v: (b, T, Hkv, d) with the L queries last among the T keys. Returns (b, L, H, d)."""
        L, T = q.shape[1], k.shape[1]
        plain = key_valid is None and runs is None
        mask = None if plain and (T == L or L == 1) else attention_mask_for(L, T, key_valid, runs, q.device)
        return self._attend(q, k, v, mask, causal=plain and T == L and L > 1)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        """Scaled dot-product attention, (b, L, H, d) and (b, T, Hkv, d) → (b, L, H, d); mask broadcasts to
        (b, H, L, T) (True: may attend)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = {}
        if self.nheads_kv != self.nheads:
            if _SDPA_HAS_GQA:
                gqa = dict(enable_gqa=True)
            else:
                k = k.repeat_interleave(self.nheads // self.nheads_kv, dim=1)
                v = v.repeat_interleave(self.nheads // self.nheads_kv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           scale=self.config.attn_softmax_scale, **gqa)
        return y.transpose(1, 2)
