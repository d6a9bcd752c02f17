"""The metrics log of a training run: ``metrics.jsonl`` in its checkpoint directory, one JSON object per line.

Lines are ``{"step", "train_loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"}`` after each optimizer step and
``{"step", "eval_loss", "perplexity", "bits_per_byte", "eval_tokens"}`` after each evaluation (loss in nats per
token, elapsed time in seconds over the whole run). They are appended as training goes once the checkpoint
directory exists (kept in memory until its first save), and each save carries the file into the new checkpoint, so
the log always covers the run up to now; a resumed run drops the lines of steps after its checkpoint.

With a TensorBoard directory the same records also go to TensorBoard event files there (``train/loss``,
``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``eval/loss``, ``eval/perplexity``, ``eval/bits_per_byte``,
against the step), through ``torch.utils.tensorboard`` (needs the ``tensorboard`` package); a resumed run purges the
events of steps after its checkpoint there too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mamba2 import fsutil
from mamba2.errors import UserError

METRICS_FILE = "metrics.jsonl"


def require_tensorboard(directory: str | Path) -> None:
    """Create ``directory`` for TensorBoard's event files.

    Raises:
        UserError: the tensorboard package is missing (saying what to install), or the directory cannot be made.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'mamba2[tensorboard]' "
                        "(or pip install tensorboard)") from None
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):     # an existing folder may still refuse new files (/proc)
            pass
    except OSError as e:
        raise UserError(f"cannot use {directory} for TensorBoard: {fsutil.reason(Path(directory) / 'x', e)}") from None


def _records(path: Path) -> list[str]:
    """The JSON lines of a metrics log; a last line cut short (a full disk, a lost write) is dropped.

    Raises:
        UserError: another line is not JSON (naming the file and the line).
    """
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise UserError(f"{path}: line {i + 1} is not a JSON record: {line[:80]!r}") from None
        out.append(line)
    return out


class MetricsLog:
    """Appends records to ``directory/metrics.jsonl`` (``directory`` None: records are dropped).

    Args:
        directory: the run's checkpoint directory.
        resume_step: the step a resumed run starts from (its file is cut to the lines up to that step and
            appended to at once); None for a new run, whose lines wait for the first save (an existing directory
            is an older run that the first save replaces).
        tensorboard: a directory for TensorBoard event files too (None: none).

    Raises:
        UserError: ``tensorboard`` given but the tensorboard package is missing.
    """

    def __init__(self, directory: str | Path | None, resume_step: int | None = None,
                 tensorboard: str | Path | None = None):
        self.path = None if directory is None else Path(directory) / METRICS_FILE
        self.pending: list[str] = []
        self.live = resume_step is not None
        self.tensorboard = None if tensorboard is None else Path(tensorboard)
        self._writer = None
        self._purge_step: int | None = 0 if resume_step is None else resume_step + 1
        if self.tensorboard is not None:
            require_tensorboard(self.tensorboard)
        if self.path is not None and self.live and self.path.is_file():
            kept = [line for line in _records(self.path) if json.loads(line).get("step", 0) <= resume_step]
            fsutil.atomic_file(self.path, lambda p: p.write_text("".join(k + "\n" for k in kept)))

    def add(self, **record: Any) -> None:
        """Append one record (numbers and strings; ``step`` is the x axis in TensorBoard)."""
        if self.tensorboard is not None:
            self._scalars(record)
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

    def _scalars(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None:    # after the first one, a writer starts a new event file and purges nothing
            self._writer = SummaryWriter(str(self.tensorboard), purge_step=self._purge_step, flush_secs=10)
            self._purge_step = None
        section = "eval" if "eval_loss" in record else "train"
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tag = key.removeprefix(section + "_")
                self._writer.add_scalar(f"{section}/{tag}", value, global_step=record.get("step"))

    def close(self) -> None:
        """Flush and close the TensorBoard event file (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
