"""Serving under load: a real ``mamba2 serve`` process and many concurrent streaming clients with Poisson arrivals.

A model of the given shape with random weights (and the byte tokenizer) is written to a temporary directory and
served. For each arrival rate, ``--requests`` requests arrive with exponential gaps (mean 1 / rate), each with a
random prompt of ``--prompt`` ± 50% random bytes and ``--max-tokens`` ± 50% new tokens (greedy, no stop), streamed
over HTTP (``httpx``). Per rate: output tokens/s over the whole run, requests/s, and the p50/p99 of time to first
token (TTFT), time per output token after the first (TPOT) and end-to-end latency. Nothing to compare with on the
official side: mamba_ssm has no server.

    python benchmarks/serving.py --shape 130m --rates 4 16 64 --requests 200 --max-batch 64 --out $OUT/serving.json
    python benchmarks/serving.py --shape tiny --device cpu --rates 2 --requests 16   # a dry run on a laptop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from mamba2 import Mamba2Config, Mamba2LM
from mamba2.interop import save_pretrained
from mamba2.tokenizer import ByteTokenizer

SHAPES = {"tiny": dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16)}


def write_model(shape: str, directory: Path) -> Path:
    torch.manual_seed(0)
    cfg = Mamba2Config(**SHAPES[shape]) if shape in SHAPES else Mamba2Config.preset(shape)
    return save_pretrained(Mamba2LM(cfg), directory / shape, tokenizer=ByteTokenizer())


def start_server(model_dir: Path, a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "mamba2", "serve", "--checkpoint", str(model_dir), "--port", "0",
           "--device", a.device, "--dtype", a.dtype, "--max-batch", str(a.max_batch),
           "--max-len", str(2 * (a.prompt + a.max_tokens)), "--max-queue", str(4 * a.requests)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    for line in proc.stdout:
        print("server:", line.rstrip(), flush=True)
        m = re.search(r"http://[\w.]+:\d+", line)
        if m:
            return proc, m.group(0)
        if time.time() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not print its address")


async def one_request(client: httpx.AsyncClient, url: str, delay: float, prompt: str, max_tokens: int) -> dict:
    await asyncio.sleep(delay)
    t0 = time.perf_counter()
    first, chunks, text = None, 0, ""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code, "body": (await r.aread()).decode()[:200]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - t0
            chunks += 1
            text += piece
    total = time.perf_counter() - t0
    return {"ttft": first if first is not None else total, "latency": total, "tokens": max_tokens,
            "chars": len(text)}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def load(url: str, rate: float, a: argparse.Namespace, rng: random.Random) -> dict:
    t, jobs = 0.0, []
    limits = httpx.Limits(max_connections=a.requests, max_keepalive_connections=a.requests)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        for _ in range(a.requests):
            t += rng.expovariate(rate)
            n_prompt = max(1, int(a.prompt * rng.uniform(0.5, 1.5)))
            prompt = "".join(chr(rng.randrange(32, 127)) for _ in range(n_prompt))
            n_new = max(2, int(a.max_tokens * rng.uniform(0.5, 1.5)))
            jobs.append(one_request(client, url, t, prompt, n_new))
        start = time.perf_counter()
        results = await asyncio.gather(*jobs)
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in ok]
    return {"rate": rate, "requests": a.requests, "completed": len(ok), "errors": len(results) - len(ok),
            "wall_s": wall, "out_tok_s": sum(r["tokens"] for r in ok) / wall, "req_s": len(ok) / wall,
            "ttft_p50_ms": 1e3 * pct([r["ttft"] for r in ok], 0.5), "ttft_p99_ms": 1e3 * pct([r["ttft"] for r in ok], 0.99),
            "tpot_p50_ms": 1e3 * pct(tpot, 0.5), "tpot_p99_ms": 1e3 * pct(tpot, 0.99),
            "latency_p50_ms": 1e3 * pct([r["latency"] for r in ok], 0.5),
            "latency_p99_ms": 1e3 * pct([r["latency"] for r in ok], 0.99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="130m", help="a preset (130m … 2.7b) or 'tiny'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 16, 64], help="arrivals per second")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompt", type=int, default=64, help="mean prompt length in bytes (= tokens)")
    ap.add_argument("--max-tokens", type=int, default=128, help="mean new tokens per request")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(write_model(a.shape, Path(tmp)), a)
        try:
            asyncio.run(load(url, a.rates[0], argparse.Namespace(**{**vars(a), "requests": min(8, a.requests)}),
                             rng))                                                         # warm-up: graphs
            for rate in a.rates:
                row = asyncio.run(load(url, rate, a, rng))
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(f"\nserving {a.shape} ({a.dtype}, {a.device}, max batch {a.max_batch}): {a.requests} streamed requests "
          f"per rate, prompt ~{a.prompt}, new ~{a.max_tokens}, greedy")
    print(f"{'rate/s':>7} {'done':>5} {'out tok/s':>10} {'req/s':>6} | {'TTFT p50':>9} {'p99':>8} | "
          f"{'TPOT p50':>9} {'p99':>7} | {'latency p50':>11} {'p99':>8}  (ms)")
    for r in rows:
        print(f"{r['rate']:>7.1f} {r['completed']:>5} {r['out_tok_s']:>10.0f} {r['req_s']:>6.1f} | "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} | {r['tpot_p50_ms']:>9.2f} {r['tpot_p99_ms']:>7.2f} | "
              f"{r['latency_p50_ms']:>11.1f} {r['latency_p99_ms']:>8.1f}")
    if a.out:
        info = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "args": vars(a), "rows": rows}
        Path(a.out).write_text(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
