"""Records every Triton launch of an interpreted run (tests only), for ``benchmarks/compile_check.py`` to compile
the same kernels with the same arguments for a GPU target without a GPU.

Installed by ``conftest`` when ``TRITON_INTERPRET=1`` and ``MAMBA2_RECORD_LAUNCHES=FILE`` are set: each distinct
launch (kernel, argument types, the integers' values, constexprs, num_warps, num_stages) is appended to FILE as one
JSON line (several processes may append to one file). Tensors are recorded by dtype and whether their address is
16-byte aligned; integers by value (the compiler specialises 1 and multiples of 16).
It patches ``InterpretedFunction.run`` (Triton 3.x internals); :func:`install` returns False where it is missing.
"""

from __future__ import annotations

import inspect
import json
import os

_seen: set[str] = set()


def _arg(value):
    if value is None:
        return {"kind": "none"}
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"kind": "ptr", "dtype": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"kind": "value", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, (float, str)):
        return {"kind": "value", "value": value}
    return {"kind": "other", "repr": repr(value)[:80]}


def install(path: str) -> bool:
    """Patch the interpreter so that each distinct launch is appended to ``path`` (idempotent)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    if getattr(InterpretedFunction.run, "_recording", False):
        return True
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        params = inspect.signature(self.fn).parameters
        bound = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
        bound.update(zip(self.arg_names, args))
        bound.update({k: v for k, v in kwargs.items() if k in params})
        record = {"module": self.fn.__module__, "name": self.fn.__name__, "options": options, "args": {
            n: {"kind": "constexpr", "value": bound.get(n)} if "constexpr" in str(p.annotation) else _arg(bound.get(n))
            for n, p in params.items()}}
        line = json.dumps(record, sort_keys=True, default=repr)
        if line not in _seen:
            _seen.add(line)
            with open(path, "a") as f:
                f.write(line + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    recording_run._recording = True
    InterpretedFunction.run = recording_run
    return True


def install_from_env() -> bool:
    path = os.environ.get("MAMBA2_RECORD_LAUNCHES")
    return bool(path) and install(path)
