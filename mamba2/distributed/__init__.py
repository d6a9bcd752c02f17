"""Training on several processes with torch.distributed (docs/distributed.md): FSDP2 data parallelism, tensor
parallelism of the Mamba-2 mixer (§8), context parallelism by state passing, composed on one DeviceMesh.

Modules: :mod:`~mamba2.distributed.collectives` (autograd collectives), :mod:`~mamba2.distributed.tensor_parallel`,
:mod:`~mamba2.distributed.context_parallel`, :mod:`~mamba2.distributed.parallelize` (mesh and ``parallelize``),
:mod:`~mamba2.distributed.checkpoint` (DCP), :mod:`~mamba2.distributed.runtime` (one rank of a ``torchrun`` job).
"""
