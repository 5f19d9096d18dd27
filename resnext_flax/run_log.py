"""What a training run leaves for a person to read: one JSON object per epoch
(``metrics.jsonl``) and a plot of loss, accuracy and learning rate (``metrics.png``).

Both are rewritten whole from the run's history at the end of each epoch (to a temporary file,
then renamed), so a resumed run, which restores that history from its checkpoint, never
repeats or loses a line. matplotlib (the ``train`` extra) draws the plot with its Agg backend:
no display is needed, and the user's interactive backend is left alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from resnext_flax.weights.files import atomic_write

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"

#: (panel title, y label, [(history key, legend label), ...]) for each panel of the plot.
PANELS = (
    ("loss", "cross-entropy", (("train_loss", "train"), ("val_loss", "val"),
                               ("val_loss_ema", "val (EMA)"))),
    ("accuracy", "top-1 %", (("train_acc1", "train"), ("val_acc1", "val"),
                             ("val_acc1_ema", "val (EMA)"))),
    ("learning rate", "lr", (("lr", "lr"),)),
)


def write_metrics(directory: str | os.PathLike, history: Sequence[dict[str, Any]]) -> str:
    """Write ``metrics.jsonl`` (one line per epoch, keys sorted) into `directory`."""
    path = os.path.join(os.fspath(directory), METRICS_FILE)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in history:
                f.write(json.dumps(entry, sort_keys=True) + "\n")

    atomic_write(path, write)
    return path


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a ``metrics.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def require_plotting() -> None:
    """An ImportError naming the extra unless matplotlib can be imported: a run checks this
    before its first step rather than failing at the end of its first epoch."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError("the training plot needs matplotlib: pip install "
                          "'resnext-flax[train]'") from err


def plot_metrics(directory: str | os.PathLike, history: Sequence[dict[str, Any]]) -> str:
    """Draw ``metrics.png`` in `directory`: one panel each for loss, accuracy and learning
    rate against the epoch; a series appears only when the history has it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("the training plot needs matplotlib: pip install "
                          "'resnext-flax[train]'") from err
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)  # Figure objects bypass pyplot's global backend and state
    epochs = [entry["epoch"] for entry in history]
    for index, (title, label, series) in enumerate(PANELS):
        axes = figure.add_subplot(1, len(PANELS), index + 1)
        for key, legend in series:
            points = [(e, entry[key]) for e, entry in zip(epochs, history, strict=True)
                      if entry.get(key) is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o" if len(points) < 30 else None, label=legend)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        if len(axes.get_lines()) > 1:
            axes.legend()
    path = os.path.join(os.fspath(directory), PLOT_FILE)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path
