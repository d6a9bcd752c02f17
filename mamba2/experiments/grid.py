"""Running a grid of independent runs: parts, continuation, workers, progress, merged results.

A run is a dict of JSON values (its settings) with a ``"key"`` naming it uniquely. Its result is the same dict
plus measurements, appended as one line to ``<out>/<name>.part<i>of<n>.jsonl`` when it ends; a grid started again
skips the runs any results file in ``<out>`` already holds, and :func:`merged` reads all of them (the last line
of a key wins; a line that is not a record of the experiment is skipped with a warning naming its file and line,
and moved to ``<name>.part<i>of<n>.rejected.jsonl`` when that part runs again; a key in two files with different
results is warned about, naming both and the one used).
A run's ``"setting"`` (the grid's settings, the same for all its runs) is the same for every result
in one folder: :func:`merged` and :func:`check_setting` refuse a folder that would mix two.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from tqdm.auto import tqdm

from mamba2.errors import UserError
from mamba2.fsutil import atomic_file, locked

NUMBER = (int, float)                       # field types of :func:`merged`'s ``fields`` (a JSON true is no number)
OPTIONAL_NUMBER = (int, float, type(None))


def plural(n: int, word: str) -> str:
    """``"1 run"``, ``"2 runs"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def parse_part(text: str) -> tuple[int, int]:
    """``"i/n"`` (1 ≤ i ≤ n) → (i, n). Raises UserError otherwise."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise UserError(f"--part must be i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
    return i, n


def results_file(out: Path, name: str, part: tuple[int, int]) -> Path:
    return out / f"{name}.part{part[0]}of{part[1]}.jsonl"


def part_files(out: Path, name: str) -> list[Path]:
    """The results files of experiment ``name`` in ``out`` (``NAME.partIofN.jsonl``), sorted by name."""
    pattern = re.compile(rf"{re.escape(name)}\.part\d+of\d+\.jsonl")
    return sorted(p for p in out.glob(f"{name}.part*.jsonl") if pattern.fullmatch(p.name) and p.is_file())


def _lines(data: bytes, fields: dict[str, tuple[type, ...]] | None) -> list[tuple[int, bytes, Any, str | None]]:
    """Each line of a results file: (number, its bytes with the newline, its record or None for a blank line, why
    it is not a record with ``fields`` (and a key and a setting) or None)."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            record = None
        rows.append((number, raw + b"\n", record,
                     _misfit(record, {"key": (str,), "setting": (dict,), **(fields or {})})))
    return rows


def merged(out: Path, name: str, fields: dict[str, tuple[type, ...]] | None = None) -> list[dict[str, Any]]:
    """Every result in ``out``'s results files of experiment ``name``, one per key (the last written wins), in the
    order first seen. ``fields``: the types each record's fields must have (name → accepted types; ints and floats
    are no bools); a line that is not JSON, or a record without them, is skipped with a warning naming its file and
    line (its run counts as not done). A key whose results differ between two files (a run done twice, under two
    splits into parts) is warned about once, naming both files and the one used (the file sorted last).

    Raises:
        UserError: the files hold results of different settings (named with the files and the fields that differ).
    """
    by_key: dict[str, dict[str, Any]] = {}
    source: dict[str, Path] = {}
    clashes: dict[tuple[Path, Path], list[str]] = {}
    first: tuple[Path, dict[str, Any]] | None = None
    for path in part_files(out, name):
        unreadable = []
        for number, _, record, problem in _lines(path.read_bytes(), fields):
            if problem:
                unreadable.append(f"line {number} ({problem})")      # e.g. cut short by a kill: that run is not done
                continue
            if first is None:
                first = path, record["setting"]
            if record["setting"] != first[1]:
                raise UserError(f"{out} mixes results of different settings ({first[0].name} vs {path.name}: "
                                f"{_differences(first[1], record['setting'])}): a folder holds one setting, "
                                f"move the results files of the other into another folder")
            key = record["key"]
            if key in by_key and source[key] != path and (json.dumps(by_key[key], sort_keys=True)
                                                          != json.dumps(record, sort_keys=True)):
                clashes.setdefault((source[key], path), []).append(key)
            by_key[key], source[key] = record, path
        if unreadable:
            more = ", …" if len(unreadable) > 5 else ""
            _warn_once(f"warning: {path}: {len(unreadable)} unreadable line(s) skipped (a run cut short, or not a "
                       f"result of this version?): {', '.join(unreadable[:5])}{more}; their runs count as not done")
    for (a, b), keys in clashes.items():
        keys = list(dict.fromkeys(keys))
        more = ", …" if len(keys) > 5 else ""
        _warn_once(f"warning: {out}: {plural(len(keys), 'run')} ({', '.join(keys[:5])}{more}) "
                   f"{'is' if len(keys) == 1 else 'are'} in both {a.name} and {b.name} with different results: "
                   f"{b.name}'s {'is' if len(keys) == 1 else 'are'} used; delete the line(s) of the one to drop")
    return list(by_key.values())


