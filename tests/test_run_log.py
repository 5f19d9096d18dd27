"""The per-epoch metrics file and plot a training run writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from resnext_flax.run_log import PLOT_FILE, plot_metrics, read_metrics, write_metrics

HISTORY = [
    {"epoch": 1, "train_loss": 2.0, "train_acc1": 10.0, "lr": 0.1, "val_acc1": 12.0,
     "val_loss": 1.9},
    {"epoch": 2, "train_loss": 1.5, "train_acc1": 30.0, "lr": 0.05, "val_acc1": 35.0,
     "val_loss": 1.4},
    {"epoch": 3, "train_loss": 1.0, "train_acc1": 60.0, "lr": 0.0, "val_acc1": 58.0,
     "val_loss": 1.1},
]


def test_metrics_file_is_one_line_per_epoch_and_rewritten_whole(tmp_path):
    path = write_metrics(tmp_path, HISTORY[:2])
    assert read_metrics(path) == HISTORY[:2]
    write_metrics(tmp_path, HISTORY)  # a later epoch (or a resumed run) rewrites it
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and read_metrics(path) == HISTORY
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary left


def _ink(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("L")) < 128


def test_plot_draws_each_series_the_history_has(tmp_path):
    plot_metrics(tmp_path, HISTORY)
    full = _ink(tmp_path / PLOT_FILE)
    assert full.shape == (360, 1200) and full.mean() > 0.005
    plot_metrics(tmp_path, [{k: v for k, v in h.items() if not k.startswith("val")}
                            for h in HISTORY])
    without_validation = _ink(tmp_path / PLOT_FILE)
    assert without_validation.shape == full.shape
    # Two fewer lines and no legends: less ink, and the figure differs.
    assert without_validation.sum() < full.sum()


def test_plot_needs_matplotlib_and_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError, match=r"resnext-flax\[train\]"):
        plot_metrics(tmp_path, HISTORY)
    assert not (tmp_path / PLOT_FILE).exists()
