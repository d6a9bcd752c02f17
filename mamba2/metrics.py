"""The metrics log of a training run: ``metrics.jsonl`` in its checkpoint directory, one JSON object per line.

Lines are ``{"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}`` after each optimizer step and
``{"step", "eval_loss", "perplexity", "bits_per_byte", "eval_tokens"}`` after each evaluation (loss in nats per
token, elapsed time in seconds over the whole run). They are appended as training goes once the checkpoint
directory exists (kept in memory until its first save), and each save carries the file into the new checkpoint, so
the log always covers the run up to now; a resumed run drops the lines of steps after its checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from mamba2 import fsutil

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to ``directory/metrics.jsonl`` (``directory`` None: records are dropped).

    Args:
        directory: the run's checkpoint directory.
        resume_step: the step a resumed run starts from (its file is cut to the lines up to that step and
            appended to at once); None for a new run, whose lines wait for the first save (an existing directory
            is an older run that the first save replaces).
    """

    def __init__(self, directory: str | Path | None, resume_step: int | None = None):
        self.path = None if directory is None else Path(directory) / METRICS_FILE
        self.pending: list[str] = []
        self.live = resume_step is not None
        if self.path is not None and self.live and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            fsutil.atomic_file(self.path, lambda p: p.write_text("".join(k + "\n" for k in kept)))

    def add(self, **record: Any) -> None:
        """Append one record (numbers and strings)."""
        if self.path is None:
            return
        line = json.dumps(record, allow_nan=True)
        if not self.live:
            self.pending.append(line)
            return
        with open(self.path, "a") as f:
            f.write(line + "\n")

    def write_to(self, path: Path) -> None:
        """Write the whole log to ``path`` (a file of a checkpoint being saved)."""
        if self.live and self.path is not None and self.path.is_file():
            shutil.copyfile(self.path, path)
        with open(path, "a") as f:
            f.writelines(line + "\n" for line in self.pending)

    def saved(self) -> None:
        """The checkpoint directory now holds the log: append to it from here on."""
        self.pending, self.live = [], True
