"""benchmarks/gpu_suite.py (the suite on the GPU machine, one pytest process per file): its reading of pytest's
output, its handling of a file that runs out of time, of a pytest that could not run or ran no test, of bad
arguments (no CUDA for --device cuda among them) and of SIGTERM (the running files' processes killed, the finished
files kept in the table and the JSON). Its real runs are on the device (docs/benchmarks.md)."""

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


def test_a_log_that_cannot_be_written_is_a_status_and_a_bug_in_a_lane_kills_the_running_files(tmp_path,
                                                                                                  monkeypatch):
    class Done:
        pid, returncode = -1, 0

        def communicate(self, timeout=None):
            return "1 passed in 0.01s\n", ""

    monkeypatch.setattr(gpu_suite.subprocess, "Popen", lambda *a, **k: Done())
    res = gpu_suite.run_file("test_one.py", "cpu", 5, tmp_path / "gone", tests=tmp_path)
    assert res["status"] == "ok; log not written: No such file or directory" and res["passed"] == 1, res

    def bug(*args):
        raise RuntimeError("a bug")

    stopped = []
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    monkeypatch.setattr(gpu_suite, "run_file", bug)
    monkeypatch.setattr(gpu_suite, "stop_all", lambda: stopped.append(1) or [])
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--tests-dir", str(tmp_path), "--device", "cpu"])
    with pytest.raises(RuntimeError, match="a bug"):
        gpu_suite.main()
    assert stopped == [1]


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
    (["--pytest-args", "-x"], 'expected one argument (a value starting with "-" goes after "=": --pytest-args="-x")'),
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


def test_no_cuda_is_refused_up_front_and_a_suite_that_ran_nothing_is_not_green(tmp_path, monkeypatch, capsys):
    """--device cuda (the default) where torch sees no GPU, or cannot be imported, is refused before anything runs
    (instead of every test failing "Torch not compiled with CUDA enabled"); a file named twice runs once; a -k that
    matches nothing is "no tests ran" and exit status 1."""
    import torch

    monkeypatch.setattr(gpu_suite, "run_file", None)       # nothing may run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for modules, message in (({}, "CUDA is not available here: use --device cpu"),
                             ({"torch": None}, "--device cuda: torch cannot be imported here (ModuleNotFoundError")):
        with monkeypatch.context() as m:
            for name, module in modules.items():
                m.setitem(sys.modules, name, module)
            m.setattr(sys, "argv", ["gpu_suite.py", "--files", "test_fsutil.py"])
            with pytest.raises(SystemExit) as e:
                gpu_suite.main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
    monkeypatch.undo()

    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    report = tmp_path / "suite.json"
    # (-p no:hypothesispytest: the plugin's import, a second of each pytest start here, spared)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--tests-dir", str(tmp_path), "--device", "cpu", "--files",
                                      "test_one.py", "test_one.py", "--json", str(report),
                                      "--pytest-args=-k nothing_matches -p no:hypothesispytest"])
    assert gpu_suite.main() == 1
    said = capsys.readouterr()
    assert "named more than once, run once: test_one.py" in said.err and "no tests ran" in said.out, said
    got = json.loads(report.read_text())
    assert [f["status"] for f in got["files"]] == ["no tests ran"] and got["complete"], got


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
    """SIGTERM while a file runs: its process group is killed, and the table and the JSON (written as each file
    finishes) keep the file that finished before, with the killed one as "interrupted"."""
    pids, report = tmp_path / "pids", tmp_path / "suite.json"
    (tmp_path / "test_quick.py").write_text("def test_quick():\n    pass\n")
    (tmp_path / "test_sleeps.py").write_text(
        "import os, subprocess, sys, time\n"
        "def test_sleeps():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"    with open({str(pids)!r} + '.tmp', 'w') as f:\n"
        "        f.write(f'{os.getpid()} {child.pid}')\n"
        f"    os.replace({str(pids)!r} + '.tmp', {str(pids)!r})\n"
        "    time.sleep(60)\n")
    # torch kept out of the suite's own process (the report does without it) and the hypothesis plugin out of
    # pytest's: a second less each to start
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {str(Path(gpu_suite.__file__).parent)!r})\n"
            "import gpu_suite; sys.exit(gpu_suite.main())")
    proc = subprocess.Popen([sys.executable, "-c", code, "--tests-dir", str(tmp_path), "--device", "cpu", "--lanes",
                             "2", "--json", str(report), "--pytest-args=-p no:hypothesispytest"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def written() -> list[str]:
        try:
            return [f["file"] for f in json.loads(report.read_text())["files"]]
        except (OSError, ValueError):
            return []

    try:
        deadline = time.monotonic() + 20
        while not (pids.exists() and written()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pids.exists(), proc.communicate(timeout=5)[0] if proc.poll() is not None else "no test started"
        assert written() == ["test_quick.py"]           # the finished file is in the JSON already
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out
    assert "interrupted by SIGTERM" in out and "Traceback" not in out, out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("test_")}
    assert rows["test_quick.py"][1] == "1" and rows["test_quick.py"][-1] == "ok", out
    assert rows["test_sleeps.py"][-1] == "interrupted", out
    got = json.loads(report.read_text())
    assert got["interrupted"] == "SIGTERM" and not got["complete"], got
    assert {f["file"]: f["status"] for f in got["files"]} == {"test_quick.py": "ok", "test_sleeps.py": "interrupted"}
    pytest_pid, child_pid = map(int, pids.read_text().split())
    deadline = time.monotonic() + 3
    while not (_gone(pytest_pid) and _gone(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pytest_pid) and _gone(child_pid)