def _misfit(record: Any, fields: dict[str, tuple[type, ...]]) -> str | None:
    """Why ``record`` (a line's JSON) is not a record with ``fields`` (name → accepted types), or None if it is."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for field, types in fields.items():
        if field not in record:
            return f"no {field!r}"
        value = record[field]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = ["null" if t is type(None) else t.__name__ for t in types]
            return f"{field!r} is {type(value).__name__}, not {' or '.join(names)}"
    return None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Print ``message`` to stderr the first time this process gives it (the files are read several times a call)."""
    if message not in _warned:
        _warned.add(message)
        print(message, file=sys.stderr)


def check_setting(out: Path, records: list[dict[str, Any]], setting: dict[str, Any]) -> None:
    """Check that ``records`` (the results already in ``out``) were run with ``setting``, the one about to run.

    Raises:
        UserError: they were not (named with the fields that differ, the folder's value first).
    """
    setting = json.loads(json.dumps(setting))          # tuples to lists, as the records hold it
    if records and records[0]["setting"] != setting:
        raise UserError(f"{out} holds results of another setting (there vs now: "
                        f"{_differences(records[0]['setting'], setting)}): a folder holds one setting, pick another "
                        f"--out for this one")


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    """``"field <a's value> vs <b's value>"`` for each field whose value differs, joined by commas."""
    def show(setting: dict[str, Any], field: str) -> str:
        return json.dumps(setting[field]) if field in setting else "(absent)"

    fields = [f for f in dict.fromkeys([*a, *b]) if f not in a or f not in b or a[f] != b[f]]
    return ", ".join(f"{f} {show(a, f)} vs {show(b, f)}" for f in fields)


def on_plan(out: Path, records: list[dict[str, Any]],
            planned: tuple[list[dict[str, Any]], list[str]]) -> tuple[list[dict[str, Any]], str]:
    """The records of the runs the grid plans, and the note that opens the table of a partial grid.

    ``planned`` is the experiment's ``runs(...)`` for the records' setting: the runs it lists and the keys of those
    waiting on others (they count as missing). A record of no planned run (a key edited by hand, an lm run at a
    larger size whose learning rate came from a sweep result since replaced, or one whose sweep is not complete in
    this folder) is left out of the table, the JSON and the plot, with a warning naming it and why; the grid runs
    the planned one instead (once its sweep is complete).

    Returns:
        (the planned runs' records, ``"**Incomplete: 37 of 240 runs.**"`` and a blank line, or ``""`` when every
        planned run has its record).
    """
    runs, waiting = planned
    keys = {r["key"] for r in runs}
    later = tuple(k.rstrip("?") for k in waiting)            # "ARCH/SIZE/lr?": its rate is not known yet
    off = [r["key"] for r in records if r["key"] not in keys]
    for group, why in (([k for k in off if not k.startswith(later)], "edited by hand, or computed from results "
                        "since replaced"),
                       ([k for k in off if later and k.startswith(later)], "they wait for their architecture's "
                        "learning-rate sweep, which is not complete in this folder")):
        if group:
            more = ", …" if len(group) > 5 else ""
            _warn_once(f"warning: {out}: {plural(len(group), 'result')} of no run this grid plans left out of the "
                       f"table ({', '.join(group[:5])}{more}): {why}")
    kept = [r for r in records if r["key"] in keys]
    total = len(runs) + len(waiting)
    return kept, "" if len(kept) == total else f"**Incomplete: {len(kept)} of {total} runs.**\n\n"


