"""benchmarks/gpu_suite.py (the suite on the GPU machine, one pytest process per file): its reading of pytest's
output, its handling of a file that runs out of time, of a pytest that could not run, of bad arguments and of
SIGTERM (the running files' processes killed). Its real runs are on the device (docs/benchmarks.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_suite  # noqa: E402


def test_counts_come_from_the_last_summary_line_and_failures_are_named():
    out = ("tests/test_x.py ..F.s\n"
           "=========================== short test summary info ============================\n"
           "FAILED tests/test_x.py::test_b[1] - AssertionError: 3 passed is not a summary\n"
           "ERROR tests/test_x.py::test_c - RuntimeError\n"
           "=== 1 failed, 7 passed, 2 skipped, 1 error, 3 deselected in 4.21s ===\n")
    got = gpu_suite.parse(out)
    assert got == {"passed": 7, "failed": 1, "skipped": 2, "errors": 1, "summary": True,
                   "failing": ["tests/test_x.py::test_b[1]", "tests/test_x.py::test_c"]}
    assert gpu_suite.parse("collected 0 items\n")["summary"] is False


def test_a_file_past_its_time_limit_is_reported_as_such(tmp_path):
    res = gpu_suite.run_file("test_fsutil.py", "cpu", 0.5, tmp_path)
    assert res["status"] == "timed out after 0.5 s" and res["rc"] is None, res
    assert (tmp_path / "test_fsutil.py.txt").exists()


def test_a_pytest_that_could_not_run_says_why_and_the_report_does_without_torch(tmp_path, monkeypatch, capsys):
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    report = tmp_path / "suite.json"
    monkeypatch.setitem(sys.modules, "torch", None)         # import torch raises ImportError
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--tests-dir", str(tmp_path), "--device", "cpu", "--json",
                                      str(report), "--pytest-args=--no-such-option"])
    assert gpu_suite.main() == 1
    status = "pytest exit 4: python -m pytest: error: unrecognized arguments: --no-such-option"
    assert status in capsys.readouterr().out
    got = json.loads(report.read_text())
    assert got["torch"] is None and got["device"] == "cpu" and got["files"][0]["status"] == status, got
    assert gpu_suite.reason("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                            "ModuleNotFoundError: No module named 'xdist'\n", "") == \
        "ModuleNotFoundError: No module named 'xdist'"
    assert gpu_suite.reason("", "ImportError while loading conftest 'c.py'.\nc.py:1: in <module>\n    import torch\n"
                            "E   ModuleNotFoundError: No module named 'torch'\n") == \
        "ModuleNotFoundError: No module named 'torch'"


@pytest.mark.parametrize("args, message", [
    (["--files"], "--files needs at least one test file name"),
    (["--device", "cuda:1"], "--device must be one of cuda, cpu"),
    (["--device", "gpu"], "got 'gpu'"),
    (["--pytest-args", '-k "slow'], "--pytest-args '-k \"slow': No closing quotation"),
    (["--json", "{tmp}/missing/suite.json"], "--json {tmp}/missing/suite.json: no folder {tmp}/missing"),
    (["--json", "{tmp}"], "--json {tmp} is a folder, not a file"),
    (["--logs", "{tmp}/a_file"], "--logs {tmp}/a_file is a file, not a folder"),
    (["--logs", "{tmp}/a_file/logs"], "--logs {tmp}/a_file/logs: cannot make the folder"),
    (["--tests-dir", "{tmp}/none"], "--tests-dir {tmp}/none is not a folder"),
])
def test_bad_arguments_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(gpu_suite, "run_file", None)       # nothing may run
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    with pytest.raises(SystemExit) as e:
        gpu_suite.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err


def _gone(pid: int) -> bool:
    """The process has exited (a zombie that no init reaps counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def test_sigterm_kills_the_running_files_and_what_they_started(tmp_path):
    pids = tmp_path / "pids"
    (tmp_path / "test_sleeps.py").write_text(
        "import os, subprocess, sys, time\n"
        "def test_sleeps():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    with open({str(pids)!r} + '.tmp', 'w') as f:\n"
        "        f.write(f'{os.getpid()} {child.pid}')\n"
        f"    os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
        "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(Path(gpu_suite.__file__)), "--tests-dir", str(tmp_path), "--device",
                             "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while not pids.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no test started"
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "interrupted by SIGTERM" in out and "test_sleeps.py" in out and "Traceback" not in out, out
    pytest_pid, child_pid = map(int, pids.read_text().split())
    deadline = time.monotonic() + 3
    while not (_gone(pytest_pid) and _gone(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pytest_pid) and _gone(child_pid)
