import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

# A test run started in the background by a non-interactive shell inherits an ignored SIGINT (and its children
# with it); the tests of Ctrl-C need Python's own handler, as in a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Before torch loads OpenMP: idle worker threads sleep instead of spinning, which otherwise slows every small op
# (and the subprocesses the CLI tests start) many times over whenever the cores are shared.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers, the peer oracle, runs its own PyTorch code: never kernels fetched from the Hub (the `kernels`
# package, where installed, would try the network for them; the GPU machine has none)
os.environ.setdefault("USE_HUB_KERNELS", "NO")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":      # an interpreted kernel run: every memory access bounds-checked
    import interpreter_bounds  # noqa: E402

    interpreter_bounds.install()
    if os.environ.get("MAMBA2_RECORD_LAUNCHES"):     # launches kept for benchmarks/compile_check.py
        import launch_recorder  # noqa: E402

        launch_recorder.install_from_env()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN/inf anywhere never passes (returns inf)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def ssd_inputs(b, L, h, p, g, n, *, dtype=torch.float64, seed=0, A_scale=3.0, dt_shift=0.0, with_seq_idx=False,
               ndocs=3, D_per_channel=False, requires_grad=False):
    """Fresh random inputs for the SSD signature (never zeros)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    args = dict(x=r(b, L, h, p), dt=r(b, L, h) + dt_shift,
                A=-(torch.rand(h, generator=gen, dtype=torch.float64) * A_scale + 0.1).to(dtype),
                B=r(b, L, g, n), C=r(b, L, g, n))
    kw = dict(D=r(h * p) if D_per_channel else r(h), z=r(b, L, h, p), dt_bias=r(h, scale=0.5),
              initial_states=r(b, h, p, n))
    if with_seq_idx:
        kw["seq_idx"] = torch.sort(torch.randint(0, ndocs, (b, L), generator=gen), dim=1).values.to(torch.int32)
    if requires_grad:
        for d in (args, kw):
            for k, v in d.items():
                if v.is_floating_point():
                    v.requires_grad_(True)
    return args, kw


def word_tokenizer(path, words):
    """A small word-level tokenizer.json (tokenizers library) with <|endoftext|> as EOS; returns the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(path))
    return path


@pytest.fixture
def rel():
    return rel_err


def _interpreter_failure() -> str | None:
    """Why Triton's interpreter cannot run here (Triton 3.6 with numpy >= 2.5, seen on the H200 machine's stack:
    every interpreted kernel dies inside Triton), or None."""
    import numpy
    import triton

    if triton.__version__.startswith("3.6.") and tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 5):
        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} ('only "
                f"0-dimensional arrays can be converted to Python scalars'); on a GPU run these cases "
                f"compiled with MAMBA2_TEST_DEVICE=cuda")
    return None


def require_working_interpreter() -> None:
    """Skip the calling test where Triton's interpreter cannot run."""
    reason = _interpreter_failure()
    if reason:
        pytest.skip(reason)


def child_env(**extra: str) -> dict:
    """The environment of a test's subprocess: this checkout first on PYTHONPATH, what PYTHONPATH already held after
    it (packages installed with ``pip --target`` stay importable), and ``extra``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# Each Triton test file runs its kernels in one subprocess of its own (kernel_script_results), minutes of one busy
# core when interpreted. Those of the files a session will run start as soon as collection ends and run beside the
# other tests, which leave a core idle most of the time: on CI's two cores the suite took the sum of both before.
SCRIPT_TIMEOUT_S = 900
_script_lock = threading.Lock()
_script_runs: dict[tuple[str, bool], Future] = {}
_script_procs: list[subprocess.Popen] = []
_script_pool: ThreadPoolExecutor | None = None
_session_over = False


def _kernels_interpreted() -> bool:
    return os.environ.get("MAMBA2_TEST_DEVICE", "cpu") == "cpu"      # on a GPU the kernels run compiled


def _run_script(script: str, interpret: bool) -> tuple[int, str, str]:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    with _script_lock:
        if _session_over:
            return -1, "", "the test session ended before this script started"
        proc = subprocess.Popen([sys.executable, script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        _script_procs.append(proc)
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\n[killed: still running after {SCRIPT_TIMEOUT_S} s]"
    return proc.returncode, out, err


def _start_script(script: str, interpret: bool, slots: int = 1) -> Future:
    """The run of ``script`` (started now, or queued behind the others, unless it already was)."""
    global _script_pool
    key = (os.path.abspath(script), interpret)
    with _script_lock:
        if key not in _script_runs:
            if _script_pool is None:
                _script_pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="kernel-script")
            _script_runs[key] = _script_pool.submit(_run_script, *key)
        return _script_runs[key]


def pytest_collection_finish(session):
    files = list(dict.fromkeys(str(item.path) for item in session.items
                               if "kernel_results" in getattr(item, "fixturenames", ())))
    if not files or session.config.option.collectonly or importlib.util.find_spec("triton") is None:
        return
    interpret = _kernels_interpreted()
    if interpret and _interpreter_failure():
        return                                   # their tests skip
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    for f in files:
        _start_script(f, interpret, slots=max(1, min(len(files), cores - 1)))


def pytest_sessionfinish(session):
    """Nothing outlives the session (an interrupted or -x run stops while scripts are still queued or running)."""
    global _session_over
    with _script_lock:
        _session_over = True
        for proc in _script_procs:
            if proc.poll() is None:
                proc.kill()
    if _script_pool is not None:
        _script_pool.shutdown(wait=True, cancel_futures=True)


def kernel_script_results(script: str, interpret: bool = True) -> dict:
    """Run a Triton test file as a script in a subprocess (TRITON_INTERPRET must be set before Triton is imported,
    so interpreted runs cannot share this process), or wait for the run started at collection, and return the JSON
    it prints on its ``RESULTS`` line."""
    if interpret:
        require_working_interpreter()
    code, out, err = _start_script(script, interpret).result()
    line = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")]
    assert line, f"kernel test run failed (exit status {code}):\n{out[-3000:]}\n{err[-5000:]}"
    return json.loads(line[-1][len("RESULTS "):])


@pytest.fixture(scope="module")
def kernel_results(request):
    """The results of the requesting test file run as a script (:func:`kernel_script_results`): its kernels
    interpreted on the CPU, compiled with ``MAMBA2_TEST_DEVICE=cuda``."""
    pytest.importorskip("triton")
    return kernel_script_results(request.module.__file__, interpret=_kernels_interpreted())


def print_script_results(**groups) -> None:
    """The script side of :func:`kernel_script_results`: print the ``RESULTS`` JSON line of ``groups``, each a
    zero-argument callable (its result) or a dict of name → zero-argument callable (one result per name). A call
    that raises becomes ``{"error": ...}`` for its entry alone, so that case's test fails with it and the others
    still run."""
    import json
    import traceback

    def attempt(fn):
        try:
            return fn()
        except Exception as e:  # reported as a failure of that entry
            return {"error": repr(e) + "\n" + traceback.format_exc()[-2000:]}

    res = {k: ({n: attempt(f) for n, f in g.items()} if isinstance(g, dict) else attempt(g)) for k, g in groups.items()}
    print("RESULTS " + json.dumps(res))


def count_calls(module, name: str) -> list[int]:
    """Replace ``module.name`` by a wrapper counting its calls; returns the one-element counter."""
    calls, real = [0], getattr(module, name)

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    setattr(module, name, counted)
    return calls
