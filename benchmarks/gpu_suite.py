"""The whole test suite on a GPU machine, one pytest process per test file, several files at once.

Every file runs with ``MAMBA2_TEST_DEVICE=cuda`` (``--device``; kernel tests compiled instead of interpreted) under
its own time
limit, so one slow or stuck file is named instead of eating the device call; lanes take the next file from one
queue, the files known to be slow first. Prints a table (file, passed, failed, skipped, errors, seconds, status)
and the failing test ids, writes the same as JSON (``--json``) and each file's pytest output into ``--logs``.
Exit status 1 when a file failed, errored or ran out of time.

    source benchmarks/device_env.sh
    python benchmarks/gpu_suite.py --lanes 3 --file-timeout 420 --json $OUT/gpu_suite.json --logs $OUT/suite
    python benchmarks/gpu_suite.py --files test_cli.py --pytest-args "-n 4"     # one slow file, spread out
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The slowest files on the H200 machine (2026-12-05), slowest first: the head of the queue.
SLOW_FIRST = ("test_cli.py", "test_triton_ssd.py", "test_fused_mixer.py", "test_kernel_policy.py", "test_server.py",
              "test_serving_engine.py", "test_experiments.py", "test_distributed.py", "test_training.py",
              "test_lora.py")


def parse(output: str) -> dict:
    """Counts from pytest's last summary line in its stdout (``3 passed, 1 skipped in 2.0s``) and the failing
    ids (``-rfE``)."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors")}
    outcomes = r"passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?"
    lines = [ln for ln in output.splitlines() if re.search(rf"\b\d+ ({outcomes})\b.* in [\d.]+s", ln)]
    counts["summary"] = bool(lines)
    if lines:
        for num, word in re.findall(r"(\d+) (\w+)", lines[-1]):
            key = "errors" if word == "error" else word
            if key in counts:
                counts[key] += int(num)
    failing = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    return {**counts, "failing": failing}


def run_file(name: str, device: str, timeout: float, logs: Path | None, extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "MAMBA2_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE", f"tests/{name}",
           *extra]
    t0 = time.perf_counter()
    # its own process group: on a timeout the processes the tests started (servers, CLI runs, torchrun
    # workers) go with pytest instead of holding the GPU while the next files run
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc, status = proc.returncode, None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc, status = None, f"timed out after {timeout:g} s"
    seconds = time.perf_counter() - t0
    if logs is not None:
        (logs / f"{name}.txt").write_text(stdout + stderr)
    counts = parse(stdout)
    found = counts.pop("summary")
    if status is None:      # pytest exits 5 when no test was collected or all were deselected: not a failure
        status = f"pytest exit {rc}" if rc not in (0, 5) else "ok" if found or rc == 5 else "no pytest summary"
    return {"file": name, **counts, "seconds": round(seconds, 1), "rc": rc, "status": status}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=3, help="test files run at once (default 3)")
    ap.add_argument("--file-timeout", type=float, default=420, help="seconds one file may take (default 420)")
    ap.add_argument("--files", nargs="*", help="test file names (default: every tests/test_*.py)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--logs", type=Path, help="folder for each file's pytest output")
    ap.add_argument("--device", default="cuda", help="MAMBA2_TEST_DEVICE of the tests (default cuda)")
    ap.add_argument("--pytest-args", default="", help='more pytest arguments for every file, e.g. "-n 4" '
                    "(pytest-xdist, where installed: one slow file over several processes)")
    args = ap.parse_args()
    if args.lanes < 1 or args.file_timeout <= 0:
        ap.error(f"--lanes must be >= 1 and --file-timeout > 0, got {args.lanes} and {args.file_timeout}")
    names = args.files or sorted(p.name for p in (ROOT / "tests").glob("test_*.py"))
    missing = [n for n in names if not (ROOT / "tests" / n).is_file()]
    if missing:
        ap.error(f"no such test files in tests/: {', '.join(missing)}")
    extra = tuple(shlex.split(args.pytest_args))
    names.sort(key=lambda n: (SLOW_FIRST.index(n) if n in SLOW_FIRST else len(SLOW_FIRST), n))
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.lanes) as pool:
        results = list(pool.map(lambda n: run_file(n, args.device, args.file_timeout, args.logs, extra), names))
    wall = time.perf_counter() - t0
    header = ("file", "passed", "failed", "skipped", "errors", "s", "status")
    rows = [(r["file"], r["passed"], r["failed"], r["skipped"], r["errors"], r["seconds"], r["status"])
            for r in results]
    total = {k: sum(r[k] for r in results) for k in ("passed", "failed", "skipped", "errors")}
    rows.append(("total", *total.values(), round(wall, 1), ""))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for r in results:
        for test in r["failing"]:
            print(f"FAILED {test}")
    bad = [r for r in results if r["status"] != "ok" or r["failed"] or r["errors"]]
    if args.json is not None:
        import torch
        name = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else args.device
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "wall_s": round(wall, 1),
                                         "total": total, "files": results}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
