"""Choose the post-processing on validation images, by the competition's score (StarDist's
``optimize_thresholds``): the probability threshold, the watershed seed threshold (boundary
models) and the minimum nucleus size. The network runs once per image; only the cheap steps
after it are repeated.

The search is a small grid, in two rounds: threshold x seed threshold with no size filter, then
the minimum size at the best pair. Ties keep the model's own threshold and minimum size (tried
first).

The seed threshold has one rule more: of the pairs scoring within ``SEED_TOLERANCE`` of the best,
the one with the largest seed threshold wins. A lower seed threshold makes more watershed seeds,
so more splits; on validation images of the kinds the model trained on, that often wins by a
hair (0.002), and on a kind it never saw it can split every nucleus in pieces (grouped
validation, docs/accuracy.md: one fold 0.233 at the tuned 0.1, 0.533 at 0.3). When validation
cannot tell them apart, the cautious one is kept.

The search runs twice on the same probabilities: with the model's post-processing, and with
``split_concave`` on (the recipe's ``--split-concave``: a cut that splits merged nuclei wants fewer
watershed seeds, so a higher seed threshold; grouped validation, docs/accuracy.md, fourteenth
session). The second choice goes under ``"split_concave"`` and prediction takes it with the cut.

The result goes into the model's hyperparameters (``LitUNet(postprocess=...)``) and so into its
checkpoint; prediction uses it by default.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

import numpy as np
from torch import nn

from ..metrics import dsb_image_score
from .predict import labels_from_probabilities, predict_images
from .settings import CUT_KEY, UNTRAINED_SCORE, Settings, untrained_warning  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

THRESHOLDS = (0.5, 0.4, 0.6, 0.3, 0.7)
SEED_THRESHOLDS = (0.5, 0.3, 0.2, 0.15, 0.1)
MIN_SIZES = (0, 10, 20, 40)
SEED_TOLERANCE = 0.005  # mean score; measured on ten grouped-validation checkpoints (docs/accuracy.md)


def score(probs: list[np.ndarray], truths: list[np.ndarray], settings: Settings) -> float:
    """Mean competition score of ``settings``' post-processing over the images."""
    return float(np.mean([dsb_image_score(t, labels_from_probabilities(p, settings)).score for p, t in zip(probs, truths)]))


def tune_postprocessing(net: nn.Module, samples: Iterable[tuple[np.ndarray, np.ndarray]], settings: Settings,
                        thresholds=THRESHOLDS, seed_thresholds=SEED_THRESHOLDS, min_sizes=MIN_SIZES,
                        seed_tolerance=SEED_TOLERANCE, cut: bool = True) -> tuple[dict, float]:
    """``samples``: ``(image uint8 (H, W, 3), true labels int (H, W))`` at full size.

    Returns ``({"threshold", "seed_threshold", "min_size"}, its mean score)``; with ``cut`` (and
    ``settings`` without ``split_concave``), the dict also holds ``"split_concave": {the same keys}``,
    searched with ``split_concave`` on. The seed threshold is searched only for watershed settings
    (else kept as it is).
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
    chosen, best_score = _search(probs, truths, base, thresholds, seed_thresholds, min_sizes, seed_tolerance)
    log.info("post-processing chosen on %d validation images: %s (score %.4f)", len(images), chosen, best_score)
    if cut and not base.split_concave:
        chosen[CUT_KEY], cut_score = _search(probs, truths, dataclasses.replace(base, split_concave=True), thresholds,
                                             seed_thresholds, min_sizes, seed_tolerance)
        log.info("with --split-concave: %s (score %.4f)", chosen[CUT_KEY], cut_score)
    return chosen, best_score


def _search(probs: list[np.ndarray], truths: list[np.ndarray], base: Settings, thresholds, seed_thresholds, min_sizes,
            seed_tolerance: float) -> tuple[dict, float]:
    """The grid search of ``tune_postprocessing`` from ``base`` (its other settings kept): the pair, then the minimum size."""
    # the model's own values first: on a tie they stay (the seed threshold goes up: choose_pair)
    seeds = _first(base.seed_threshold, seed_thresholds) if base.watershed else (base.seed_threshold,)
    surface = {(t, s): score(probs, truths, dataclasses.replace(base, threshold=t, seed_threshold=s))
               for t in _first(base.threshold, thresholds) for s in seeds}
    t, s = choose_pair(surface, seed_tolerance if base.watershed else 0.0)
    best, best_score = dataclasses.replace(base, threshold=t, seed_threshold=s), surface[t, s]
    for m in _first(base.min_size, min_sizes):
        candidate = dataclasses.replace(best, min_size=m)
        value = score(probs, truths, candidate)
        if value > best_score + 1e-9:
            best, best_score = candidate, value
    return {"threshold": best.threshold, "seed_threshold": best.seed_threshold, "min_size": int(best.min_size)}, best_score


def choose_pair(surface: dict[tuple[float, float], float], seed_tolerance: float = SEED_TOLERANCE) -> tuple[float, float]:
    """The (threshold, seed threshold) to keep from their mean scores, in the order they were tried.

    The largest seed threshold among the pairs within ``seed_tolerance`` of the best score (with
    0, among the pairs tied for the best); at that seed threshold, the best-scoring pair, the one
    tried first on a tie.
    """
    if not surface:
        raise ValueError("no (threshold, seed threshold) pairs were scored")
    top = max(surface.values())
    near = [pair for pair, value in surface.items() if value >= top - seed_tolerance - 1e-9]
    seed = max(s for _, s in near)
    return max((pair for pair in near if pair[1] == seed), key=surface.__getitem__)  # max keeps the first of equals


def _first(value, values) -> tuple:
    """``values`` with ``value`` moved (or put) in front."""
    return (value, *(v for v in values if v != value))
