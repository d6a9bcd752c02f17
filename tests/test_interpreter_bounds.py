"""The interpreter's bounds check (tests/interpreter_bounds.py), which every interpreted kernel run of the suite
has through conftest: an access past a tensor argument fails the kernel; masked-off lanes, views into a larger
storage and atomics inside bounds pass."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import sys
sys.path.insert(0, "tests")
import conftest  # noqa: F401  (installs the check under TRITON_INTERPRET=1)
import torch
import triton
import triton.language as tl

@triton.jit
def add_one(x_ptr, n, extra, B: tl.constexpr):
    offs = tl.arange(0, B)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n + extra)

@triton.jit
def count(x_ptr, n, B: tl.constexpr):
    offs = tl.arange(0, B)
    tl.atomic_add(x_ptr + offs % 2, 1.0, mask=offs < n)

def outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as e:
        return "caught" if "outside every tensor argument" in repr(e) else "other: " + repr(e)[:300]

base = torch.zeros(12)
view = base[2:10]                                  # a view: the rest of its storage is in bounds too
print(outcome(lambda: add_one[(1,)](torch.zeros(8), 8, 0, B=16)))     # masked lanes past the end: fine
print(outcome(lambda: add_one[(1,)](torch.zeros(8), 8, 1, B=16)))     # one store past the end
print(outcome(lambda: add_one[(1,)](view, 10, 0, B=16)))              # past the view, inside its storage
print(outcome(lambda: count[(1,)](torch.zeros(2), 8, B=8)))           # atomics inside
print(outcome(lambda: count[(1,)](torch.zeros(1), 8, B=8)))           # atomics past the end
'''


def test_an_access_outside_every_tensor_argument_fails_the_kernel():
    from conftest import require_working_interpreter

    require_working_interpreter()
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "caught", "ok", "ok", "caught"], proc.stdout + proc.stderr[-2000:]
