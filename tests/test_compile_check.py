"""benchmarks/compile_check.py with tests/launch_recorder.py: launches recorded by an interpreted run compile here for
a Hopper target (sm_90) without a GPU, with registers and spills reported, and a kernel the interpreter runs but
the chip cannot hold (more shared memory than sm_90 has) is named as failed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from conftest import child_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


@triton.jit
def scale_kernel(x_ptr, n, factor, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * factor, mask=offs < n)


@triton.jit
def wide_dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BK: tl.constexpr):
    om, ok, on = tl.arange(0, BM), tl.arange(0, BK), tl.arange(0, 16)
    acc = tl.zeros((BM, 16), dtype=tl.float32)
    for _ in range(2):              # a loop: its loads are pipelined through shared memory
        a = tl.load(a_ptr + om[:, None] * BK + ok[None, :])
        b = tl.load(b_ptr + ok[:, None] * 16 + on[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + om[:, None] * 16 + on[None, :], acc)


def record() -> None:
    """Run under TRITON_INTERPRET=1 with MAMBA2_RECORD_LAUNCHES set (conftest installs the recorder)."""
    import torch

    x = torch.arange(40, dtype=torch.float32)
    scale_kernel[(3,)](x, 40, 2.5, BLOCK=16)
    assert torch.equal(x, torch.arange(40, dtype=torch.float32) * 2.5)
    a, b = torch.randn(64, 2048).half(), torch.randn(2048, 16).half()
    c = torch.empty(64, 16)
    wide_dot_kernel[(1,)](a, b, c, BM=64, BK=2048, num_stages=3)       # 64 × 2048 fp16 per stage: 256 KB
    assert torch.allclose(c, 2 * (a.float() @ b.float()), rtol=1e-2, atol=1e-1)


def test_recorded_launches_compile_for_hopper_and_an_oversized_one_is_named(tmp_path):
    launches, report = tmp_path / "launches.jsonl", tmp_path / "compile.json"
    path = f"{TESTS}:{ROOT}"
    code = "import conftest, test_compile_check as m; m.record()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env=child_env(TRITON_INTERPRET="1", MAMBA2_RECORD_LAUNCHES=str(launches), PYTHONPATH=path))
    assert len(launches.read_text().splitlines()) == 2
    env = child_env(PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_check.py"), str(launches), "--json",
                           str(report)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    results = {r["kernel"].rsplit(".", 1)[1]: r for r in json.loads(report.read_text())["results"]}
    assert results["scale_kernel"]["ok"] and results["scale_kernel"]["regs"] > 0, results
    assert results["scale_kernel"]["local_bytes"] == 0
    bad = results["wide_dot_kernel"]
    assert not bad["ok"] and "bytes of shared memory, the target has 232448" in bad["error"], bad
    assert "FAILED test_compile_check.wide_dot_kernel" in proc.stdout
