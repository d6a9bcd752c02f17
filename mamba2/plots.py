"""The loss-curve figure, written atomically."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mamba2.fsutil import atomic_file  # noqa: E402


def plot_loss_curve(train: list[tuple[int, float]], val: list[tuple[int, float]], path: str | Path,
                    title: str = "") -> None:
    """Save a PNG of training loss per step (raw and smoothed) and held-out loss, atomically
    (:func:`mamba2.fsutil.atomic_file`).

    ``train``/``val``: (step, loss in nats per token) pairs.

    Raises:
        UserError: the file cannot be written (naming it).
    """
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8)
        h, n = max(0, min(25, len(losses) // 40)), len(losses)
        # moving mean over up to h steps on each side: centred inside, one-sided at the ends (no single raw point)
        spans = [(i - min(h, i), i + min(h, n - 1 - i) + 1) for i in range(n)]
        smooth = [sum(losses[a:b]) / (b - a) for a, b in spans]
        ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="tab:orange", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    try:
        atomic_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