def one_device(out: Path, name: str, records: list[dict[str, Any]], device: str | None = None) -> None:
    """Check that ``records`` (and a run about to start on ``device``) are of one device: an experiment of timings
    keeps one device per folder.

    Raises:
        UserError: they are not, naming the devices and the files of each.
    """
    where: dict[str, set[str]] = {}
    for path in part_files(out, name):
        for _, _, record, problem in _lines(path.read_bytes(), None):
            if not problem and isinstance(record.get("device"), str):
                where.setdefault(record["device"], set()).add(path.name)
    devices = {r["device"] for r in records} | ({device} if device else set())
    if len(devices) > 1:
        named = "; ".join(f"{d} ({', '.join(sorted(where.get(d, ())) or ['this run'])})" for d in sorted(devices))
        raise UserError(f"{out} would mix {name} timings of {len(devices)} devices: {named}; timings of two devices do "
                        f"not belong in one table: keep each device's results files in a folder of their own")


def rates_note(tried: int, planned: int) -> str:
    """``"; 2 of 4 rates"`` for a cell whose best learning rate was taken over fewer rates than planned, else ``""``."""
    return "" if tried >= planned else f"; {tried} of {planned} rates"


def provenance(device: str) -> dict[str, Any]:
    """Where and with what a result was measured: date, device name, torch version, git commit (if any)."""
    import torch

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=here).stdout.strip() or None
        if commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], timeout=10,
                                     cwd=here.parent).returncode == 1:
            commit += "+dirty"            # the package's tracked files differ from the commit
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else _cpu_name()
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__, "commit": commit}


