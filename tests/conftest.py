import math
import os
import signal

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


def require_working_interpreter() -> None:
    """Skip the calling test where Triton's interpreter cannot run (Triton 3.6 with numpy >= 2.5, seen on the H200
    machine's stack: every interpreted kernel dies inside Triton)."""
    import numpy
    import triton

    if triton.__version__.startswith("3.6.") and tuple(map(int, numpy.__version__.split(".")[:2])) >= (2, 5):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} ('only "
                    f"0-dimensional arrays can be converted to Python scalars'); on a GPU run these cases "
                    f"compiled with MAMBA2_TEST_DEVICE=cuda")


def child_env(**extra: str) -> dict:
    """The environment of a test's subprocess: this checkout first on PYTHONPATH, what PYTHONPATH already held after
    it (packages installed with ``pip --target`` stay importable), and ``extra``."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def kernel_script_results(script: str, interpret: bool = True) -> dict:
    """Run a Triton test file as a script in a subprocess (TRITON_INTERPRET must be set before Triton is imported,
    so interpreted runs cannot share this process) and return the JSON it prints on its ``RESULTS`` line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    if interpret:
        require_working_interpreter()
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert line, f"kernel test run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(line[-1][len("RESULTS "):])


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
