"""What a training step keeps for the backward, per token and layer, and who keeps it (issue 11's memory budget).

    TRITON_INTERPRET=1 python benchmarks/saved_activations.py --shape 130m --seq-len 1024    # CPU, interpreted
    python benchmarks/saved_activations.py --shape 130m --device cuda                          # the same on a GPU

Runs one forward of a one-layer model of the shape's widths under bf16 autocast with the kernels on (the same
autograd Functions as on a GPU: what they save does not depend on the device) and records every tensor autograd
saves, by the line of mamba2 that saved it, counting each storage once (a view of a saved buffer costs nothing
more). Prints bytes per token for the block (embedding and head excluded; weights' bf16 copies listed apart) and
writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mamba2 import kernels  # noqa: E402
from mamba2.config import Mamba2Config  # noqa: E402
from mamba2.models import Mamba2LM  # noqa: E402


def saved_per_token(shape: str, seq_len: int, device: str) -> list[dict]:
    config = Mamba2Config.preset(shape, n_layer=1, vocab_size=256)
    model = Mamba2LM(config).to(device)
    ids = torch.randint(0, 256, (1, seq_len + 1), device=device)
    rows, seen = [], set()
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        frames = [f for f in traceback.extract_stack()[:-1] if "/mamba2/" in f.filename]
        where = f"{frames[-1].filename.split('/mamba2/')[-1]}:{frames[-1].lineno}" if frames else "?"
        per_token = tuple(t.shape) not in weight_shapes      # activations grow with the tokens; weights do not
        rows.append({"where": where, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                     "bytes_per_token": storage.nbytes() / seq_len if per_token else 0.0,
                     "weight_bytes": 0 if per_token else storage.nbytes(),
                     "new": storage.data_ptr() not in seen})
        seen.add(storage.data_ptr())
        return t

    with kernels.kernels("on"), torch.autocast(torch.device(device).type, dtype=torch.bfloat16), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = model.backbone.embedding(ids[:, :-1])
        model.backbone.layers[0](h.float())          # the block alone: residual in fp32, as in the model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="130m", help="a preset whose widths are used (one layer)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = saved_per_token(args.shape, args.seq_len, args.device)
    print(f"{'B/token':>8}  {'where':34} {'shape':28} dtype")
    for r in rows:
        if r["new"] and r["bytes_per_token"]:
            print(f"{r['bytes_per_token']:8.0f}  {r['where']:34} {str(tuple(r['shape'])):28} {r['dtype']}")
    total = sum(r["bytes_per_token"] for r in rows if r["new"])
    weights = sum(r["weight_bytes"] for r in rows if r["new"])
    print(f"total {total:,.0f} bytes per token per layer (+ {weights / 2**20:.1f} MiB of weight copies per layer)")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "seq_len": args.seq_len, "rows": rows,
                                              "bytes_per_token": total}, indent=1))


if __name__ == "__main__":
    main()
