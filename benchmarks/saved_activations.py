"""What a training step keeps for the backward, per token and layer, and who keeps it (issue 11's memory budget).

    TRITON_INTERPRET=1 python benchmarks/saved_activations.py --shape 130m --seq-len 1024    # CPU, interpreted
    python benchmarks/saved_activations.py --shape 130m --device cuda                          # the same on a GPU

Runs one forward of a one-layer model of the shape's widths under bf16 autocast with the kernels on (the same
autograd Functions as on a GPU: what they save does not depend on the device) and records every tensor autograd
saves, by the line of mamba2 that saved it, counting each storage once (a view of a saved buffer costs nothing
more). The variants of the mixer's training path (mamba2/layers/triton/mixer.py, its "keep" tuning): the fused
Function recomputing y (the default), keeping y, keeping y and the SSD's chunk states, and the per-op path (each op
its own autograd Function). Prints bytes per token for the block (embedding and head excluded; weights' bf16 copies
listed apart) of each, and writes JSON with --out. A tensor counts as a weight copy when its shape is a parameter's
(or transposed), so --seq-len must not equal a weight dimension (refused).
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
from mamba2.layers.triton import mixer as fused_mixer  # noqa: E402
from mamba2.models import Mamba2LM  # noqa: E402

VARIANTS = {"fused, y recomputed": dict(FUSED=True, Y=False, STATES=False),
            "fused, y kept": dict(FUSED=True, Y=True, STATES=False),
            "fused, y, chunk states and C·Bᵀ kept": dict(FUSED=True, Y=True, STATES=True),
            "per-op": dict(FUSED=False)}


def saved_per_token(shape: str, seq_len: int, device: str, keep: dict) -> list[dict]:
    config = Mamba2Config.preset(shape, n_layer=1, vocab_size=256)
    model = Mamba2LM(config).to(device)
    if seq_len in {d for p in model.parameters() for d in p.shape}:
        raise SystemExit(f"--seq-len {seq_len} equals a weight dimension of {shape}: activations of that length "
                         f"would be taken for weight copies; pick another length")
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

    with kernels.kernels("on"), fused_mixer.TUNING.tuned(keep=keep), \
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16), \
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
    results = {}
    for name, keep in VARIANTS.items():
        rows = saved_per_token(args.shape, args.seq_len, args.device, keep)
        total = sum(r["bytes_per_token"] for r in rows if r["new"])
        weights = sum(r["weight_bytes"] for r in rows if r["new"])
        results[name] = {"keep": keep, "rows": rows, "bytes_per_token": total}
        print(f"\n{name}\n{'B/token':>8}  {'where':34} {'shape':28} dtype")
        for r in rows:
            if r["new"] and r["bytes_per_token"]:
                print(f"{r['bytes_per_token']:8.0f}  {r['where']:34} {str(tuple(r['shape'])):28} {r['dtype']}")
        print(f"total {total:,.0f} bytes per token per layer (+ {weights / 2**20:.1f} MiB of weight copies per layer)")
    print("\n| mixer training path | B/token per layer |\n|---|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['bytes_per_token']:,.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"shape": args.shape, "seq_len": args.seq_len, "variants": results},
                                             indent=1))


if __name__ == "__main__":
    main()
