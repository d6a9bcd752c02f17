"""Compile every Triton launch an interpreted test run recorded, for a GPU target, on a machine without a GPU.

The interpreter accepts programs that a GPU compile refuses (a ``tl.dot`` narrower than 16, say) or that do not
fit the chip (shared memory past its limit, registers spilled to local memory). This compiles each launch the
tests made — same kernel, argument types, integer specialisations, constexprs, num_warps and num_stages — with the
Triton the GPU machine has, for its architecture, and reports failures, shared memory, registers and spills.

    # 1. record (any Triton whose interpreter runs here)
    MAMBA2_RECORD_LAUNCHES=/tmp/launches.jsonl python -m pytest tests/test_triton_ssd.py tests/test_triton_conv.py ...
    # 2. compile with the GPU machine's Triton (3.6 on the H200 machine, docs/benchmarks.md)
    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/compile_check.py /tmp/launches.jsonl --arch 90 --json /tmp/compile.json

Exit status 1 when a launch fails to compile or needs more shared memory than the target has; 2 for a bad argument
or a launches file that is empty, malformed (named with its line) or names a kernel that cannot be imported; 130
or 143 on Ctrl-C or SIGTERM, after the table and the JSON of the launches compiled so far (marked interrupted). The
SASS is not run: a kernel that compiles can still fault (docs/experiments.md §1 names one).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.script_args import check_output_file, write_json  # noqa: E402

TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8", "int16": "i16",
         "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}
SHARED_LIMIT = {90: 232_448, 80: 166_912, 89: 101_376, 100: 232_448}     # bytes of shared memory per block
# CUDA SM architectures (compute capability × 10) of Volta and later: another number (0, 88, 91) makes LLVM abort
# the process inside triton.compile instead of raising
ARCHS = (70, 72, 75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)
FIELDS = {"module": str, "name": str, "args": dict, "options": dict}     # of every launch record
JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}


class RecordError(Exception):
    """A launches file that cannot be read as launch records; the message names the file and the line."""


def read_records(path: Path) -> list[tuple[int, dict]]:
    """The distinct records of a launches file, each with its line number (the first where it occurs)."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    records: dict[str, tuple[int, dict]] = {}
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            if n == len(lines):     # the last line, without its newline: the recording process was stopped mid-write
                raise RecordError(f"{where}: the last line is cut short ({e.msg} at column {e.colno}, no newline at "
                                  "its end): record again, or delete the line") from None
            raise RecordError(f"{where}: not a JSON record ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{where}: a JSON {JSON_TYPES.get(type(record), type(record).__name__)} instead of a "
                              "launch record (an object)")
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise RecordError(f"{where}: the launch record has no {', '.join(missing)} (it needs "
                              f"{', '.join(FIELDS)})")
        for key, kind in FIELDS.items():
            if not isinstance(record[key], kind):
                raise RecordError(f"{where}: {key} is a JSON {JSON_TYPES.get(type(record[key]), '?')}, not a "
                                  f"{JSON_TYPES[kind]}")
        bad = [k for k, a in record["args"].items() if not (isinstance(a, dict) and isinstance(a.get("kind"), str))]
        if bad:
            raise RecordError(f"{where}: argument {bad[0]} is not recorded as an object with a kind")
        for key in ("num_warps", "num_stages"):
            value = record["options"].get(key, 1)
            if type(value) is not int or value < 1:
                raise RecordError(f"{where}: options.{key} must be a positive integer, got {value!r}")
        records.setdefault(text.strip(), (n, record))
    return list(records.values())


def find_kernel(record: dict):
    """The JITFunction a record names; LookupError saying why when it cannot be imported or is not a kernel."""
    try:
        module = importlib.import_module(record["module"])
    except Exception as e:  # noqa: BLE001  (any error of the import: the module is named, not the traceback)
        raise LookupError(f"cannot import module {record['module']!r} of kernel {record['name']!r} "
                          f"({type(e).__name__}: {e}): is its folder on PYTHONPATH?") from None
    jit = getattr(module, record["name"], None)
    if jit is None:
        raise LookupError(f"module {record['module']} has no kernel {record['name']!r} (recorded before a rename? "
                          "record again)")
    if not callable(getattr(jit, "fn", None)):
        raise LookupError(f"{record['module']}.{record['name']} is not a Triton kernel (a @triton.jit function)")
    return jit


