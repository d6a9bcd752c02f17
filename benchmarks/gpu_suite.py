"""The whole test suite on a GPU machine, one pytest process per test file, several files at once.

Every file runs with ``MAMBA2_TEST_DEVICE=cuda`` (``--device``; kernel tests compiled instead of interpreted) under
its own time
limit, so one slow or stuck file is named instead of eating the device call; lanes take the next file from one
queue, the files known to be slow first. Prints a table (file, passed, failed, skipped, errors, seconds, status)
and the failing test ids, writes the same as JSON (``--json``) and each file's pytest output into ``--logs``.
Exit status 1 when a file failed, errored or ran out of time. On SIGINT or SIGTERM the running files' process
groups are killed (SIGTERM, then SIGKILL), the interrupted files named, and the exit status is 130 or 143.
``--tests-dir`` runs the test files of another folder (default: this checkout's tests/).

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
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The slowest files on the H200 machine (2026-12-05), slowest first: the head of the queue.
SLOW_FIRST = ("test_cli.py", "test_triton_ssd.py", "test_fused_mixer.py", "test_kernel_policy.py", "test_server.py",
              "test_serving_engine.py", "test_experiments.py", "test_distributed.py", "test_training.py",
              "test_lora.py")
DEVICES = ("cuda", "cpu")   # the tests compare MAMBA2_TEST_DEVICE with "cuda": "cuda:1" would run them as on a CPU
GRACE_S = 2.0               # between the SIGTERM and the SIGKILL of a running file's process group on an interrupt

# the running pytest processes by file, for the interrupt handler; no file starts once _stopping is set
_lock = threading.Lock()
_live: dict[str, subprocess.Popen] = {}
_stopping = False


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the files ran."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    global _stopping
    if not _stopping:           # a second signal does not cut the killing short
        _stopping = True
        raise Interrupted(signum)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def stop_all(grace: float = GRACE_S) -> list[str]:
    """Start no more files and kill the process group of every running one: SIGTERM, then SIGKILL after at most
    ``grace`` seconds (for what ignored the SIGTERM). Returns the names of the files that were running."""
    global _stopping
    with _lock:
        _stopping = True
        live = dict(_live)
    for proc in live.values():
        _killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    # returncode is set by the lane's communicate() once pytest is gone and its pipes are closed
    while time.monotonic() < deadline and any(p.returncode is None for p in live.values()):
        time.sleep(0.05)
    for proc in live.values():
        _killpg(proc.pid, signal.SIGKILL)
    return sorted(live)


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


def reason(*outputs: str) -> str:
    """Why pytest stopped without a summary: the last line naming an error in the first output that has one
    (``ModuleNotFoundError: No module named 'xdist'``, ``pytest: error: unrecognized arguments: -n 4``), else the
    last line of the first output that is not empty."""
    for text in outputs:
        lines = [re.sub(r"^E\s+", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.search(r"error|exception", ln, flags=re.I)]
        if errors:
            return errors[-1][:200]
    return next((ln.strip()[:200] for text in outputs for ln in reversed(text.splitlines()) if ln.strip()), "")


def run_file(name: str, device: str, timeout: float, logs: Path | None, extra: tuple[str, ...] = (),
             tests: Path = ROOT / "tests") -> dict:
    env = {**os.environ, "MAMBA2_TEST_DEVICE": device}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE", str(tests / name),
           *extra]
    t0 = time.perf_counter()
    with _lock:
        if _stopping:
            return {"file": name, **{k: 0 for k in ("passed", "failed", "skipped", "errors")}, "failing": [],
                    "seconds": 0.0, "rc": None, "status": "not started"}
        # its own process group: on a timeout or an interrupt the processes the tests started (servers, CLI runs,
        # torchrun workers) go with pytest instead of holding the GPU while the next files run
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        _live[name] = proc
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        rc, status = proc.returncode, None
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        rc, status = None, f"timed out after {timeout:g} s"
    finally:
        with _lock:
            _live.pop(name, None)
    seconds = time.perf_counter() - t0
    if logs is not None:
        (logs / f"{name}.txt").write_text(stdout + stderr)
    counts = parse(stdout)
    found = counts.pop("summary")
    if status is None:      # pytest exits 5 when no test was collected or all were deselected: not a failure
        status = f"pytest exit {rc}" if rc not in (0, 5) else "ok" if found or rc == 5 else "no pytest summary"
        if status != "ok" and not found:       # pytest could not start or run (a missing module, a bad argument)
            status += f": {reason(stderr, stdout) or 'no output'}"
    return {"file": name, **counts, "seconds": round(seconds, 1), "rc": rc, "status": status}


def unwritable(folder: Path) -> str | None:
    """Why a file cannot be made in ``folder`` (tried, as permissions do not tell for root or /proc), or None."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as e:
        return e.strerror or str(e)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=3, help="test files run at once (default 3)")
    ap.add_argument("--file-timeout", type=float, default=420, help="seconds one file may take (default 420)")
    ap.add_argument("--files", nargs="*", help="test file names (default: every test_*.py of --tests-dir)")
    ap.add_argument("--tests-dir", type=Path, default=ROOT / "tests",
                    help="folder of the test files (default: this checkout's tests/)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--logs", type=Path, help="folder for each file's pytest output")
    ap.add_argument("--device", default="cuda", help="MAMBA2_TEST_DEVICE of the tests: cuda (default) or cpu")
    ap.add_argument("--pytest-args", default="", help='more pytest arguments for every file, e.g. "-n 4" '
                    "(pytest-xdist, where installed: one slow file over several processes)")
    args = ap.parse_args()
    if args.lanes < 1 or args.file_timeout <= 0:
        ap.error(f"--lanes must be >= 1 and --file-timeout > 0, got {args.lanes} and {args.file_timeout}")
    if args.device not in DEVICES:
        ap.error(f"--device must be one of {', '.join(DEVICES)} (the tests compare MAMBA2_TEST_DEVICE with 'cuda'; "
                 f"choose a GPU with CUDA_VISIBLE_DEVICES), got {args.device!r}")
    if args.files is not None and not args.files:
        ap.error("--files needs at least one test file name")
    tests = args.tests_dir.resolve()
    if not tests.is_dir():
        ap.error(f"--tests-dir {args.tests_dir} is not a folder")
    names = args.files or sorted(p.name for p in tests.glob("test_*.py"))
    if not names:
        ap.error(f"no test_*.py files in {args.tests_dir}")
    missing = [n for n in names if not (tests / n).is_file()]
    if missing:
        ap.error(f"no such test files in {args.tests_dir}: {', '.join(missing)}")
    try:
        extra = tuple(shlex.split(args.pytest_args))
    except ValueError as e:         # an unclosed quote
        ap.error(f"--pytest-args {args.pytest_args!r}: {e}")
    if args.json is not None:
        folder = args.json.parent
        if args.json.is_dir():
            ap.error(f"--json {args.json} is a folder, not a file")
        if not folder.is_dir():
            ap.error(f"--json {args.json}: no folder {folder}")
        why = unwritable(folder) or (None if os.access(args.json, os.W_OK) or not args.json.exists() else
                                     "a read-only file")
        if why:
            ap.error(f"--json {args.json}: cannot be written ({why})")
    if args.logs is not None:
        if args.logs.exists() and not args.logs.is_dir():
            ap.error(f"--logs {args.logs} is a file, not a folder")
        try:
            args.logs.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            ap.error(f"--logs {args.logs}: cannot make the folder: {e.strerror}")
        why = unwritable(args.logs)
        if why:
            ap.error(f"--logs {args.logs}: cannot be written ({why})")
    names.sort(key=lambda n: (SLOW_FIRST.index(n) if n in SLOW_FIRST else len(SLOW_FIRST), n))
    t0 = time.perf_counter()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    pool = ThreadPoolExecutor(args.lanes)
    try:
        results = list(pool.map(lambda n: run_file(n, args.device, args.file_timeout, args.logs, extra, tests),
                                names))
    except Interrupted as e:
        stopped = stop_all()
        print(f"interrupted by {e} after {time.perf_counter() - t0:.1f} s; killed the files still running: "
              f"{', '.join(stopped) or 'none'}", flush=True)
        return 128 + e.signum
    finally:
        # the lanes return once their pytest is gone (its log written); the files not started are dropped
        pool.shutdown(wait=True, cancel_futures=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
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
        name, version = args.device, None
        try:            # the tests' torch, for the record; the report is written without it
            import torch
            version = torch.__version__
            if args.device == "cuda" and torch.cuda.is_available():
                name = torch.cuda.get_device_name()
        except Exception as e:  # noqa: BLE001
            print(f"torch not read for --json ({type(e).__name__}: {e}): device recorded as {args.device!r}")
        try:
            args.json.write_text(json.dumps({"device": name, "torch": version, "wall_s": round(wall, 1),
                                             "total": total, "files": results}, indent=1))
        except OSError as e:
            print(f"--json {args.json} not written: {e}", file=sys.stderr)
            return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
