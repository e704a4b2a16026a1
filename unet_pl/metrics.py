"""Metrics as plain functions with thin torchmetrics wrappers.

- ``pixel_mean_iou``: the notebook's ``mean_iou``: for each threshold t in 0.5, 0.55, ..., 0.95,
  TF's 2-class ``tf.metrics.mean_iou`` (IoU of background and of foreground, averaged over the
  classes present) of ``prob > t`` against the mask, then the mean over thresholds. The
  confusion matrices are accumulated over the whole set (as TF's streaming metric does over a
  Keras epoch), not averaged over batches.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric

#: The notebook's and the competition's IoU thresholds: 0.5, 0.55, ..., 0.95.
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def pixel_confusion(prob: torch.Tensor, target: torch.Tensor, thresholds=THRESHOLDS) -> torch.Tensor:
    """2x2 confusion matrix per threshold: ``(T, 2, 2)`` int64, rows truth, columns prediction.

    ``prob``: probabilities in [0, 1], any shape; ``target``: same shape, foreground where > 0.5.
    """
    truth = (target > 0.5).reshape(1, -1)
    t = torch.tensor(thresholds, device=prob.device, dtype=prob.dtype).reshape(-1, 1)
    pred = prob.reshape(1, -1) > t  # (T, P)
    tp = (pred & truth).sum(1)
    fp = (pred & ~truth).sum(1)
    fn = (~pred & truth).sum(1)
    tn = truth.numel() - tp - fp - fn
    return torch.stack([torch.stack([tn, fp], -1), torch.stack([fn, tp], -1)], -2).long()


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


class PixelMeanIoU(Metric):
    """``pixel_mean_iou`` accumulated over an epoch: ``update(prob, target)``, ``compute()``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("confmat", default=torch.zeros(len(THRESHOLDS), 2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        self.confmat += pixel_confusion(prob.detach().float(), target)

    def compute(self) -> torch.Tensor:
        return mean_iou_from_confusion(self.confmat)