def _cpu_name() -> str:
    """The CPU's model (Linux: /proc/cpuinfo's "model name"), else the machine's architecture, else "cpu"."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return " ".join(line.split(":", 1)[1].split()) or "cpu"
    return platform.processor() or platform.machine() or "cpu"


def run_grid(name: str, runs: list[dict[str, Any]], fn: Callable[[dict[str, Any]], dict[str, Any]], out: Path,
             *, part: tuple[int, int] = (1, 1), workers: int = 1, extra: dict[str, Any] | None = None,
             describe: Callable[[dict[str, Any]], str] = lambda r: r["key"],
             announce_done: bool = True, keep_going: bool = False,
             fields: dict[str, tuple[type, ...]] | None = None) -> list[dict[str, Any]]:
    """Run this part's share of ``runs`` (every n-th, from the i-th) that no results file holds yet (saying how
    many are done already when ``announce_done``).

    ``fn(run)`` returns the run's measurements; the record written is ``{**run, **measurements, **extra}``.
    ``workers`` > 1 runs that many at once in separate processes (small models leave a GPU mostly idle).
    ``keep_going``: a run that raises is left out (its traceback appended to ``NAME.failures.log`` in ``out``) and
    the others go on; runs then always train in worker processes, and the process of a failed run is replaced
    (a kernel fault leaves its CUDA context unusable) before more runs start. ``fields``: as :func:`merged`'s (a
    record without them counts as not done).

    Returns this call's new records. Raises what ``fn`` raises (the records finished before are kept), :class:`mamba2.fsutil.Busy`
    when another process runs this part into ``out`` (before any training), and UserError when ``out`` mixes
    settings (:func:`merged`), cannot hold the results file (checked before any training), a record cannot be
    written (a full disk: the records before are kept), a worker process dies (killed, out of memory), or
    (``keep_going``) runs failed, naming them.
    """
    path = results_file(out, name, part)
    with _locked(out, path, part, fields) as results:
        done = {r["key"] for r in merged(out, name, fields)}
        mine = [r for r in runs[part[0] - 1::part[1]] if r["key"] not in done]
        skipped = len(runs[part[0] - 1::part[1]]) - len(mine)
        if skipped and announce_done:
            tqdm.write(f"{name}: {plural(skipped, 'run')} of this part {'is' if skipped == 1 else 'are'} done already "
                       f"(in {out}); {len(mine)} to go")
        if not mine:
            return []
        records = []
        bar = tqdm(total=len(mine), unit="run", desc=name, dynamic_ncols=True)

        def finish(run: dict[str, Any], result: dict[str, Any]) -> None:
            record = {**run, **result, **(extra or {})}
            with _saving(path, path):
                results.write((json.dumps(record) + "\n").encode())
                results.flush()
            records.append(record)
            bar.set_postfix_str(describe(record), refresh=False)
            bar.update(1)

        failures: list[str] = []

        def fail(run: dict[str, Any], error: BaseException) -> None:
            failures.append(run["key"])
            with _saving(out / f"{name}.failures.log", path), open(out / f"{name}.failures.log", "a") as log:
                log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} run {run['key']}\n"
                          + "".join(traceback.format_exception(error)))
            tqdm.write(f"{name}: run {run['key']} failed ({type(error).__name__}: {str(error)[:200]}); going on")

        try:
            if workers <= 1 and not keep_going:
                for run in mine:
                    with _naming(run, path):
                        result = fn(run)
                    finish(run, result)
            else:                                                               # no idle processes
                _run_in_workers(fn, mine, max(1, min(workers, len(mine))), finish, path, fail if keep_going else None)
        finally:
            bar.close()
    if failures:
        raise RunsFailed(failures, out / f"{name}.failures.log", path, records)
    return records


class RunsFailed(UserError):
    """Runs failed under ``keep_going`` (:func:`run_grid`): ``failures`` their keys, ``records`` the results of the
    runs that finished beside them (a caller with runs still to start goes on with those, then raises)."""

    def __init__(self, failures: list[str], log: Path, path: Path, records: list[dict[str, Any]]):
        were = "was" if len(failures) == 1 else "were"
        super().__init__(f"{plural(len(failures), 'run')} failed and {were} left out ({', '.join(failures[:4])}"
                         f"{', …' if len(failures) > 4 else ''}): tracebacks in {log}; the other runs are kept in "
                         f"{path}: run the same command again to retry the failed ones")
        self.failures, self.log, self.path, self.records = failures, log, path, records


@contextlib.contextmanager
def _saving(path: Path, results: Path) -> Iterator[None]:
    """Writing ``path`` during a grid whose results file is ``results``.

    Raises:
        UserError: for an OSError (a full disk), naming ``path`` and the reason: the records written before are
            kept in ``results``.
    """
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}; the runs finished before are kept in {results}: "
                        f"run the same command again to continue once it can be written") from None


@contextlib.contextmanager
def _locked(out: Path, path: Path, part: tuple[int, int],
            fields: dict[str, tuple[type, ...]] | None = None) -> Iterator[BinaryIO]:
    """The results file ``path``, open for appending, written by this process alone until the block ends
    (:func:`mamba2.fsutil.locked`: the lock file ``.NAME.partIofN.jsonl.lock`` beside it). Its unreadable lines
    (``fields`` as :func:`merged`'s) are moved out first (:func:`_set_aside`), so they are not warned about on every
    later call.

    Raises:
        UserError: ``out`` cannot hold the file. :class:`mamba2.fsutil.Busy`: another process holds the lock (two processes
            running one part into one folder would train the same runs).
    """
    busy = (lambda lock: f"another process is running part {part[0]}/{part[1]} of this grid into {out} "
                         f"({lock.name} is locked): wait for it to end, or give each process its own --part")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the results into {out}: {e.strerror or e} ({path})") from None
    with locked(path, busy=busy, what="results file"), contextlib.ExitStack() as cleanup:
        try:
            new = not path.exists()
            f = open(path, "a+b")
        except OSError as e:
            raise UserError(f"cannot write the results into {out}: {e.strerror or e} ({path})") from None
        cleanup.callback(lambda: _close(f))
        if new:                       # a part that wrote nothing leaves no empty file behind
            cleanup.callback(lambda: path.unlink() if path.exists() and path.stat().st_size == 0 else None)
        with _saving(path, path):
            _end_cut_line(f, path)
            if _set_aside(f, path, fields):       # the file was written again: append to the new one
                f.close()
                f = open(path, "a+b")
        yield f


def _close(f: BinaryIO) -> None:
    """Close ``f``; a write that failed (a full disk) was reported already, its buffered rest failing again is not."""
    with contextlib.suppress(OSError):
        f.close()


def _end_cut_line(f: BinaryIO, path: Path) -> None:
    """A last line without its newline (a kill while a record was written): ended with one if it is a whole
    record, else dropped (that run is not done and runs again), so it is neither lost nor warned about again."""
    f.seek(0)
    data = f.read()
    if not data or data.endswith(b"\n"):
        return
    start = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[start:]), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        whole = False
    if whole:
        f.write(b"\n")
    else:
        f.truncate(start)
        tqdm.write(f"{path}: dropped its unfinished last line (a run cut short by a kill: it runs again)")
    f.flush()


def _set_aside(f: BinaryIO, path: Path, fields: dict[str, tuple[type, ...]] | None) -> bool:
    """Move the unreadable lines of the results file ``path`` (open as ``f``, its last line whole; this process
    writes it alone) to ``NAME.partIofN.rejected.jsonl`` beside it (appended, less those it holds already: a
    rewrite that failed or was killed after them left them in both) and write the file again without them
    (:func:`mamba2.fsutil.atomic_file`, with SIGINT and SIGTERM held back meanwhile). Returns whether it did (False
    when every line is readable)."""
    f.seek(0)
    lines = _lines(f.read(), fields)
    bad = [(number, raw) for number, raw, _, problem in lines if problem]
    if not bad:
        return False
    rejected = path.with_name(path.name[:-len(".jsonl")] + ".rejected.jsonl")
    try:
        there = rejected.read_bytes()
    except FileNotFoundError:
        there = b""
    held, new = Counter(line + b"\n" for line in there.split(b"\n")), []     # as _lines splits them
    for _, raw in bad:
        if held[raw]:
            held[raw] -= 1
        else:
            new.append(raw)
    with stops_deferred():
        with open(rejected, "ab") as r:
            r.write((b"\n" if there and not there.endswith(b"\n") else b"") + b"".join(new))
        atomic_file(path, lambda temp: temp.write_bytes(b"".join(raw for _, raw, _, problem in lines
                                                                 if not problem)))
    numbers = ", ".join(str(n) for n, _ in bad[:5]) + (", …" if len(bad) > 5 else "")
    tqdm.write(f"{path}: moved its {plural(len(bad), 'unreadable line')} ({'line' if len(bad) == 1 else 'lines'} "
               f"{numbers}) to {rejected.name} beside it, so they are not warned about again; their runs count as "
               f"not done")
    return True


@contextlib.contextmanager
def _naming(run: dict[str, Any], path: Path) -> Iterator[None]:
    """A run that raises (a bug, e.g. a kernel fault) stops the grid with its traceback, and the last line says
    which run it was and that the finished ones are kept (a worker that died is reported by the caller)."""
    try:
        yield
    except Exception as e:
        if isinstance(e, (UserError, BrokenProcessPool)):
            raise
        raise RuntimeError(f"run {run.get('key', '?')} failed: {type(e).__name__}: {e}; the runs finished so far "
                           f"are kept in {path}") from e


def _run_in_workers(fn, runs: list[dict[str, Any]], workers: int, finish, path: Path,
                    fail: Callable[[dict[str, Any], BaseException], None] | None = None) -> None:
    """``finish(run, fn(run))`` for every run, ``workers`` processes at a time. spawn: a forked CUDA context is
    unusable. Workers ignore SIGINT (the grid's process handles Ctrl-C) and exit when that process is gone (even
    killed); leaving (done, an error, Ctrl-C) terminates them: none outlives the grid.

    Without ``fail``, a run that raises stops everything (named by :func:`_naming`) and a worker that dies is
    reported, not waited on for ever. With ``fail``, whatever a run raises is handed to it, and then no run starts
    in that pool again (its process may hold a broken CUDA context): the runs in flight finish and a fresh pool
    takes the rest; when a worker dies, the runs that were in flight are run again one at a time, so that only
    the one whose process dies is failed."""
    pending, suspects = list(runs), []
    while pending or suspects:
        alone = bool(suspects)               # find which of the runs in flight when a worker died kills its process
        queue, width = (suspects, 1) if alone else (pending, workers)
        pool = ProcessPoolExecutor(width, mp_context=get_context("spawn"), initializer=_worker_init,
                                   initargs=(os.getpid(), worker_threads(width)))
        try:
            inflight: dict[Any, dict[str, Any]] = {}
            tainted = False
            while inflight or (queue and not tainted):
                while queue and not tainted and len(inflight) < width:
                    run = queue.pop(0)
                    inflight[pool.submit(fn, run)] = run
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                broken = []
                # in submission order: a run that a worker took after a faulting one there (and that failed only
                # for it) is never named before the run that faulted
                for future in [f for f in inflight if f in done]:
                    run = inflight.pop(future)
                    if fail is None:
                        with _naming(run, path):
                            result = future.result()
                    else:
                        try:
                            result = future.result()
                        except BrokenProcessPool:
                            broken.append(run)
                            continue
                        except BaseException as e:    # the run's own error, whatever it is (it ran in a worker)
                            fail(run, e)
                            tainted = True
                            continue
                    finish(run, result)
                if broken:
                    broken += inflight.values()
                    if alone:
                        fail(broken[0], RuntimeError("its worker process died (killed, out of memory, or crashed)"))
                    else:
                        suspects += broken
                    break
        except BrokenProcessPool:
            raise UserError(f"a worker process died while training (killed, or out of memory?); the runs finished "
                            f"so far are kept in {path}: run the same command again to continue") from None
        finally:
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, which a container or ``taskset`` limits (``os.cpu_count``
    counts the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_threads(workers: int) -> int:
    """Torch threads for each of ``workers`` processes: :func:`usable_cpus` shared among them, at least one each."""
    return max(1, usable_cpus() // workers)


def _worker_init(parent: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)      # the cores shared among the workers, not each taking all of them
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table (floats with 3 decimals, None as '–')."""
    def cell(v: Any) -> str:
        return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def setting_of(cls: type, run: dict[str, Any]):
    """The dataclass ``cls`` of a run's ``"setting"`` (its JSON lists back to tuples, nested ones too).

    Raises:
        UserError: the setting's fields are not ``cls``'s (results of another version), naming the difference.
    """
    def tuples(v: Any) -> Any:
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    try:
        return cls(**{k: tuples(v) for k, v in run["setting"].items()})
    except TypeError as e:
        raise UserError(f"the results' setting does not fit this version's {cls.__module__}.{cls.__qualname__} ({e}): "
                        f"results of another version?") from None


def figure(*args: Any, **kwargs: Any):
    """``matplotlib.pyplot.subplots(*args, **kwargs)`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def write_report(out: Path, name: str, text: str, records: list[dict[str, Any]], fig) -> str:
    """Write ``name``.md (``text`` and the line naming the devices of the records, :func:`devices_line`),
    ``name``.json (``records``; a NaN or infinity as null, as standard JSON has none) and ``name``.png (``fig``,
    then closed) into ``out`` as one: each into a hidden temporary file first, then all three renamed over the old
    ones, with SIGINT and SIGTERM held back meanwhile (:func:`stops_deferred`), so the three files always belong
    together.

    Returns the markdown written.

    Raises:
        UserError: a file cannot be written (a full disk), naming it and the reason; the old report stays, and the
            results files are untouched (``--report`` writes the report again from them).
    """
    import matplotlib.pyplot as plt

    if text.startswith("**Incomplete"):     # the plot of a partial grid says so too
        fig.suptitle(text.split("\n", 1)[0].strip("*"), fontsize=9, color="firebrick")
    text += devices_line(records)
    writers = {"md": lambda p: p.write_text(text),
               "json": lambda p: p.write_text(json.dumps(_finite(records), indent=1, allow_nan=False)),
               "png": lambda p: fig.savefig(p, format="png")}
    temps: dict[Path, Path] = {}
    target = out
    try:
        fig.tight_layout()
        with stops_deferred():
            for ext, write in writers.items():
                target = out / f"{name}.{ext}"
                temps[target] = out / f".{target.name}.tmp-{os.getpid()}"   # plain open: the umask's permissions
                write(temps[target])
            for target, temp in temps.items():
                os.replace(temp, target)
            for temp in temps.values():     # before a held stop is acted on (by a handler that may just exit)
                _discard(temp)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}; the report in {out} is left as it was and the "
                        f"results are kept: --report writes it once it can be written") from None
    finally:
        for temp in temps.values():
            _discard(temp)
        plt.close(fig)
    return text


def _discard(path: Path) -> None:
    """Remove ``path`` if it is there. A read-only file system refuses even a file that is not there (EROFS, not
    ENOENT): nothing to remove then, and the write's own error is the one to tell."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def devices_line(records: list[dict[str, Any]]) -> str:
    """The line under a report naming the device(s) its runs ran on, with how many each, and (several) that
    timings compare only within one."""
    count = Counter(r["device"] for r in records if "device" in r)
    if not count:
        return ""
    named = ", ".join(f"{plural(n, 'run')} on {d}" for d, n in count.most_common())
    return f"\nMeasured: {named}" + ("; compare timings only within one device.\n" if len(count) > 1 else ".\n")


def _finite(value: Any) -> Any:
    """``value`` with each NaN or infinite float (a diverged run's loss) as None: standard JSON has neither."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM held back during the block and acted on at its end (SIGTERM if it came, else SIGINT, by
    the handler it had before), so that a stop cannot cut short what the block writes; when the block raises, its
    error goes on instead (it ends the call and says why). Only in the main thread (where
    Python runs signal handlers) and for signals whose handler was set from Python; an ignored one stays ignored."""
    held: list[int] = []
    before: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is not None and handler != signal.SIG_IGN:
                before[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    try:
        yield
    except BaseException:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        raise                   # the block's own error ends the call and says why: a held stop would hide it
    for sig, handler in before.items():
        signal.signal(sig, handler)
    if held:
        signal.raise_signal(signal.SIGTERM if signal.SIGTERM in held else held[0])