def source(record: dict):
    """(JITFunction, signature, constexprs, attrs) of a recorded launch, as Triton's launcher would specialise it."""
    jit = find_kernel(record)
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(inspect.signature(jit.fn).parameters):
        a = record["args"][name]
        kind = a["kind"]
        if kind in ("constexpr", "none"):
            sig[name], consts[name] = "constexpr", a.get("value")
        elif kind == "ptr":
            sig[name] = "*" + TYPES[a["dtype"]]
            if a["aligned"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int":
            v = a["value"]
            if v == 1:
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "value" and isinstance(a["value"], bool):
            sig[name] = "i1"
        elif kind == "value" and isinstance(a["value"], float):
            sig[name] = "fp32"
        else:
            raise ValueError(f"{record['name']}: argument {name} recorded as {a}, which this check cannot type")
    return jit, sig, consts, attrs


def resources(cubin: bytes, triton_dir: str) -> dict:
    """Registers and local (spill) bytes per thread from cuobjdump's resource usage of the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        tool = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {"regs": int(fields.get("REG", -1)), "local_bytes": int(fields.get("LOCAL", -1))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("launches", type=Path, help="JSON lines written under MAMBA2_RECORD_LAUNCHES")
    ap.add_argument("--arch", type=int, default=90, help="compute capability × 10 of the target (default 90; one "
                    f"of {', '.join(map(str, ARCHS))})")
    ap.add_argument("--json", type=Path, help="write every launch's result here")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles the kernels instead of interpreting them")
    if args.arch not in ARCHS:
        ap.error(f"--arch must be a CUDA SM architecture, compute capability × 10 ({', '.join(map(str, ARCHS))}), "
                 f"got {args.arch}")
    if args.json is not None:
        check_output_file(ap, "--json", args.json)
    if args.launches.is_dir():
        ap.error(f"{args.launches} is a folder, not a launches file (JSON lines)")
    if not args.launches.is_file():
        ap.error(f"no launches file {args.launches}")
    try:
        lines = read_records(args.launches)
    except RecordError as e:
        ap.error(str(e))
    except OSError as e:
        ap.error(f"cannot read {args.launches}: {e.strerror or e}")
    if not lines:
        ap.error(f"no launches recorded in {args.launches}: run the interpreted kernel tests with "
                 f"MAMBA2_RECORD_LAUNCHES={args.launches} first")
    # Ctrl-C or SIGTERM: recorded from here on (an import, torch's among them, may swallow a KeyboardInterrupt),
    # and during the compiles it stops them; the table and JSON of those done are written, a later signal waits
    stops: list[int] = []
    compiling = [False]

    def stop(signum, frame):
        stops.append(signum)
        if compiling[0] and len(stops) == 1:
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _check(ap, args, lines, stops, compiling)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace, lines: list[tuple[int, dict]], stops: list[int],
           compiling: list[bool]) -> int:
    """Import Triton and the kernels, compile (unless ``stops`` holds a signal already), report."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        ap.error(f"cannot import Triton ({e}): install the GPU machine's, e.g. pip install --no-deps --target "
                 "/tmp/t36 triton==3.6.0 and PYTHONPATH=/tmp/t36")

    # every kernel found before any compile; one defined in a script (its module is __main__) cannot be imported
    records = [record for _, record in lines]
    skipped = [f"{r['module']}.{r['name']}" for r in records if r["module"] == "__main__"]
    for n, record in lines:
        if record["module"] != "__main__":
            try:
                find_kernel(record)
            except LookupError as e:
                ap.error(f"{args.launches}:{n}: {e}")
    if len(skipped) == len(records):
        ap.error(f"{args.launches}: all {len(records)} recorded launches are of kernels defined in scripts (module "
                 "__main__), which cannot be imported: nothing to compile")
    target = GPUTarget("cuda", args.arch, 32)
    results: list[dict] = []
    t0 = time.perf_counter()
    try:
        compiling[0] = not stops
        if compiling[0]:
            compile_all(lines, results, {}, triton, ASTSource, target, SHARED_LIMIT.get(args.arch))
        compiling[0] = False
    except KeyboardInterrupt:
        if not stops:           # not by our handler (a caller's)
            stops.append(signal.SIGINT)
    finally:
        compiling[0] = False
    status = report(args, results, records, skipped, triton.__version__, time.perf_counter() - t0,
                    signal.Signals(stops[0]).name if stops else None)
    return 128 + stops[0] if stops else status      # a stop while the report was written (recorded, not acted on)


