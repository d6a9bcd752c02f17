"""mamba_ssm (official, 2.3.2) as a benchmark oracle only (DESIGN §6): a pure-Python wheel unpacked in
``.oracle/pkg`` (build: ``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps
--no-build-isolation mamba-ssm==2.3.2.post1``, then unzip), imported with its package ``__init__`` stubbed (that
``__init__`` loads a CUDA extension we do not build). Only its Triton code paths run.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_oracle(module: str, attr: str | None = None):
    """``mamba_ssm.<module>`` (or its attribute ``attr``), or None (with the reason printed) when unavailable."""
    root = ROOT / ".oracle" / "pkg"
    if not (root / "mamba_ssm").exists():
        print(f"oracle unavailable: {root / 'mamba_ssm'} does not exist")
        return None
    try:
        if "mamba_ssm" not in sys.modules:
            sys.path.insert(0, str(root))
            pkg = types.ModuleType("mamba_ssm")
            pkg.__path__ = [str(root / "mamba_ssm")]
            sys.modules["mamba_ssm"] = pkg
        mod = importlib.import_module(f"mamba_ssm.{module}")
        return getattr(mod, attr) if attr else mod
    except Exception as e:  # noqa: BLE001
        print(f"oracle mamba_ssm.{module} unavailable: {e!r}")
        return None
