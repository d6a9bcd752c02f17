"""Data, tensor and context parallelism of a :class:`mamba2.models.lm.Mamba2LM` on one DeviceMesh
(docs/distributed.md).

The mesh has three named dimensions, ``("dp", "cp", "tp")``, outermost first. :func:`parallelize`

- cuts every Mamba-2 mixer, attention layer (by heads) and SwiGLU MLP over ``tp``
  (:mod:`mamba2.distributed.tensor_parallel`),
- gives every Mamba-2 mixer the state-passing hooks of ``cp``, and every attention layer the all-gather of keys and
  values (:mod:`mamba2.distributed.context_parallel`),
- shards the parameters, gradients and optimizer state with FSDP2 (``fully_shard`` per block and at the root)
  over ``dp × cp`` flattened: context-parallel ranks hold the same weights and see different tokens, so their
  gradients are reduced together with the data-parallel ones, as in torchtitan.

Mamba-1 layers are computed whole on every TP rank (correct, not memory-saving) and refused under CP; an MLP is
token-local and needs nothing under CP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from mamba2.distributed.context_parallel import ContextParallel
from mamba2.distributed.tensor_parallel import check_attention, check_mixer, shard_attention, shard_mixer, shard_mlp

MESH_DIMS = ("dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the mesh dimensions; ``dp * cp * tp`` is the world size."""

    dp: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def for_world(cls, world_size: int, *, tp: int = 1, cp: int = 1) -> "ParallelDims":
        """The data-parallel size that fills ``world_size`` ranks given ``tp`` and ``cp``.

        Raises:
            ValueError: a size < 1, or a world size that ``tp * cp`` does not divide (naming all three).
        """
        for name, v in (("tp", tp), ("cp", cp), ("world size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if world_size % (tp * cp):
            raise ValueError(f"the world size must be a multiple of tp * cp: world size {world_size}, tp {tp}, "
                             f"cp {cp} (tp * cp = {tp * cp})")
        return cls(world_size // (tp * cp), cp, tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.cp * self.tp

    @property
    def sharded(self) -> bool:
        """Whether FSDP2 shards anything (more than one rank on ``dp × cp``)."""
        return self.dp * self.cp > 1

    def check_model(self, config) -> None:
        """Raise ValueError (the same on every rank, before any compute) unless ``config`` can run on this mesh."""
        kinds = {s.mixer for s in config.layer_specs}
        if self.tp > 1 and "mamba2" in kinds:
            check_mixer(config, self.tp)
        if self.tp > 1 and "attention" in kinds:
            check_attention(config, self.tp)
        if self.tp > 1 and any(s.mlp for s in config.layer_specs) and config.d_intermediate % self.tp:
            raise ValueError(f"tensor parallelism splits the MLPs: d_intermediate % tp == 0 required, got "
                             f"d_intermediate={config.d_intermediate}, tp={self.tp}")
        if self.cp > 1 and "mamba1" in kinds:
            raise ValueError("context parallelism splits Mamba-2 and attention layers; this model also has mamba1 "
                             "layers, which it does not split (use cp = 1)")

    def check_batch(self, batch_size: int, seq_len: int, d_conv: int) -> None:
        """Raise ValueError unless a global batch of ``batch_size`` rows of ``seq_len`` tokens splits over the
        mesh: rows over ``dp``, tokens over ``cp`` (at least ``d_conv - 1`` per rank)."""
        if batch_size % self.dp:
            raise ValueError(f"the global batch is split over the data-parallel ranks: batch_size % dp == 0 "
                             f"required, got batch_size={batch_size}, dp={self.dp}")
        if self.cp > 1 and seq_len // self.cp < max(d_conv - 1, 1):
            raise ValueError(f"context parallelism needs at least max(d_conv - 1, 1) = {max(d_conv - 1, 1)} tokens "
                             f"per rank: seq_len={seq_len}, cp={self.cp}")


def build_mesh(dims: ParallelDims, device_type: str) -> DeviceMesh:
    """The ``("dp", "cp", "tp")`` mesh over the default process group (pass ``"cpu"`` for gloo: a gloo group on a
    GPU machine otherwise gets a CUDA mesh)."""
    return init_device_mesh(device_type, (dims.dp, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS)


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The flattened ``dp × cp`` mesh that FSDP2 shards over."""
    return mesh["dp", "cp"]._flatten("dp_cp")


def split_rows(dims: ParallelDims, mesh: DeviceMesh, batch_size: int) -> slice:
    """This rank's rows of a global batch."""
    n = batch_size // dims.dp
    r = mesh.get_local_rank("dp")
    return slice(r * n, (r + 1) * n)


def split_tokens(dims: ParallelDims, mesh: DeviceMesh, seq_len: int) -> slice:
    """This rank's tokens of a row: consecutive pieces, the first ``seq_len % cp`` one token longer."""
    r, cp = mesh.get_local_rank("cp"), dims.cp
    base, extra = divmod(seq_len, cp)
    lo = r * base + min(r, extra)
    return slice(lo, lo + base + (r < extra))


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, *,
                param_dtype: torch.dtype | None = None, fsdp: bool = True) -> nn.Module:
    """Apply TP, CP and FSDP2 to ``model`` in place (see the module docstring) and return it.

    Args:
        model: a one-device Mamba2LM, on the mesh's device, not yet given to an optimizer. Build the optimizer
            before the first forward: after one, FSDP2's root module holds its unsharded parameters.
        param_dtype: FSDP2's compute dtype of the gathered parameters (e.g. bf16 on GPUs; gradients are reduced
            in fp32). None: the parameters' own dtype.
        fsdp: False keeps every (TP-cut) weight whole on each rank of ``dp × cp`` and reduces no gradient: for a
            forward-only long-context prefill split by CP, or backends without reduce-scatter (gloo with CUDA
            tensors). A caller that trains so must sum the gradients over ``dp × cp`` itself.
    Raises:
        ValueError: what :meth:`ParallelDims.check_model` refuses.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dims.check_model(model.config)
    blocks = model.backbone.layers
    for block in blocks:
        if dims.tp > 1:
            tp_group, tp_rank = mesh["tp"].get_group(), mesh.get_local_rank("tp")
            if block.mixer.kind == "mamba2":
                shard_mixer(block.mixer, tp_group, tp_rank, dims.tp)
            elif block.mixer.kind == "attention":
                shard_attention(block.mixer, tp_group, tp_rank, dims.tp)
            if block.mlp is not None:
                shard_mlp(block.mlp, tp_group, tp_rank, dims.tp)
        if dims.cp > 1:
            block.mixer.cp = ContextParallel(mesh["cp"].get_group())
    if dims.sharded and fsdp:
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        shard_over = fsdp_mesh(mesh)
        for block in blocks:
            fully_shard(block, mesh=shard_over, mp_policy=policy)
        fully_shard(model, mesh=shard_over, mp_policy=policy)
    return model