def compile_all(lines: list[tuple[int, dict]], results: list[dict], done: dict, triton, ASTSource, target,
                limit: int | None) -> None:
    """Compile each distinct launch of ``lines``, appending its result to ``results`` as it is done (what an
    interrupt leaves there is reported)."""
    for n, record in lines:
        if record["module"] == "__main__":
            continue
        try:
            jit, sig, consts, attrs = source(record)
        except (KeyError, ValueError, TypeError) as e:     # an argument this check cannot type: named, not fatal
            results.append({"kernel": f"{record['module']}.{record['name']}", "constexprs": {},
                            "options": record["options"], "ok": False,
                            "error": f"cannot type the launch of line {n}: {e!r}"})
            continue
        # what Triton's launcher takes when a launch names neither (4 warps, 3 stages on CUDA)
        options = {"num_warps": record["options"].get("num_warps", 4),
                   "num_stages": record["options"].get("num_stages", 3)}
        key = json.dumps([record["module"], record["name"], sig, consts, sorted(map(str, attrs)), options],
                         sort_keys=True, default=repr)
        if key not in done:
            try:
                kernel = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs), target=target,
                                        options=options)
                res = {"ok": True, "shared": kernel.metadata.shared,
                       **resources(kernel.asm["cubin"], os.path.dirname(triton.__file__))}
                if limit is not None and res["shared"] > limit:
                    res.update(ok=False, error=f"needs {res['shared']} bytes of shared memory, the target has {limit}")
            except Exception as e:  # noqa: BLE001  (a compile error is this check's finding)
                res = {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"}
            done[key] = res
            results.append({"kernel": f"{record['module']}.{record['name']}", "constexprs": consts,
                            "options": options, **res})


def report(args: argparse.Namespace, results: list[dict], records: list[dict], skipped: list[str], version: str,
           seconds: float, interrupted: str | None) -> int:
    """Print the table and the failures, write --json; the exit status (130/143 when ``interrupted``)."""
    per_kernel: dict[str, list[dict]] = {}
    for r in results:
        per_kernel.setdefault(r["kernel"], []).append(r)
    if interrupted:
        print(f"INTERRUPTED by {interrupted}: the compiles done before it follow, the others were not tried")
    print(f"Triton {version}, sm_{args.arch}: {len(results)} distinct compiles of {len(records)} recorded "
          f"launches in {seconds:.0f} s"
          + (f" (skipped, not importable: {', '.join(sorted(set(skipped)))})" if skipped else "") + "\n")
    print(f"{'kernel':58s} {'compiles':>8s} {'failed':>6s} {'max regs':>8s} {'spills':>6s} {'max shared':>10s}")
    for name, rs in sorted(per_kernel.items()):
        ok = [r for r in rs if r["ok"]]
        print(f"{name:58s} {len(rs):8d} {len(rs) - len(ok):6d} {max((r['regs'] for r in ok), default=0):8d} "
              f"{sum(r['local_bytes'] > 0 for r in ok):6d} {max((r['shared'] for r in ok), default=0):10d}")
    failed = [r for r in results if not r["ok"]]
    for r in failed:
        print(f"\nFAILED {r['kernel']} {r['options']} {r['constexprs']}\n  {r['error']}")
    status = 128 + signal.Signals[interrupted] if interrupted else 1 if failed else 0
    why = None if args.json is None else write_json(args.json, {"triton": version, "arch": args.arch,
                                                                "interrupted": interrupted, "results": results})
    if why:
        print(f"--json {args.json} not written: {why}", file=sys.stderr)
        return status if interrupted else 1
    return status


if __name__ == "__main__":
    sys.exit(main())
