"""Interoperability: load official mamba_ssm and transformers Mamba2 directories, export to both, convert.

``load(path)`` / ``from_pretrained(path)`` read any of the three formats (:data:`FORMATS`); ``save_pretrained``
writes any of them; ``add_convert_command`` adds ``mamba2 convert`` to the CLI.
"""

from mamba2.interop.convert import add_convert_command, cmd_convert, convert
from mamba2.interop.export import save_pretrained
from mamba2.interop.formats import FORMATS, detect_format
from mamba2.interop.loading import Pretrained, from_pretrained, load, load_dir_tokenizer

__all__ = ["FORMATS", "Pretrained", "add_convert_command", "cmd_convert", "convert", "detect_format",
           "from_pretrained", "load", "load_dir_tokenizer", "save_pretrained"]
