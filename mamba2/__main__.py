"""``python -m mamba2``: the same as the ``mamba2`` command."""

from mamba2.cli import run

run()
