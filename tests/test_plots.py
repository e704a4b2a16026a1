"""unet_pl.plots: reading a run folder's CSV logs and drawing its two pictures."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from unet_pl.plots import best_epoch, pixel_iou, plot_curves, plot_val_predictions, read_epoch_metrics


def write_metrics(path, rows):
    keys = sorted({k for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def run_dir(tmp_path):
    """A run cut in epoch 2 (version_0) and resumed (version_1), as CSVLogger writes them."""
    write_metrics(tmp_path / "logs/version_0/metrics.csv", [
        {"epoch": 0, "step": 3, "train/loss_step": 0.9},
        {"epoch": 0, "step": 4, "val/loss": 0.6, "val/iou": 0.40},
        {"epoch": 0, "step": 4, "train/loss_epoch": 0.7, "train/iou": 0.35},
        {"epoch": 1, "step": 9, "val/loss": 0.5, "val/iou": 0.50},
        {"epoch": 1, "step": 9, "train/loss_epoch": 0.55, "train/iou": 0.45},
        {"epoch": 2, "step": 12, "train/loss_step": 0.3},  # cut here: epoch 2 redone below
    ])
    write_metrics(tmp_path / "logs/version_1/metrics.csv", [
        {"epoch": 2, "step": 14, "val/loss": 0.45, "val/iou": 0.55},
        {"epoch": 2, "step": 14, "train/loss_epoch": 0.5, "train/iou": 0.5},
        {"epoch": 3, "step": 19, "val/loss": 0.47, "val/iou": 0.56},
        {"epoch": 3, "step": 19, "train/loss_epoch": 0.45, "train/iou": 0.52},
    ])
    return tmp_path


def test_read_epoch_metrics_merges_resumed_logs(run_dir):
    epochs = read_epoch_metrics(run_dir)
    assert list(epochs) == [0, 1, 2, 3]
    assert epochs[0] == {"val/loss": 0.6, "val/iou": 0.40, "train/loss_epoch": 0.7, "train/iou": 0.35}
    assert epochs[2]["val/loss"] == 0.45  # the resumed run's epoch 2, not the cut one
    assert all("train/loss_step" not in m for m in epochs.values())


def test_a_row_appended_under_a_stale_header_is_skipped_not_misread(tmp_path):
    """Ctrl-C between Lightning's CSVLogger recording new keys and rewriting the header leaves
    rows longer than the header (seen in CI): the columns no longer match the names."""
    path = tmp_path / "logs/version_0/metrics.csv"
    write_metrics(path, [{"epoch": 0, "step": 4, "val/loss": 0.6, "val/iou": 0.4}])
    with open(path, "a", newline="") as f:  # written with keys epoch, step, train/loss_epoch, val/iou, val/loss
        csv.writer(f).writerow([0, 4, 0.7, "", ""])
    assert read_epoch_metrics(tmp_path) == {0: {"val/loss": 0.6, "val/iou": 0.4}}


def test_best_epoch_is_lowest_val_loss(run_dir):
    assert best_epoch(read_epoch_metrics(run_dir)) == 2
    assert best_epoch({}) is None
    assert best_epoch({0: {"train/loss_epoch": 1.0}}) is None


def test_plot_curves_writes_png(run_dir):
    png = plot_curves(read_epoch_metrics(run_dir), run_dir / "curves.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pixel_iou_by_hand():
    a = np.array([[1, 1], [0, 0]], bool)
    b = np.array([[1, 0], [1, 0]], bool)
    assert pixel_iou(a, b) == pytest.approx(1 / 3)
    assert pixel_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_plot_val_predictions_handles_empty_and_full_masks(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((5, 32, 32), np.float32)
    masks[0, 8:16, 8:16] = 1
    masks[2] = 1  # all foreground: nothing to outline, must not fail
    probs = rng.random((5, 32, 32)).astype(np.float32)
    png = plot_val_predictions(images, masks, probs, [f"id{i}" for i in range(5)], tmp_path / "val.png")
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_val_predictions(images[:0], masks[:0], probs[:0], [], tmp_path / "none.png")
