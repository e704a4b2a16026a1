"""Metrics as plain functions with thin torchmetrics wrappers.

- ``pixel_mean_iou``: the notebook's ``mean_iou``: for each threshold t in 0.5, 0.55, ..., 0.95,
  TF's 2-class ``tf.metrics.mean_iou`` (IoU of background and of foreground, averaged over the
  classes present) of ``prob > t`` against the mask, then the mean over thresholds. The
  confusion matrices are accumulated over the whole set (as TF's streaming metric does over a
  Keras epoch), not averaged over batches.
- ``dsb_image_score`` / ``dsb_score`` / ``DSBScore``: the 2018 Data Science Bowl's instance
  score on int label images (one label per nucleus), see the section at the end.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torchmetrics import Metric

#: The notebook's and the competition's IoU thresholds: 0.5, 0.55, ..., 0.95.
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def pixel_confusion(prob: torch.Tensor, target: torch.Tensor, thresholds=THRESHOLDS) -> torch.Tensor:
    """2x2 confusion matrix per threshold: ``(T, 2, 2)`` int64, rows truth, columns prediction.

    ``prob``: probabilities in [0, 1], any shape; ``target``: same shape, foreground where > 0.5;
    ``thresholds``: increasing; a pixel is predicted foreground at ``t`` when ``prob > t``.
    One pass: each pixel's bucket (how many thresholds lie strictly below it) goes into a
    histogram split by truth, and a reversed cumulative sum gives every threshold's counts.
    """
    if not isinstance(thresholds, torch.Tensor):
        thresholds = torch.tensor(thresholds, dtype=prob.dtype)
    # a buffer already on the device avoids a host-to-device copy (a sync on CUDA) every step
    t = thresholds.to(prob.device, prob.dtype)
    n_t = t.numel()
    truth = (target > 0.5).reshape(-1).long()
    bucket = torch.bucketize(prob.reshape(-1), t)  # prob > t[j] exactly when bucket > j
    idx = truth * (n_t + 1) + bucket
    # index_add_, not bincount: CUDA's bincount reads the input's max back to the host (a sync per step)
    hist = torch.zeros(2 * (n_t + 1), dtype=torch.long, device=idx.device).index_add_(0, idx, torch.ones_like(idx))
    hist = hist.reshape(2, n_t + 1)
    above = hist.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # (2, T): pixels predicted foreground at each t
    fp, tp = above[0], above[1]
    tn, fn = hist[0].sum() - fp, hist[1].sum() - tp
    return torch.stack([torch.stack([tn, fp], -1), torch.stack([fn, tp], -1)], -2)


def mean_iou_from_confusion(confmat: torch.Tensor) -> torch.Tensor:
    """TF's 2-class mean IoU for each threshold, averaged over thresholds. ``confmat``: ``(T, 2, 2)``."""
    cm = confmat.double()
    inter = torch.diagonal(cm, dim1=-2, dim2=-1)  # (T, 2)
    union = cm.sum(-1) + cm.sum(-2) - inter
    present = union > 0  # TF leaves classes that appear nowhere out of the mean
    iou = torch.where(present, inter / union.clamp(min=1), torch.zeros_like(inter))
    per_t = iou.sum(-1) / present.sum(-1).clamp(min=1)
    return per_t.mean().float()


