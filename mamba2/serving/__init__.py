"""Serving: the continuous-batching engine (:class:`Engine`), device-side sampling (:class:`SamplingParams`) and
the decode step's CUDA graphs (docs/design.md §7)."""

from mamba2.serving.engine import Engine, Prefix, Request, RequestOutput
from mamba2.serving.sampling import SamplingParams

__all__ = ["Engine", "Prefix", "Request", "RequestOutput", "SamplingParams"]
