"""The whole test suite on a GPU machine, one pytest process per test file, several files at once.

Every file runs with ``MAMBA2_TEST_DEVICE=cuda`` (``--device``; kernel tests compiled instead of interpreted) under
its own time limit, so one slow or stuck file is named instead of eating the device call; lanes take the next file
from one queue, the files known to be slow first. Prints a table (file, passed, failed, skipped, errors, seconds,
status) and the failing test ids, writes the same as JSON (``--json``) and each file's pytest output into
``--logs``. The JSON is rewritten (whole, atomically) each time a file finishes, so even a SIGKILL keeps the files
finished before it. Exit status 1 when a file failed, errored, ran out of time or its log could not be written, or
when no file ran a test (a ``-k`` matching nothing; a file that ran none is "no tests ran"). On SIGINT or SIGTERM
the running files' process groups are killed (SIGTERM, then SIGKILL), the table and JSON hold the finished files
and the interrupted ones (status "interrupted"; the JSON's "interrupted" names the signal), and the exit status is
130 or 143.
``--tests-dir`` runs the test files of another folder (default: this checkout's tests/). Without a GPU:
``--device cpu``.

    source benchmarks/device_env.sh
    python benchmarks/gpu_suite.py --lanes 3 --file-timeout 420 --json $OUT/gpu_suite.json --logs $OUT/suite
    python benchmarks/gpu_suite.py --files test_cli.py --pytest-args="-n 4"     # one slow file, spread out
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.script_args import check_output_file, unwritable, write_json  # noqa: E402

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
_received: list[int] = []   # every SIGINT/SIGTERM that came while the handlers were set


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while the files ran."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    global _stopping
    _received.append(signum)
    if not _stopping:           # a second signal (or one while the report is written) cuts nothing short
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
    log_failed = None
    if logs is not None:
        try:
            (logs / f"{name}.txt").write_text(stdout + stderr)
        except OSError as e:    # a full disk: this file's result still counts, and the other lanes go on
            log_failed = f"log not written: {e.strerror or e}"
    counts = parse(stdout)
    found = counts.pop("summary")
    if status is None:      # pytest exits 5 when no test was collected or all were deselected: nothing was tested
        status = ("no tests ran" if rc == 5 else f"pytest exit {rc}" if rc != 0 else "ok" if found else
                  "no pytest summary")
        if status not in ("ok", "no tests ran") and not found:   # pytest could not start (a missing module, ...)
            status += f": {reason(stderr, stdout) or 'no output'}"
    if log_failed:
        status += f"; {log_failed}"
    return {"file": name, **counts, "seconds": round(seconds, 1), "rc": rc, "status": status}


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if "--pytest-args: expected one argument" in message:     # argparse takes "-x" for an option of its own
            message += ' (a value starting with "-" goes after "=": --pytest-args="-x")'
        super().error(message)


def _torch_for(ap: argparse.ArgumentParser, device: str, report: bool) -> tuple[str, str | None]:
    """(device name, torch version) for the report, read before any file runs; refuses --device cuda where torch
    cannot be imported or sees no GPU (every test would fail with "Torch not compiled with CUDA enabled")."""
    if device != "cuda" and not report:
        return device, None
    try:
        import torch
    except Exception as e:  # noqa: BLE001  (ImportError, or a broken install)
        if device == "cuda":
            ap.error(f"--device cuda: torch cannot be imported here ({type(e).__name__}: {e}), and the tests need it")
        print(f"torch not read for --json ({type(e).__name__}: {e}): device recorded as {device!r}")
        return device, None
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("CUDA is not available here: use --device cpu")
    name = device
    if device == "cuda" and report:
        # in a child process: a CUDA context here would hold GPU memory while the tests run
        try:
            name = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                                  capture_output=True, text=True, timeout=120).stdout.strip() or device
        except (OSError, subprocess.SubprocessError):
            pass
    return name, torch.__version__


def main() -> int:
    global _stopping
    ap = _Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=3, help="test files run at once (default 3)")
    ap.add_argument("--file-timeout", type=float, default=420, help="seconds one file may take (default 420)")
    ap.add_argument("--files", nargs="*", help="test file names (default: every test_*.py of --tests-dir); one "
                    "named twice runs once")
    ap.add_argument("--tests-dir", type=Path, default=ROOT / "tests",
                    help="folder of the test files (default: this checkout's tests/)")
    ap.add_argument("--json", type=Path, help="write the results here (rewritten as each file finishes)")
    ap.add_argument("--logs", type=Path, help="folder for each file's pytest output")
    ap.add_argument("--device", default="cuda", help="MAMBA2_TEST_DEVICE of the tests: cuda (default; needs a GPU "
                    "torch sees) or cpu")
    ap.add_argument("--pytest-args", default="", help='more pytest arguments for every file, given after "=": '
                    '--pytest-args="-x", --pytest-args="-n 4" (pytest-xdist, where installed: one slow file over '
                    'several processes)')
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
    names = list(dict.fromkeys(args.files)) if args.files else sorted(p.name for p in tests.glob("test_*.py"))
    if args.files and len(names) < len(args.files):
        twice = sorted({n for n in args.files if args.files.count(n) > 1})
        print(f"named more than once, run once: {', '.join(twice)}", file=sys.stderr)
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
        check_output_file(ap, "--json", args.json)
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
    device_name, version = _torch_for(ap, args.device, args.json is not None)
    t0 = time.perf_counter()
    finished: dict[str, dict] = {}
    json_failed: list[str] = []

    def save(interrupted: str | None = None, final: bool = False) -> None:
        """The report of the files finished so far, in queue order (each call rewrites it whole)."""
        if args.json is None or json_failed:
            return
        results = [finished[n] for n in names if n in finished]
        total = {k: sum(r[k] for r in results) for k in ("passed", "failed", "skipped", "errors")}
        why = write_json(args.json, {
            "device": device_name, "torch": version, "wall_s": round(time.perf_counter() - t0, 1), "total": total,
            "interrupted": interrupted, "complete": final and interrupted is None,
            "not_finished": [n for n in names if n not in finished], "files": results})
        if why:
            json_failed.append(why)
            print(f"--json {args.json} not written: {why}", file=sys.stderr)

    _received.clear()
    _stopping = False
    pool = ThreadPoolExecutor(args.lanes)
    futures: list = []
    interrupted: Interrupted | None = None
    stopped: list[str] = []
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:        # the handlers stay until the report is written: a later signal is recorded, and cuts nothing short
        try:
            save()
            for n in names:
                futures.append(pool.submit(run_file, n, args.device, args.file_timeout, args.logs, extra, tests))
            for future in as_completed(futures):
                result = future.result()
                finished[result["file"]] = result
                save()
            _stopping = True            # all done: a signal from here on is acted on after the report
        except Interrupted as e:
            interrupted = e
            stopped = stop_all()
            print(f"interrupted by {e} after {time.perf_counter() - t0:.1f} s; killed the files still running: "
                  f"{', '.join(stopped) or 'none'}", flush=True)
        except BaseException:
            stop_all()                  # a bug: the running files are killed, not waited on, before it is raised
            raise
        finally:
            # the lanes return once their pytest is gone (its log written); the files not started are dropped
            pool.shutdown(wait=True, cancel_futures=True)
        for future in futures:          # what finished while the signal was handled, and the killed files
            if future.done() and not future.cancelled() and future.exception() is None:
                result = future.result()
                if result["status"] == "not started":
                    continue
                if result["file"] in stopped:
                    result = {**result, "status": "interrupted"}
                finished[result["file"]] = result
        results = [finished[n] for n in names if n in finished]
        save(interrupted=str(interrupted) if interrupted else None, final=True)
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
        if interrupted is not None:
            left = [n for n in names if n not in finished]
            if left:
                print(f"not started: {', '.join(left)}")
        sys.stdout.flush()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # a file that ran no test (-k matching none of its tests) is no failure, a suite that ran none at all is
    bad = [r for r in results if r["status"] not in ("ok", "no tests ran") or r["failed"] or r["errors"]]
    nothing = all(r["status"] == "no tests ran" for r in results)
    if _received:
        return 128 + _received[0]
    return 1 if bad or nothing or json_failed else 0


if __name__ == "__main__":
    sys.exit(main())
