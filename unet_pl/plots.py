"""The run folder's pictures: ``curves.png`` (loss and IoU per epoch) and ``val_predictions.png``.

Both are plain functions of files and arrays (no Trainer), so they can be redrawn from a run
folder after the fact:

    from unet_pl.plots import read_epoch_metrics, plot_curves
    plot_curves(read_epoch_metrics("runs/x"), "runs/x/curves.png")
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

#: What ``curves.png`` draws: (panel title, [(metric name in metrics.csv, legend label), ...]).
CURVES = (
    ("binary cross-entropy", (("train/loss_epoch", "train"), ("val/loss", "val"))),
    ("pixel mean IoU (notebook mean_iou)", (("train/iou", "train"), ("val/iou", "val"))),
)


def metrics_files(run_dir: str | Path) -> list[Path]:
    """The CSV logs of a run folder, oldest first: ``logs/version_0/metrics.csv``, ``version_1`` (a resume), ..."""
    files = Path(run_dir).glob("logs/version_*/metrics.csv")
    return sorted(files, key=lambda p: int(p.parent.name.rsplit("_", 1)[-1]))


def read_epoch_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """Epoch-level metrics of a run folder: ``{epoch: {name: value}}``, epochs ascending.

    Merges every CSV log of the folder; where a resumed run repeated an epoch (the one a
    SIGTERM cut short), the later log wins. Step-level rows (``train/loss_step``) are ignored.
    """
    epochs: dict[int, dict[str, float]] = {}
    for path in metrics_files(run_dir):
        seen: dict[int, dict[str, float]] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                # A row longer than the header (key None) was appended after Lightning's CSV
                # logger was interrupted between recording new keys and rewriting the header:
                # its columns no longer line up with the names, so it is skipped, not misread.
                if None in row or not row.get("epoch"):
                    continue
                values = {k: _number(v) for k, v in row.items() if v not in ("", None) and k not in ("epoch", "step") and not k.endswith("_step")}
                values = {k: v for k, v in values.items() if v is not None}
                if values:
                    seen.setdefault(int(float(row["epoch"])), {}).update(values)
        epochs.update(seen)
    return dict(sorted(epochs.items()))


def _number(text: str) -> float | None:
    """A logged value, or None for a field cut short when the run was killed mid-write."""
    try:
        return float(text)
    except ValueError:
        return None


def best_epoch(epochs: dict[int, dict[str, float]], monitor: str = "val/loss") -> int | None:
    """The epoch with the lowest ``monitor`` (the checkpoint's choice), or None when none was logged."""
    logged = {e: m[monitor] for e, m in epochs.items() if monitor in m and math.isfinite(m[monitor])}
    return min(logged, key=logged.get) if logged else None


def plot_curves(epochs: dict[int, dict[str, float]], out_png: str | Path, title: str = "") -> Path:
    """Write ``curves.png``: train/val loss and train/val IoU against the epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    best = best_epoch(epochs)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 3.6), constrained_layout=True)
    for ax, (panel, series) in zip(np.atleast_1d(axes), CURVES):
        for name, label in series:
            xs = [e for e, m in epochs.items() if name in m]
            if xs:
                ax.plot(xs, [epochs[e][name] for e in xs], marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="grey", linestyle=":", label=f"best (epoch {best})")
        ax.set_title(panel)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def pixel_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Foreground IoU of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(pred, truth).sum()
    return float(np.logical_and(pred, truth).sum() / union) if union else 1.0


def plot_val_predictions(
    images: np.ndarray,
    masks: np.ndarray,
    probs: np.ndarray,
    ids: list[str],
    out_png: str | Path,
    threshold: float = 0.5,
) -> Path:
    """Write ``val_predictions.png``: each image with its true mask (green) and ``prob > threshold`` (magenta) outlined.

    Args:
        images: uint8 (N, H, W, 3); masks: (N, H, W) foreground > 0.5; probs: float (N, H, W) in [0, 1]
            (arrays, or lists of images of different sizes).
        ids: the N image ids, shown with each image's foreground IoU.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    n = len(images)
    if n == 0:
        raise ValueError("plot_val_predictions needs at least one image")
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, mask, prob, image_id in zip(axes.ravel(), images, masks, probs, ids):
        truth, pred = mask > 0.5, prob > threshold
        ax.imshow(image, interpolation="nearest")
        # contour of a constant mask draws nothing (and warns), so only outline what is there
        if truth.any() and not truth.all():
            ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        if pred.any() and not pred.all():
            ax.contour(pred.astype(float), levels=[0.5], colors="magenta", linewidths=0.8)
        ax.set_title(f"{image_id[:10]}  IoU {pixel_iou(pred, truth):.2f}", fontsize=8)
    handles = [Line2D([], [], color="lime", label="truth"), Line2D([], [], color="magenta", label=f"prediction (p > {threshold})")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
    fig.savefig(out_png, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out_png)


def predict_val_images(net, samples, n: int = 8, settings=None) -> tuple[list, list, list, list[str]]:
    """The first ``n`` of ``samples`` (``(id, image uint8 (H, W, 3), labels (H, W))``, as
    ``NucleiDataModule.validation_images`` yields them) through ``unet_pl.inference.probabilities``:
    each image at its own size, as prediction sees it.

    Returns ``plot_val_predictions``' inputs as lists: images, masks (labels > 0), foreground
    probabilities (H, W), ids.
    """
    from itertools import islice

    from .inference.predict import probabilities

    images, masks, probs, ids = [], [], [], []
    for image_id, image, labels in islice(samples, n):
        probs.append(probabilities(net, image, settings)[0])
        images.append(image)
        masks.append(np.asarray(labels) > 0)
        ids.append(image_id)
    return images, masks, probs, ids
