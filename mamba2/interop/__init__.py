"""Interoperability: load official mamba_ssm and transformers Mamba2 directories, export to both, convert.

``load(path)`` / ``from_pretrained(path)`` read any of the three formats (:data:`FORMATS`); ``save_pretrained``
writes any of them; ``add_convert_command`` adds ``mamba2 convert`` to the CLI. The names load on first use
(:mod:`mamba2.lazy`): building the CLI's parser does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mamba2.lazy import make_lazy

__all__ = ["FORMATS", "Pretrained", "add_convert_command", "cmd_convert", "convert", "detect_format",
           "from_pretrained", "load", "load_dir_tokenizer", "save_pretrained"]

if TYPE_CHECKING:
    from mamba2.interop.convert import add_convert_command, cmd_convert, convert
    from mamba2.interop.export import save_pretrained
    from mamba2.interop.formats import FORMATS, detect_format
    from mamba2.interop.loading import Pretrained, from_pretrained, load, load_dir_tokenizer

make_lazy(__name__, {"add_convert_command": "mamba2.interop.convert", "cmd_convert": "mamba2.interop.convert",
                     "convert": "mamba2.interop.convert", "save_pretrained": "mamba2.interop.export",
                     "FORMATS": "mamba2.interop.formats", "detect_format": "mamba2.interop.formats",
                     "Pretrained": "mamba2.interop.loading", "from_pretrained": "mamba2.interop.loading",
                     "load": "mamba2.interop.loading", "load_dir_tokenizer": "mamba2.interop.loading"})
