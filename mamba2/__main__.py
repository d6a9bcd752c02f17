"""``python -m mamba2``: the same as the ``mamba2`` command."""

import sys

from mamba2.cli import main

sys.exit(main())
