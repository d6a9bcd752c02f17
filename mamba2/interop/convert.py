"""``mamba2 convert SRC DST --to {mamba2,official,hf}``: any supported directory format to any other."""

from __future__ import annotations

import argparse
from pathlib import Path

from mamba2.errors import UserError
from mamba2.interop.formats import DTYPE_NAMES, FORMATS

EPILOG = """\
examples:
  mamba2 convert state-spaces-mamba2-130m/ runs/m130 --to mamba2 --tokenizer 20B_tokenizer.json
  mamba2 convert runs/demo exported-hf/ --to hf        # loads with transformers' Mamba2ForCausalLM
  mamba2 convert hf-dir/ official-dir/ --to official   # config.json + pytorch_model.bin for mamba_ssm

SRC may be in any of the three formats (detected from its config.json). Weights are read from
model.safetensors (preferred) or pytorch_model.bin (torch.load with weights_only=True), or their sharded
.index.json forms; nothing else is unpickled. The tokenizer of SRC (tokenizer_spec.json or tokenizer.json)
is kept unless --tokenizer replaces it.
"""


def convert(src: str | Path, dst: str | Path, to: str, *, tokenizer: str | None = None, dtype: str | None = None,
            weights: str | None = None, overwrite: bool = False) -> Path:
    """Load ``src`` (any format) and write it to ``dst`` in format ``to``; returns ``dst``.

    ``tokenizer``: ``"bytes"`` or a ``tokenizer.json`` path replacing SRC's own. ``dtype``: float32, bfloat16 or
    float16 for the stored weights (default: float32). Raises UserError for anything wrong, naming it.
    """
    if to not in FORMATS:
        raise UserError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    from mamba2.interop.export import _DTYPES, save_pretrained
    from mamba2.interop.loading import load
    from mamba2.tokenizer import load_tokenizer

    if dtype is not None and dtype not in DTYPE_NAMES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
    src_dir, dst_dir = Path(src).resolve(), Path(dst).resolve()
    if src_dir == dst_dir:
        raise UserError("SRC and DST are the same directory")
    if src_dir in dst_dir.parents or dst_dir in src_dir.parents:
        raise UserError(f"DST {dst} and SRC {src} are nested one inside the other: a model directory holds one model "
                        f"only (write DST beside SRC)")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None
    target_dtype = _DTYPES[dtype or "float32"]
    loaded = load(src, dtype=target_dtype, tokenizer=tok)
    return save_pretrained(loaded.model, dst, format=to, tokenizer=loaded.tokenizer, weights=weights,
                           overwrite=overwrite)


def add_convert_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an ``argparse`` subparsers object; it calls :func:`cmd_convert`."""
    p = subparsers.add_parser("convert", help="convert a model directory between formats (ours, official, hf)",
                              description="Convert a Mamba-2 model directory between our checkpoint format, the "
                                          "official mamba_ssm format and the transformers Mamba2 format.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="model directory to read (format detected from its config.json)")
    p.add_argument("dst", help="directory to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--to", required=True, choices=FORMATS, help="format to write")
    p.add_argument("--tokenizer", help="'bytes' or a tokenizer.json to store with the model (default: SRC's own; "
                                       "required for --to mamba2 when SRC has none)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="dtype of the written weights (default: float32)")
    p.add_argument("--weights", choices=("bin", "safetensors"),
                   help="official format only: pytorch_model.bin (default, what mamba_ssm reads) or model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory at DST")
    p.set_defaults(func=cmd_convert)
    return p


def cmd_convert(args: argparse.Namespace) -> int:
    """Handler of ``mamba2 convert``; raises UserError (the CLI prints it as one line, exit status 2)."""
    from mamba2.interop.loading import load

    out = convert(args.src, args.dst, args.to, tokenizer=args.tokenizer, dtype=args.dtype, weights=args.weights,
                  overwrite=args.overwrite)
    loaded = load(out)
    print(f"wrote {out} ({args.to} format): {loaded.model.num_parameters():,} parameters, "
          f"tokenizer: {type(loaded.tokenizer).__name__ if loaded.tokenizer is not None else 'none'}")
    return 0

