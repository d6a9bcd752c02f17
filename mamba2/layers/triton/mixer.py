"""The Mamba-2 mixer's training path from the in_proj output to the out_proj output as ONE autograd Function
(issue 11; docs/triton_notes.md, "Training memory"): conv + SiLU, SSD, gated grouped RMSNorm and out_proj run as
the launchers of their own kernels (:mod:`mamba2.layers.triton.conv`, :mod:`mamba2.ssd.triton.backend`,
:mod:`mamba2.layers.triton.norm`), but autograd keeps only ``zxbcdt`` (and, by the ``"keep"`` tuning, the SSD
output y, the SSD's chunk states and C·Bᵀ) for the backward. There the conv output is recomputed (one
memory-bound conv forward), then y if it was not kept (the SSD forward again), then the norm output (for
out_proj's weight gradient); the SSD backward recomputes its chunk states and C·Bᵀ when they were not kept (a
recomputed y brings them along). The backward kernels write the gradients of z, xBC and dt into one (b, L,
d_in_proj) buffer, the in_proj output's gradient, and those of x, B and C into one (b, L, conv_dim) buffer, the
conv output's gradient: no concatenation.

Applies to the mixer with the gated norm and no MLP half (``d_mlp == 0``), on one device (no tensor or context
parallelism), without a decoding state, packed ``cu_seqlens`` or attention mask, when the kernel policy runs the
kernels; :func:`applies` says so, and everything else runs the per-op path (each op its own autograd Function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mamba2.kernels import KERNEL_DTYPES, Tuning, hooked, keeps_context, use_triton
from mamba2.layers.conv_ref import check_conv_inputs
from mamba2.layers.triton import conv as conv_kernels
from mamba2.layers.triton import norm as norm_kernels
from mamba2.ssd.common import run_ids
from mamba2.ssd.triton import backend as ssd_kernels

TUNING = Tuning("mixer", {
    # FUSED: run the mixer's training forward as this one Function (False: per-op autograd, which keeps the conv
    # output, the SSD's states and C·Bᵀ, y and the norm output). Y: keep the SSD output y for the backward (one
    # (b, L, d_ssm) tensor in x's dtype) instead of running the SSD forward again there. STATES (with Y only: a
    # recomputed y brings them along): keep the SSD's entering chunk states and C·Bᵀ (b·(nc+1)·h·p·n in x's
    # dtype, b·nc·g·Q² fp32) instead of recomputing them.
    "keep": dict(FUSED=True, Y=False, STATES=False),
})


def applies(mixer: nn.Module, zxbcdt: Tensor) -> bool:
    """Whether :func:`mixer_core` runs ``mixer``'s training forward on ``zxbcdt``: grad enabled, the kernels
    chosen for it by :func:`mamba2.kernels.use_triton`, the "keep" tuning's FUSED on, a gated norm whose groups a
    kernel program holds, no MLP half, plain ``nn.Linear`` out_proj (not wrapped, e.g. by a LoRA adapter), every
    tensor fp32/bf16/fp16, no tensor or context parallelism, and nothing that the Function would bypass by
    reading the weights directly: the weights it reads are plain parameters (not recomputed by a pre-hook, as
    pruning or weight norm do) and no forward hooks sit on out_proj, the norm or the conv (nor global ones)."""
    if not (torch.is_grad_enabled() and TUNING["keep"]["FUSED"] and mixer.tp is None and mixer.cp is None
            and mixer.d_mlp == 0 and mixer.norm is not None and type(mixer.out_proj) is nn.Linear
            and mixer.norm.stat_reduce is None):
        return False
    if hooked(mixer.out_proj, mixer.norm, mixer.conv1d) or not all(
            t is None or isinstance(t, nn.Parameter)
            for t in (mixer.out_proj.weight, mixer.out_proj.bias, mixer.norm.weight, mixer.conv1d.weight,
                      mixer.conv1d.bias, mixer.dt_bias, mixer.D)):
        return False
    tensors = [zxbcdt, *(p for p in mixer.parameters(recurse=True))]
    if any(t.dtype not in KERNEL_DTYPES for t in tensors) or not use_triton(zxbcdt):
        return False
    return norm_kernels.supports(zxbcdt, zxbcdt, mixer.norm.weight, mixer.norm.group_size)


def mixer_core(mixer: nn.Module, zxbcdt: Tensor, A: Tensor, seq_idx: Tensor | None,
               out_dtype: torch.dtype) -> Tensor:
    """``out_proj(norm(SSD(conv(xBC)), z))`` of one Mamba-2 mixer from its in_proj output, the same result as the
    mixer's per-op path (the same kernels run), keeping only ``zxbcdt`` (and what the "keep" tuning adds) for the
    backward.

    Args:
        mixer: a :class:`mamba2.layers.Mamba2Mixer` for which :func:`applies` is true.
        zxbcdt: (batch, L, d_in_proj), the in_proj output: [z (d_ssm), xBC (conv_dim), dt (nheads)].
        A: (nheads,) fp32, ``-exp(A_log)``.
        seq_idx: optional (batch, L) document index per token.
        out_dtype: the dtype out_proj's input is cast to (autocast then picks the product's dtype).
    Returns:
        (batch, L, d_model).
    """
    c = mixer.config
    if seq_idx is not None:    # what the per-op path's conv checks (shape, integer dtype), with its message
        check_conv_inputs(zxbcdt[..., mixer.d_ssm:mixer.d_ssm + mixer.conv_dim], mixer.conv1d.weight[:, 0, :],
                          mixer.conv1d.bias, seq_idx=seq_idx, activation="silu")
    return _MixerCore.apply(zxbcdt, A, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.D,
                            mixer.norm.weight, mixer.out_proj.weight, mixer.out_proj.bias, seq_idx,
                            (mixer.d_ssm, mixer.conv_dim, mixer.nheads, c.headdim, mixer.ngroups, c.d_state,
                             ssd_kernels.kernel_chunk(c.chunk_size), tuple(c.dt_limit), mixer.norm.group_size,
                             mixer.norm.eps, mixer.norm.norm_before_gate, out_dtype))


def _conv(zxbcdt, cfg, conv_w, conv_b, runs):
    d_ssm, conv_dim = cfg[0], cfg[1]
    xBC = zxbcdt[..., d_ssm:d_ssm + conv_dim]
    return conv_kernels._forward(xBC, conv_w[:, 0, :], conv_b, None, runs, True)[0]


def _ssd_inputs(zxbcdt, xBC_c, cfg):
    d_ssm, conv_dim, H, P, G, N = cfg[:6]
    b, L, _ = zxbcdt.shape
    x, B, C = torch.split(xBC_c, [d_ssm, G * N, G * N], dim=-1)
    dt = zxbcdt[..., d_ssm + conv_dim:]
    B, C = B.reshape(b, L, G, N), C.reshape(b, L, G, N)
    return x.reshape(b, L, H, P), dt, B, C


def _ssd_forward(x, dt, A, B, C, D, dt_bias, seq_idx, cfg):
    """(y, entering chunk states, C·Bᵀ or None) of the SSD forward."""
    Q, dt_limit = cfg[6], cfg[7]
    y, _, _, st, cb = ssd_kernels._forward(x, dt, A, B, C, D, None, dt_bias, True, dt_limit, None, seq_idx, Q,
                                           False)
    return y, st, cb


@keeps_context
class _MixerCore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zxbcdt, A, conv_w, conv_b, dt_bias, D, norm_w, out_w, out_b, seq_idx, cfg):
        d_ssm, gs, eps, nbg, out_dtype = cfg[0], cfg[8], cfg[9], cfg[10], cfg[11]
        b, L, _ = zxbcdt.shape
        runs = None if seq_idx is None else run_ids(seq_idx, b, L, zxbcdt.device).to(torch.int32).contiguous()
        x, dt, B, C = _ssd_inputs(zxbcdt, _conv(zxbcdt, cfg, conv_w, conv_b, runs), cfg)
        y, st, cb = _ssd_forward(x, dt, A, B, C, D, dt_bias, seq_idx, cfg)
        keep = TUNING["keep"]
        if not (keep["STATES"] and keep["Y"]):
            st = cb = None
        z = zxbcdt[..., :d_ssm].reshape(b * L, d_ssm)
        n, _ = norm_kernels._forward(y.view(b * L, d_ssm), z, norm_w, gs, eps, nbg, False)
        out = F.linear(n.view(b, L, d_ssm).to(out_dtype), out_w, out_b)       # autocast picks the product's dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(zxbcdt, A, conv_w, conv_b, dt_bias, D, norm_w, out_w, out_b, seq_idx, runs,
                              y if keep["Y"] else None, st, cb)
        ctx.cfg = cfg
        ctx.mm_dtype = out.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        zxbcdt, A, conv_w, conv_b, dt_bias, D, norm_w, out_w, out_b, seq_idx, runs, y, st, cb = ctx.saved_tensors
        cfg = ctx.cfg
        d_ssm, conv_dim, H, P, G, N, Q, dt_limit, gs, eps, nbg, out_dtype = cfg
        b, L, d_in_proj = zxbcdt.shape
        if dout is None:        # the output did not reach the loss
            return (None,) * 11
        xBC = zxbcdt[..., d_ssm:d_ssm + conv_dim]
        xBC_c = _conv(zxbcdt, cfg, conv_w, conv_b, runs)
        x, dt, B, C = _ssd_inputs(zxbcdt, xBC_c, cfg)
        if y is None:
            y, st_new, cb_new = _ssd_forward(x, dt, A, B, C, D, dt_bias, seq_idx, cfg)
            if st is None:       # the forward just ran: its states and C·Bᵀ come for free
                st, cb = st_new, cb_new
            del st_new, cb_new
        y2, z2 = y.view(b * L, d_ssm), zxbcdt[..., :d_ssm].reshape(b * L, d_ssm)
        n, rstd = norm_kernels._forward(y2, z2, norm_w, gs, eps, nbg, True)

        # out_proj, in the dtype its forward product ran in (bf16 under autocast), as autograd would
        mm = ctx.mm_dtype
        g = dout.reshape(b * L, -1).to(mm)
        need = ctx.needs_input_grad
        d_out_w = (g.t() @ n.to(out_dtype).to(mm)).to(out_w.dtype) if need[7] else None     # frozen: skipped
        d_out_b = g.sum(0).to(out_b.dtype) if out_b is not None and need[8] else None
        dn = (g @ out_w.to(mm)).to(out_dtype).to(n.dtype)
        del n, g

        # the gradients of z, xBC and dt go straight into one buffer, as do those of x, B and C (no concatenation)
        d_zxbcdt = torch.empty_like(zxbcdt, memory_format=torch.contiguous_format)
        dy, _, d_norm_w = norm_kernels._backward(dn, y2, z2, norm_w, rstd, gs, nbg, need_dz=True,
                                                 dz_out=d_zxbcdt[..., :d_ssm].view(b * L, d_ssm))
        del dn, y, y2
        d_xBC_c = torch.empty_like(xBC_c)
        dx, dB, dC = torch.split(d_xBC_c, [d_ssm, G * N, G * N], dim=-1)
        _, ddt, dA, _, _, dD, _, d_dt_bias, _ = ssd_kernels._backward(
            dy.view(b, L, H, P), None, x, dt, A, B, C, D, None, dt_bias, True, dt_limit, None, seq_idx, Q, None,
            st, cb, dx_out=dx.view(b, L, H, P), dB_out=dB.view(b, L, G, N), dC_out=dC.view(b, L, G, N))
        del dy, xBC_c, st, cb
        _, d_conv_w, d_conv_b, _ = conv_kernels._backward(d_xBC_c, None, xBC, conv_w[:, 0, :], conv_b, None, runs,
                                                          True, False,
                                                          dx_out=d_zxbcdt[..., d_ssm:d_ssm + conv_dim])
        d_zxbcdt[..., d_ssm + conv_dim:].copy_(ddt)
        return (d_zxbcdt, dA, d_conv_w.reshape(conv_w.shape), d_conv_b, d_dt_bias, dD, d_norm_w.to(norm_w.dtype),
                d_out_w, d_out_b, None, None)