def pixel_mean_iou(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The notebook's ``mean_iou`` over one set of predictions (a 0-dim tensor in [0, 1])."""
    return mean_iou_from_confusion(pixel_confusion(prob, target))


class RunningMean(Metric):
    """Mean of values weighted by batch size, over an epoch and across DDP ranks.

    torchmetrics' ``MeanMetric`` checks every value for NaN with a host-side ``if``: on a GPU that
    is a sync per step, which this avoids (a NaN loss shows up in the mean anyway).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int = 1) -> None:
        self.total += value.detach().double() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


class PixelMeanIoU(Metric):
    """``pixel_mean_iou`` accumulated over an epoch: ``update(prob, target)``, ``compute()``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("confmat", default=torch.zeros(len(THRESHOLDS), 2, 2, dtype=torch.long), dist_reduce_fx="sum")
        self.register_buffer("thresholds", torch.tensor(THRESHOLDS), persistent=False)

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += pixel_confusion(prob.detach().float(), target, self.thresholds)

    def compute(self) -> torch.Tensor:
        return mean_iou_from_confusion(self.confmat)


# --- The competition's instance score (2018 Data Science Bowl) ---------------------------------
#
# Per image: the IoU of every true nucleus with every predicted one, from one histogram of
# (true label, predicted label) pairs. At each threshold t a pair with IoU > t is a hit; since
# t >= 0.5 a nucleus has at most one hit, so TP = number of hits, FP = predicted - TP,
# FN = true - TP, score(t) = TP / (TP + FP + FN). The image's score is the mean over t; empty
# truth and empty prediction score 1, one empty and the other not 0. The set's score is the
# mean over images.


class DSBImageScore(NamedTuple):
    """One image's competition score: ``score`` = mean of ``per_threshold`` (float64 ``(T,)``)."""

    score: float
    per_threshold: np.ndarray
    n_true: int
    n_pred: int


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels -> (int64 labels numbered densely enough to histogram, number of bins incl. 0)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        raise ValueError("expected an int label image (0 background, 1..k one per nucleus), got a bool mask; "
                         "label it first, e.g. skimage.measure.label(mask)")
    labels = labels.astype(np.int64, copy=False)
    top = int(labels.max(initial=0))
    if int(labels.min(initial=0)) < 0:
        raise ValueError("label images must be >= 0 (0 background, 1..k one per nucleus)")
    if top < 1024:  # the histogram has (true bins) x (predicted bins) cells: keep each side small
        return labels, top + 1
    # Large or sparse label values (e.g. hashes): renumber 1..k so the histogram stays small.
    values, inverse = np.unique(labels, return_inverse=True)
    if values[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(labels.shape), int(inverse.max()) + 1


def instance_iou(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every true with every predicted nucleus: float64 ``(n_true, n_pred)``.

    ``true``, ``pred``: int label images of the same ``(H, W)``, 0 background. Label values need
    not be consecutive; absent values are dropped, so rows and columns follow increasing label.
    """
    if np.shape(true) != np.shape(pred):
        raise ValueError(f"true and predicted labels differ in shape: {np.shape(true)} vs {np.shape(pred)}; "
                         "resize predictions to the image's original size first")
    t, kt = _compact(true)
    p, kp = _compact(pred)
    hist = np.bincount((t * kp + p).ravel(), minlength=kt * kp).reshape(kt, kp)
    area_t, area_p = hist.sum(1), hist.sum(0)
    rows, cols = np.flatnonzero(area_t[1:]) + 1, np.flatnonzero(area_p[1:]) + 1
    inter = hist[np.ix_(rows, cols)]
    union = area_t[rows, None] + area_p[None, cols] - inter
    return inter / np.maximum(union, 1)


def dsb_image_score(true: np.ndarray, pred: np.ndarray, thresholds=THRESHOLDS) -> DSBImageScore:
    """The competition score of one image from int label images ``true`` and ``pred`` ``(H, W)``."""
    iou = instance_iou(true, pred)
    n_true, n_pred = iou.shape
    if n_true == 0 and n_pred == 0:
        per_t = np.ones(len(thresholds))
    else:
        # Only pairs that overlap can be hits; look at those, not the whole matrix, per threshold.
        overlap = iou[iou > 0]
        tp = (overlap[None, :] > np.asarray(thresholds)[:, None]).sum(1)
        per_t = tp / (n_true + n_pred - tp)
    return DSBImageScore(float(per_t.mean()), per_t, n_true, n_pred)


def dsb_score(trues, preds, thresholds=THRESHOLDS) -> tuple[float, np.ndarray]:
    """The set's score (mean of image scores) and its per-threshold means ``(T,)``, over paired images."""
    scores = [dsb_image_score(t, p, thresholds) for t, p in zip(trues, preds, strict=True)]
    if not scores:
        raise ValueError("dsb_score needs at least one image")
    per_t = np.mean([s.per_threshold for s in scores], 0)
    return float(np.mean([s.score for s in scores])), per_t


def label_components(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Connected components (8-connected, as skimage's default) of bool masks ``(N, H, W)``
    or ``(H, W)`` -> int32 labels of the same shape, numbered 1..k per image. Runs on the CPU."""
    from skimage.measure import label

    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if m.ndim == 2:
        return label(m.astype(bool)).astype(np.int32)
    return np.stack([label(x.astype(bool)) for x in m]).astype(np.int32).reshape(m.shape)


class DSBScore(Metric):
    """The competition score averaged over images: ``update(pred_labels, true_labels)`` with int
    label tensors ``(N, H, W)`` (0 background), ``compute()`` -> mean image score (0-dim).

    Scoring runs on the CPU with numpy; the states (sum of image scores, per-threshold sums and
    the image count) are summed across processes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, thresholds=THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(thresholds)
        # float32, not float64: some accelerators (MPS) have no float64.
        self.add_state("score_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("per_threshold_sum", default=torch.zeros(len(self.thresholds)), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        p = _as_numpy(pred)
        t = _as_numpy(target)
        if p.ndim == 2:
            p, t = p[None], t[None]
        total, per_t = 0.0, np.zeros(len(self.thresholds))
        for pi, ti in zip(p, t, strict=True):
            s = dsb_image_score(ti, pi, self.thresholds)
            total += s.score
            per_t += s.per_threshold
        self.score_sum += total
        self.per_threshold_sum += torch.as_tensor(per_t, dtype=self.per_threshold_sum.dtype, device=self.per_threshold_sum.device)
        self.count += len(p)

    def compute(self) -> torch.Tensor:
        return self.score_sum / self.count.clamp(min=1)

    def compute_per_threshold(self) -> torch.Tensor:
        """Mean score at each threshold ``(T,)``."""
        return self.per_threshold_sum / self.count.clamp(min=1)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
