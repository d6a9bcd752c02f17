"""The official state-spaces/mamba_ssm format: its ``MambaConfig`` (a checkpoint's ``config.json``) to and from
:class:`~mamba2.config.Mamba2Config`, for every layout it can express: Mamba-1 (``ssm_cfg`` without ``layer`` —
mamba-130m …), Mamba-2 (``"layer": "Mamba2"``), hybrids (``attn_layer_idx`` + ``attn_cfg`` — mamba2attn-2.7b)
and SwiGLU MLPs (``d_intermediate``). Tensor names are ours already: with the config translated, the official
``pytorch_model.bin`` state dict loads into :class:`~mamba2.models.Mamba2LM` with ``load_state_dict`` as is.

:func:`config_from_mamba_ssm` / :func:`config_to_mamba_ssm` raise ValueError; :func:`official_to_config` /
:func:`config_to_official` are the same mappings for model directories, raising :class:`UserError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from mamba2.config import Mamba2Config
from mamba2.errors import UserError

_NORM_EPS = 1e-5  # hard-coded in mamba_ssm (block RMSNorm default and RMSNormGated of Mamba2)

_TOP = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
        "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}
_SHARED_SSM = ("d_state", "d_conv", "expand", "dt_min", "dt_max", "dt_init_floor", "conv_bias", "bias")
_MAMBA2_SSM = _SHARED_SSM + ("headdim", "d_ssm", "ngroups", "A_init_range", "D_has_hdim", "rmsnorm",
                             "norm_before_gate", "dt_limit", "chunk_size")
_MAMBA1_SSM = _SHARED_SSM + ("dt_rank",)
# Keys that change only speed or initialisation, never the function a checkpoint computes.
_IGNORED_SSM = {"use_mem_eff_path", "use_fast_path", "conv_init", "dt_init", "dt_scale", "layer_idx"}
_ATTN = {"num_heads": "attn_num_heads", "num_heads_kv": "attn_num_heads_kv", "head_dim": "attn_head_dim",
         "rotary_emb_dim": "attn_rotary_dim", "rotary_emb_base": "attn_rotary_base",
         "rotary_emb_interleaved": "attn_rotary_interleaved", "qkv_proj_bias": "attn_qkv_bias",
         "out_proj_bias": "attn_out_bias", "softmax_scale": "attn_softmax_scale", "d_conv": "attn_d_conv"}
_MLP_MULTIPLE = 128  # mamba_ssm's GatedMLP rounds its hidden size up to a multiple of 128


def config_from_mamba_ssm(d: Mapping[str, Any]) -> Mamba2Config:
    """A :class:`Mamba2Config` equal in function to an official ``MambaConfig`` dict.

    Official defaults apply to absent keys (``ssm_cfg.layer`` = Mamba1, Mamba-1 d_state 16, MHA biases on,
    no rotary, ``pad_vocab_size_multiple`` 8); ``d_intermediate`` is rounded up to a multiple of 128 like
    mamba_ssm's GatedMLP.

    Raises:
        ValueError: unknown keys (naming them), LayerNorm models (``rms_norm: false``), non-causal attention,
            an attention ``mlp_dim``, ``attn_layer_idx`` outside [0, n_layer), or sizes Mamba2Config rejects.
    """
    unknown = sorted(set(d) - _TOP)
    if unknown:
        raise ValueError(f"mamba_ssm config: unknown keys {unknown} (known: {sorted(_TOP)})")
    if not d.get("rms_norm", True):
        raise ValueError("mamba_ssm config: rms_norm=false (LayerNorm blocks) is not supported; only RMSNorm models")
    n_layer = d["n_layer"]
    ssm = dict(d.get("ssm_cfg") or {})
    kind = ssm.pop("layer", "Mamba1")
    if kind not in ("Mamba1", "Mamba2"):
        raise ValueError(f"mamba_ssm config: ssm_cfg.layer must be 'Mamba1' or 'Mamba2', got {kind!r}")
    allowed = _MAMBA2_SSM if kind == "Mamba2" else _MAMBA1_SSM
    bad = sorted(set(ssm) - set(allowed) - _IGNORED_SSM)
    if bad:
        raise ValueError(f"mamba_ssm config: ssm_cfg keys {bad} are not supported for {kind} layers")
    fields: dict[str, Any] = {k: ssm[k] for k in allowed if k in ssm}
    if kind == "Mamba1":
        fields.setdefault("d_state", 16)
        if fields.get("dt_rank") == "auto":
            fields["dt_rank"] = None
    attn_idx = sorted(int(i) for i in d.get("attn_layer_idx") or [])
    if any(not 0 <= i < n_layer for i in attn_idx):
        raise ValueError(f"mamba_ssm config: attn_layer_idx {attn_idx} must lie in [0, n_layer={n_layer})")
    if attn_idx:
        fields.update(_attention_fields(dict(d.get("attn_cfg") or {})))
    d_int = int(d.get("d_intermediate", 0))
    d_int = math.ceil(d_int / _MLP_MULTIPLE) * _MLP_MULTIPLE
    ssm_kind = "mamba2" if kind == "Mamba2" else "mamba1"
    if attn_idx or ssm_kind != "mamba2" or d_int > 0:
        fields["layout"] = tuple(("attention" if i in attn_idx else ssm_kind) + ("+mlp" if d_int > 0 else "")
                                 for i in range(n_layer))
    return Mamba2Config(
        d_model=d["d_model"], n_layer=n_layer, vocab_size=d["vocab_size"], d_intermediate=d_int,
        residual_in_fp32=d.get("residual_in_fp32", True), pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
        tie_embeddings=d.get("tie_embeddings", True), **fields)


def _attention_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.pop("causal", False):
        raise ValueError("mamba_ssm config: attn_cfg.causal must be true (a language model's attention is causal)")
    if cfg.pop("mlp_dim", 0):
        raise ValueError("mamba_ssm config: attn_cfg.mlp_dim > 0 (an MLP fused into MHA) is not supported")
    bad = sorted(set(cfg) - set(_ATTN))
    if bad:
        raise ValueError(f"mamba_ssm config: attn_cfg keys {bad} are not supported (known: {sorted(_ATTN)})")
    if "num_heads" not in cfg:
        raise ValueError("mamba_ssm config: attn_cfg.num_heads is required")
    out = {"attn_rotary_dim": 0, "attn_qkv_bias": True, "attn_out_bias": True}   # MHA's defaults
    out.update({_ATTN[k]: v for k, v in cfg.items()})
    return out


def config_to_mamba_ssm(c: Mamba2Config) -> dict[str, Any]:
    """The official ``MambaConfig`` dict of a config (inverse of :func:`config_from_mamba_ssm`).

    Raises:
        ValueError: a layout mamba_ssm cannot express (both Mamba-1 and Mamba-2 layers, MLPs on some layers
            only, d_intermediate not a multiple of 128) or options it lacks (naming them).
    """
    specs = c.layer_specs
    ssm_kinds = {s.mixer for s in specs} - {"attention"}
    if len(ssm_kinds) > 1:
        raise ValueError("mamba_ssm cannot express a layout with both Mamba-1 and Mamba-2 layers")
    if len({s.mlp for s in specs}) > 1:
        raise ValueError("mamba_ssm cannot express MLPs on some layers only: it adds one to every layer or none")
    if c.d_intermediate % _MLP_MULTIPLE:
        raise ValueError(f"mamba_ssm rounds d_intermediate up to a multiple of {_MLP_MULTIPLE}; "
                         f"got d_intermediate={c.d_intermediate}")
    if c.d_mlp and "mamba1" in ssm_kinds:
        raise ValueError("d_ssm applies to Mamba-2 layers only")
    kind = ssm_kinds.pop() if ssm_kinds else "mamba2"
    names = _MAMBA2_SSM if kind == "mamba2" else _MAMBA1_SSM
    ssm = {k: getattr(c, k) for k in names}
    ssm["layer"] = "Mamba2" if kind == "mamba2" else "Mamba1"
    for k in ("dt_limit", "A_init_range"):
        if k in ssm:
            ssm[k] = list(ssm[k])
    if ssm.get("dt_limit") == [0.0, math.inf]:   # mamba_ssm's default; omitted so config.json stays strict JSON
        del ssm["dt_limit"]
    if kind == "mamba1" and ssm["dt_rank"] is None:
        ssm["dt_rank"] = "auto"
    attn_idx = [i for i, s in enumerate(specs) if s.mixer == "attention"]
    attn_cfg = {}
    if attn_idx:
        attn_cfg = {k: getattr(c, v) for k, v in _ATTN.items()}
        r = c.resolved
        attn_cfg.update(causal=True, num_heads=r.attn_num_heads, num_heads_kv=r.attn_num_heads_kv,
                        head_dim=r.attn_head_dim, rotary_emb_dim=r.attn_rotary_dim)
    return {"d_model": c.d_model, "d_intermediate": c.d_intermediate if specs and specs[0].mlp else 0,
            "n_layer": c.n_layer, "vocab_size": c.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": attn_idx,
            "attn_cfg": attn_cfg, "rms_norm": True, "residual_in_fp32": c.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": c.pad_vocab_size_multiple, "tie_embeddings": c.tie_embeddings}


def official_to_config(cfg: dict[str, Any], path: Path) -> Mamba2Config:
    """Map a mamba_ssm ``config.json`` (official defaults for missing keys) to ours, with
    :func:`config_from_mamba_ssm`, so Mamba-1, hybrid and MLP checkpoints map too.

    Raises:
        UserError: unknown keys, LayerNorm (``rms_norm: false``), unsupported options, or sizes our config
            rejects; the message names ``path``.
    """
    try:
        return config_from_mamba_ssm(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: {e if not isinstance(e, KeyError) else f'missing key {e}'}") from None


def config_to_official(config: Mamba2Config) -> dict[str, Any]:
    """Our config as a mamba_ssm ``config.json`` (loadable by ``MambaLMHeadModel.from_pretrained``), with
    :func:`config_to_mamba_ssm`.

    Raises:
        UserError: ``norm_eps`` other than mamba_ssm's fixed 1e-5, or a layout mamba_ssm cannot express.
    """
    if config.norm_eps != _NORM_EPS:
        raise UserError(f"norm_eps={config.norm_eps} cannot be expressed in the official format "
                        f"(mamba_ssm fixes 1e-5)")
    try:
        return config_to_mamba_ssm(config)
    except ValueError as e:
        raise UserError(f"cannot export to the official format: {e}") from None
