"""Choose the post-processing on validation images, by the competition's score (StarDist's
``optimize_thresholds``): the probability threshold, the watershed seed threshold (boundary
models) and the minimum nucleus size. The network runs once per image; only the cheap steps
after it are repeated.

The search is a small grid, in two rounds: threshold x seed threshold with no size filter, then
the minimum size at the best pair. Ties keep the model's own values (tried first), so a flat
score surface changes nothing. The result goes into the model's hyperparameters
(``LitUNet(postprocess=...)``) and so into its checkpoint; prediction uses it by default.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
from torch import nn

from ..metrics import dsb_image_score
from .predict import labels_from_probabilities, predict_images
from .settings import Settings

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.4, 0.6, 0.3, 0.7)
SEED_THRESHOLDS = (0.5, 0.3, 0.2, 0.15, 0.1)
MIN_SIZES = (0, 10, 20, 40)


def score(probs: list[np.ndarray], truths: list[np.ndarray], settings: Settings) -> float:
    """Mean competition score of ``settings``' post-processing over the images."""
    return float(np.mean([dsb_image_score(t, labels_from_probabilities(p, settings)).score for p, t in zip(probs, truths)]))


def tune_postprocessing(net: nn.Module, samples: Iterable[tuple[np.ndarray, np.ndarray]], settings: Settings,
                        thresholds=THRESHOLDS, seed_thresholds=SEED_THRESHOLDS, min_sizes=MIN_SIZES) -> tuple[dict, float]:
    """``samples``: ``(image uint8 (H, W, 3), true labels int (H, W))`` at full size.

    Returns ``({"threshold", "seed_threshold", "min_size"}, best mean score)``. The seed threshold
    is searched only for watershed settings (else kept as it is).
    """
    images, truths = [], []
    for image, labels in samples:
        images.append(image)
        truths.append(np.asarray(labels))
    if not images:
        raise ValueError("no validation images to choose the post-processing on")
    # samples come decoded (read with the model's channel and intensity rule already)
    base = dataclasses.replace(settings.decoded(), tta="none", min_size=0, fill_holes=False)
    probs = list(predict_images(net, images, base))
    # the model's own values first: on a tie (a flat score surface) they stay
    seeds = _first(base.seed_threshold, seed_thresholds) if base.watershed else (base.seed_threshold,)
    best, best_score = base, -1.0
    for t in _first(base.threshold, thresholds):
        for s in seeds:
            candidate = dataclasses.replace(base, threshold=t, seed_threshold=s)
            value = score(probs, truths, candidate)
            if value > best_score + 1e-9:
                best, best_score = candidate, value
    for m in _first(base.min_size, min_sizes):
        candidate = dataclasses.replace(best, min_size=m)
        value = score(probs, truths, candidate)
        if value > best_score + 1e-9:
            best, best_score = candidate, value
    chosen = {"threshold": best.threshold, "seed_threshold": best.seed_threshold, "min_size": int(best.min_size)}
    log.info("post-processing chosen on %d validation images: %s (score %.4f)", len(images), chosen, best_score)
    return chosen, best_score


def _first(value, values) -> tuple:
    """``values`` with ``value`` moved (or put) in front."""
    return (value, *(v for v in values if v != value))
