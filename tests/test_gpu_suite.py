"""benchmarks/gpu_suite.py (the suite on the GPU machine, one pytest process per file): its reading of pytest's
output and its handling of a file that runs out of time. Its real runs are on the device (docs/benchmarks.md)."""

import sys
from pathlib import Path

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
