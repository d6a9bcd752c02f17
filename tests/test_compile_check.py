"""benchmarks/compile_check.py with tests/launch_recorder.py: launches recorded by an interpreted run compile here for
a Hopper target (sm_90) without a GPU, with registers and spills reported, and a kernel the interpreter runs but
the chip cannot hold (more shared memory than sm_90 has) is named as failed; a malformed or empty launches file, a
kernel that cannot be found and a bad --arch or --json are named (file and line) before anything compiles."""

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
sys.path.insert(0, str(ROOT / "benchmarks"))


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


SCALE = {"module": scale_kernel.fn.__module__, "name": "scale_kernel", "options": {"num_warps": 4}, "args": {
    "x_ptr": {"kind": "ptr", "dtype": "float32", "aligned": True}, "n": {"kind": "int", "value": 40},
    "factor": {"kind": "value", "value": 2.5}, "BLOCK": {"kind": "constexpr", "value": 16}}}
GOOD = json.dumps(SCALE).encode() + b"\n"


@pytest.mark.parametrize("content, args, message", [
    (b"", [], "no launches recorded in {file}: run the interpreted kernel tests with MAMBA2_RECORD_LAUNCHES={file}"),
    (b"\n \n", [], "no launches recorded in {file}"),
    (GOOD + GOOD[:40], [], "{file}:2: the last line is cut short"),
    (GOOD + b"{\"module\": \"caf\xe9\"}\n", [], "{file}:2: not UTF-8 (byte 0xe9 at column 16)"),
    (b"[1, 2]\n", [], "{file}:1: a JSON array instead of a launch record"),
    (b"{oops}\n" + GOOD, [], "{file}:1: not a JSON record"),
    (b'{"module": "m", "name": "k"}\n', [], "{file}:1: the launch record has no args, options"),
    (GOOD + json.dumps({**SCALE, "module": "no_such_module_here"}).encode() + b"\n", [],
     "{file}:2: cannot import module 'no_such_module_here' of kernel 'scale_kernel' (ModuleNotFoundError"),
    (GOOD + json.dumps({**SCALE, "name": "renamed_kernel"}).encode() + b"\n", [],
     f"{{file}}:2: module {SCALE['module']} has no kernel 'renamed_kernel'"),
    (json.dumps({**SCALE, "name": "record"}).encode() + b"\n", [], "{file}:1: "
     f"{SCALE['module']}.record is not a Triton kernel"),
    (GOOD, ["--arch", "0"], "--arch must be a CUDA SM architecture, compute capability × 10 (70, 72, "),
    (GOOD, ["--arch", "91"], "got 91"),
    (GOOD, ["--json", "{tmp}/missing/compile.json"], "--json {tmp}/missing/compile.json: no folder {tmp}/missing"),
], ids=["empty", "blank", "cut", "not-utf8", "array", "not-json", "fields", "no-module", "no-kernel", "not-a-kernel",
        "arch-0", "arch-91", "json-folder"])
def test_a_bad_launches_file_or_argument_is_named_before_any_compile(tmp_path, monkeypatch, capsys, content, args,
                                                                     message):
    import compile_check

    launches = tmp_path / "launches.jsonl"
    launches.write_bytes(content)

    def no_compile(*a, **k):
        raise AssertionError("compiled before the error")

    monkeypatch.setattr(triton, "compile", no_compile)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["compile_check.py", str(launches), *(a.replace("{tmp}", str(tmp_path))
                                                                          for a in args)])
    with pytest.raises(SystemExit) as e:
        compile_check.main()
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message.replace("{file}", str(launches)).replace("{tmp}", str(tmp_path)) in err, err
    assert len(err.strip().splitlines()[-1]) > 20 and "Traceback" not in err


@pytest.mark.parametrize("how, status", [("KeyboardInterrupt", 130), ("SIGTERM", 143)])
def test_an_interrupt_reports_and_writes_the_compiles_done_so_far(tmp_path, monkeypatch, capsys, how, status):
    """Ctrl-C (a KeyboardInterrupt inside Triton) or SIGTERM during the compiles: the table and the JSON of the
    launches compiled before it, marked interrupted, and exit status 130 / 143 instead of a traceback."""
    import os
    import signal
    import types

    import compile_check

    launches, report = tmp_path / "launches.jsonl", tmp_path / "compile.json"
    second = {**SCALE, "args": {**SCALE["args"], "BLOCK": {"kind": "constexpr", "value": 32}}}
    launches.write_bytes(GOOD + json.dumps(second).encode() + b"\n")
    calls = []

    def compile_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if how == "SIGTERM":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=0), asm={"cubin": b""})

    monkeypatch.setattr(triton, "compile", compile_then_stop)
    monkeypatch.setattr(compile_check, "resources", lambda cubin, folder: {"regs": 20, "local_bytes": 0})
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["compile_check.py", str(launches), "--json", str(report)])
    before = signal.getsignal(signal.SIGTERM)
    assert compile_check.main() == status
    out = capsys.readouterr().out
    name = "SIGINT" if how == "KeyboardInterrupt" else "SIGTERM"
    assert f"INTERRUPTED by {name}" in out and "1 distinct compiles of 2 recorded launches" in out, out
    got = json.loads(report.read_text())
    assert got["interrupted"] == name and [r["constexprs"]["BLOCK"] for r in got["results"]] == [16], got
    assert signal.getsignal(signal.SIGTERM) is before

    monkeypatch.setattr(sys, "argv", ["compile_check.py", str(tmp_path)])
    with pytest.raises(SystemExit):
        compile_check.main()
    assert f"{tmp_path} is a folder, not a launches file (JSON lines)" in capsys.readouterr().err


def test_a_stop_while_the_report_is_written_still_gives_its_exit_status(tmp_path, monkeypatch, capsys):
    """SIGTERM while the table is printed or the JSON written: the report is finished, then exit status 143."""
    import os
    import signal
    import types

    import compile_check

    launches, report = tmp_path / "launches.jsonl", tmp_path / "compile.json"
    launches.write_bytes(GOOD)
    monkeypatch.setattr(triton, "compile", lambda *a, **k: types.SimpleNamespace(
        metadata=types.SimpleNamespace(shared=0), asm={"cubin": b""}))
    monkeypatch.setattr(compile_check, "resources", lambda cubin, folder: {"regs": 20, "local_bytes": 0})
    write = compile_check.report

    def stopped_while_reporting(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(*args)

    monkeypatch.setattr(compile_check, "report", stopped_while_reporting)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["compile_check.py", str(launches), "--json", str(report)])
    assert compile_check.main() == 143
    assert "1 distinct compiles of 1 recorded launches" in capsys.readouterr().out
    assert len(json.loads(report.read_text())["results"]) == 1
