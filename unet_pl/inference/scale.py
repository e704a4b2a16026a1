"""Bring nuclei to the size the model learned: ``Settings.scale``.

A native-resolution model learns nuclei at the sizes of its training images. An image taken at
another magnification shows nuclei the network never saw at that size, and it splits large ones
into pieces or misses small ones. ``scale`` resizes each image before the network and the
probabilities back after it, so the post-processing (and ``min_size``) still work in the image's
own pixels:

    1.0      the image as it is (the default)
    a number the factor itself, e.g. 0.5 for images at twice the training magnification
    "auto"   a first pass at 1.0 without TTA measures the image's median nucleus area; the image
             is resized so that it falls inside AUTO_BAND: enlarged to the training images'
             typical median (TRAINING_MEDIAN_AREAS) when below it, shrunk to the band's top when
             above it; then it is predicted at that factor with the settings' TTA (without TTA
             and at 1.0, the first pass is the answer)
    "certainty" one pass at each of CERTAINTY_FACTORS (1 and 0.5) without TTA; the image keeps the
             factor at which the network is surest of its foreground (the mean of |2p - 1| over
             the image, ``certainty``), and is predicted there with the settings' TTA

The sizes were measured on the competition's 670 training images (per image, the median area of
its nuclei, from ``stage1_train_labels.csv``): 5th percentile 73 px, median 258 px, 95th
percentile 1,923 px. Until the eleventh session "auto" enlarged only images below the 5th
percentile. Enlarging every image whose nuclei are smaller than the typical median to it lets the
network cut more of the touching nuclei it leaves merged (on the grouped cross-validation, fold 2:
603 of 1,097 touching fluorescence pairs merged against 646) and raised the pooled score of both
seeds' fold checkpoints (+0.004, +0.007; docs/accuracy.md); enlarging larger nuclei costs (the
rule was chosen on fold 2, then held on folds 1 and 3). Until the twelfth session "auto" shrank
only images above the 95th percentile (to the median); shrinking every image whose nuclei are
above 500 px to 500 px raised fold 1's score of the recipe's checkpoints from 0.525 to 0.543 and
0.544 to 0.547 (two seeds; its large-nucleus fluorescence gains most; the top of the band was chosen
there among 400-1,923 px, then held on folds 2 and 3, +0.003 and +0.000: docs/accuracy.md). The
rule is fixed, not fitted per model.

"certainty" is for images whose nuclei are inside the training sizes but whose texture the model
reads as pieces (grainy or speckled nuclei): half size smooths the grain. On the grouped
cross-validation it chose 0.5 for 3-7% of the images and raised the pooled score by 0.008 and
0.007 with the fold checkpoints of two seeds trained without ``--augment texture``; with models
trained with it (the recipe now) it is neutral (docs/accuracy.md). Without TTA it costs a quarter of a pass more
per image (the chosen pass is kept); with TTA, 1.25 plain passes before the augmented one.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Per-image median nucleus area (px) of stage1_train: (5th percentile, median, 95th percentile).
TRAINING_MEDIAN_AREAS = (73.0, 258.0, 1923.0)
#: The median nucleus areas (px) "auto" leaves as they are: from the training median to the top the
#: grouped cross-validation chose (fold 1; 400-650 px scored alike there, 1,923 px was the old top).
AUTO_BAND = (TRAINING_MEDIAN_AREAS[1], 500.0)
#: "auto" needs this many nuclei in the first pass to measure a median.
MIN_NUCLEI = 3
#: The factor "auto" may choose, at most (and 1 / it at least).
MAX_FACTOR = 4.0
#: The factors "certainty" chooses between; the first wins a tie.
CERTAINTY_FACTORS = (1.0, 0.5)
#: The scale modes that choose a factor per image.
MODES = ("auto", "certainty")


def check_scale(scale: float | str) -> float | str:
    """``scale`` when it is one of MODES or a factor in [1/8, 8], else ``ValueError`` saying so."""
    if scale in MODES:
        return scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale is 'auto', 'certainty' or a factor such as 0.5, got {scale!r}") from None
    if not 0.125 <= value <= 8:
        raise ValueError(f"scale {value:g} is out of range: use a factor between 0.125 and 8, 'auto' or 'certainty'")
    return value


def largest_factor(scale: float | str) -> float:
    """The largest factor ``scale`` may resize an image by (how big the network may see it)."""
    return MAX_FACTOR if scale == "auto" else max(CERTAINTY_FACTORS) if scale == "certainty" else float(scale)


def certainty(prob: torch.Tensor) -> float:
    """How sure the network is of an image's foreground: the mean of |2p - 1| over the first
    channel of probabilities ``(N, C, H, W)`` (1: every pixel 0 or 1; 0: every pixel 0.5)."""
    return float(prob[:, 0].double().mul(2).sub(1).abs().mean())


def auto_factor(labels: np.ndarray, band: tuple[float, float] = AUTO_BAND) -> float:
    """The resize factor "auto" takes for an image whose first-pass nuclei are ``labels``: 1.0
    while their median area lies inside ``band`` (or there are fewer than MIN_NUCLEI), else the
    factor that brings it to the band's nearer end, within MAX_FACTOR."""
    counts = np.bincount(np.asarray(labels).ravel())[1:]
    counts = counts[counts > 0]
    if len(counts) < MIN_NUCLEI:
        return 1.0
    median = float(np.median(counts))
    lo, hi = band
    if lo <= median <= hi:
        return 1.0
    target = lo if median < lo else hi
    return float(np.clip(math.sqrt(target / median), 1 / MAX_FACTOR, MAX_FACTOR))


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, C, H, W)`` uint8 or float -> the same dtype at ``size``: bilinear, antialiased when shrinking."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    shrink = size[0] < h or size[1] < w
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return y.round_().clamp_(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else y


def scaled_size(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """The image's size times ``factor``, at least 16 pixels a side."""
    return tuple(max(16, round(n * factor)) for n in shape)
