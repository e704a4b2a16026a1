"""Probabilities -> nuclei: connected components (the notebook) or a seeded watershed, and the
size-aware clean-up (minimum nucleus size, hole filling). numpy, scipy and scikit-image only.

Every function takes and returns int32 label images ``(H, W)``: 0 background, 1..k one per
nucleus, numbered consecutively.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..perf import bincount

SPLITS = ("components", "watershed")


def relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels present to 1..k in increasing order of their old value; int32 (``labels`` itself when already so)."""
    return renumber(labels)


#: 8-connectivity: a pixel touches the eight around it (scikit-image's ``label`` default in 2-D).
EIGHT = np.ones((3, 3), bool)


def components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a bool mask, numbered in raster order: the notebook's
    ``skimage.measure.label``, computed with ``scipy.ndimage.label`` (the same labels; it spares
    prediction scikit-image's measure module at start-up)."""
    return ndi.label(np.asarray(mask, bool), EIGHT, output=np.int32)[0]


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop nuclei with fewer than ``min_size`` pixels and renumber 1..k (int32; ``labels`` itself when nothing changes)."""
    labels = np.asarray(labels)
    if min_size <= 1 or not labels.max(initial=0):
        return labels.astype(np.int32)
    return renumber(labels, min_size)


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill each nucleus' holes (background pixels it encloses) with its own label.

    Only background is filled: a nucleus lying inside another's hole keeps its pixels.
    """
    labels = np.asarray(labels).astype(np.int32)
    out = labels.copy()
    for k, sl in enumerate(ndi.find_objects(labels) if labels.size else [], start=1):
        if sl is None:
            continue
        own = labels[sl] == k
        holes = ndi.binary_fill_holes(own) & ~own & (labels[sl] == 0)
        if holes.any():
            out[sl][holes] = k
    return out


def split_nuclei(fg: np.ndarray, boundary: np.ndarray, threshold: float = 0.5, seed_threshold: float = 0.5,
                 min_seed: int = 4) -> np.ndarray:
    """Foreground and boundary probabilities -> nuclei, touching ones separated.

    ``fg``, ``boundary``: float ``(H, W)`` in [0, 1]. Seeds are the connected cores where
    ``fg > threshold`` and ``boundary < seed_threshold`` (cores under ``min_seed`` pixels are
    ignored: noise, not nuclei); a watershed on the boundary probability grows each seed over
    the foreground ``fg > threshold``, so two nuclei meet along the ridge the network drew
    between them. Foreground blobs that hold no seed (nuclei so small the boundary covers
    them) become one nucleus each, as connected components would make them.
    """
    return relabel(_split(fg, boundary, threshold, seed_threshold, min_seed))


def _split(fg: np.ndarray, boundary: np.ndarray, threshold: float, seed_threshold: float, min_seed: int) -> np.ndarray:
    """``split_nuclei`` before its renumbering: the nuclei in the same order, their numbers with gaps."""
    from skimage.segmentation import watershed

    fg, boundary = np.asarray(fg, np.float32), np.asarray(boundary, np.float32)
    if fg.shape != boundary.shape:
        raise ValueError(f"foreground {fg.shape} and boundary {boundary.shape} maps differ in shape")
    mask = fg > threshold
    core = mask & (boundary < seed_threshold)
    seeds = components(core)  # cores; those under min_seed pixels are not seeds
    core_seeds = seeds[core]  # the cores' pixels only: a fraction of the image to count and look up
    big = np.bincount(core_seeds, minlength=1) >= min_seed
    big[0] = False
    if big[1:].all():
        at = core
    else:
        at = np.zeros_like(core)
        at[core] = big[core_seeds]
    labels = np.zeros(mask.shape, np.int32)
    if at.any():
        # The watershed floods 4-connected from each seed inside the mask, so it never leaves the
        # seed's 4-connected blob: a blob with one seed becomes that nucleus whole, and only
        # blobs with two or more seeds need flooding, each in its own box. The same labels as one
        # watershed over the image, in about half the time on a 2048 x 2048 field.
        blobs, n = ndi.label(mask)
        k = len(big)
        pairs = np.unique(blobs[at].astype(np.int64) * k + seeds[at])  # (blob, seed) present
        blob_of, seed_of_pair = pairs // k, (pairs % k).astype(np.int32)
        count = np.bincount(blob_of, minlength=n + 1)
        single = count[blob_of] == 1
        seed_of = np.zeros(n + 1, np.int32)
        seed_of[blob_of[single]] = seed_of_pair[single]
        labels = seed_of[blobs]
        for b, box in enumerate(ndi.find_objects(blobs), start=1):
            if box is None or count[b] < 2:
                continue
            inside = blobs[box] == b
            flooded = watershed(boundary[box], np.where(inside & big[seeds[box]], seeds[box], 0), mask=inside)
            labels[box][inside] = flooded[inside]
    orphans = components(mask & (labels == 0))
    if orphans.max(initial=0):  # numbered after every seed, where no seed reached
        np.add(orphans, labels.max(initial=0), out=labels, where=orphans > 0)
    return labels


def ridge(prob: np.ndarray) -> np.ndarray:
    """The map the watershed seeds and floods on, from probabilities ``(C, H, W)``: the boundary
    (channel 1); with a distance channel (2, each pixel's depth in its nucleus) the larger of the
    boundary and ``(1 - depth) / 2``, so that a seed (ridge under the seed threshold s) needs both
    a boundary under s and a depth over ``1 - 2 s``, and nuclei meet where either output draws a
    line. The halving keeps the seed thresholds of the boundary head meaningful: at its native
    default 0.15 a seed needs a depth over 0.7, which a nucleus of 50 px still has (over 0.85 it
    would not)."""
    if prob.shape[0] < 3:
        return prob[1]
    return np.maximum(prob[1], 0.5 * (1.0 - prob[2]))


def renumber(labels: np.ndarray, min_size: int = 0) -> np.ndarray:
    """``remove_small(relabel(labels), min_size)`` in one pass: nuclei under ``min_size`` pixels
    dropped, the others numbered 1..k in the order of their old numbers; int32."""
    labels = np.asarray(labels)
    keep = bincount(labels) >= max(min_size, 1) if labels.size else np.zeros(1, bool)
    keep[0] = False
    if keep[1:].all():  # nothing to drop and already 1..k
        return labels.astype(np.int32, copy=False)
    new_id = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    return new_id[labels]


def probabilities_to_labels(prob: np.ndarray, threshold: float = 0.5, *, split: str | None = None,
                            seed_threshold: float = 0.5, min_size: int = 0, holes: bool = False,
                            min_relative_size: float = 0.0, min_probability: float = 0.0,
                            concave: bool = False) -> np.ndarray:
    """Model probabilities ``(C, H, W)`` (or ``(H, W)`` for one channel) -> int32 nuclei ``(H, W)``.

    ``split``: "components" (the notebook: 8-connected blobs of channel 0 > ``threshold``) or
    "watershed" (``split_nuclei`` with ``ridge(prob)`` as the boundary); None: watershed when there is
    a boundary channel. Then ``holes`` fills holes, nuclei under ``min_size`` pixels go, ``concave``
    cuts nuclei shaped like touching ones (``split_concave``; pieces under ``min_size`` go too), and
    ``remove_doubtful`` drops those under ``min_relative_size`` x the image's median nucleus area
    or with a mean foreground probability under ``min_probability`` (0: off).
    """
    prob = np.asarray(prob)
    if prob.ndim == 2:
        prob = prob[None]
    split = split or ("watershed" if prob.shape[0] > 1 else "components")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "watershed":
        if prob.shape[0] < 2:
            raise ValueError("the watershed split needs a boundary channel: a model trained with --head mask+boundary")
        labels = _split(prob[0], ridge(prob), threshold, seed_threshold, 4)  # split_nuclei's default min_seed
    else:
        labels = components(prob[0] > threshold)
    if holes:
        labels = fill_holes(labels)  # the same nuclei whatever their numbers
    labels = renumber(labels, min_size)
    if concave:
        labels = renumber(split_concave(labels), min_size)
    if min_relative_size > 0 or min_probability > 0:
        labels = remove_doubtful(labels, prob[0], min_relative_size, min_probability)
    return labels


#: ``split_concave``: a nucleus is a candidate when its solidity is under CONCAVE_SOLIDITY and its area at
#: least CONCAVE_MIN_AREA x the image's median; it is cut at peaks of its distance transform at least
#: CONCAVE_PEAK_DISTANCE x the median nucleus' radius apart and at least CONCAVE_PEAK_DEPTH x it deep.
#: Chosen on fold 1 of the grouped cross-validation (docs/accuracy.md, thirteenth session).
CONCAVE_SOLIDITY = 0.92
CONCAVE_MIN_AREA = 1.5
CONCAVE_PEAK_DISTANCE = 0.7
CONCAVE_PEAK_DEPTH = 0.6


def split_concave(labels: np.ndarray) -> np.ndarray:
    """Cut nuclei that look like two or more touching ones, by their shape: int32 labels, 1..k.

    Nuclei are convex, two touching nuclei that the watershed left in one piece are not (a waist
    where they meet). A nucleus with solidity (area over convex hull area, as regionprops) under
    CONCAVE_SOLIDITY and at least CONCAVE_MIN_AREA x the image's median nucleus area is cut by a
    watershed of its distance transform from its peaks (``skimage.feature.peak_local_max``) that
    lie at least CONCAVE_PEAK_DISTANCE x r apart and CONCAVE_PEAK_DEPTH x r deep, r the radius of
    the image's median nucleus (``sqrt(median area / pi)``). One peak: left whole. The first piece
    keeps the nucleus' place in the numbering, the others are numbered after the image's last.
    Images with fewer than 3 nuclei are left as they are (no median to speak of). Elongated or
    curved nuclei are concave too, and get cut across (spindle cells in tissue: docs/accuracy.md).
    """
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    from .measure import solidity

    labels = np.asarray(labels).astype(np.int32, copy=False)
    area = bincount(labels)
    present = np.flatnonzero(area[1:]) + 1
    if len(present) < 3:
        return renumber(labels)
    median = float(np.median(area[present]))
    radius = np.sqrt(median / np.pi)
    big = present[area[present] >= CONCAVE_MIN_AREA * median]
    candidates = big[solidity(labels, big) < CONCAVE_SOLIDITY]
    out = labels.copy()
    last = int(labels.max())
    boxes = ndi.find_objects(labels)
    for k in candidates:
        box = boxes[k - 1]
        own = labels[box] == k
        depth = ndi.distance_transform_edt(np.pad(own, 1))[1:-1, 1:-1]  # the image's edge is not the nucleus' edge
        peaks = peak_local_max(depth, min_distance=max(2, int(CONCAVE_PEAK_DISTANCE * radius)), labels=own.astype(np.int32),
                               exclude_border=False, threshold_abs=CONCAVE_PEAK_DEPTH * radius)
        if len(peaks) < 2:
            continue
        markers = np.zeros(own.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        pieces = watershed(-depth, markers, mask=own)
        sub = out[box]
        for j in range(2, len(peaks) + 1):
            last += 1
            sub[pieces == j] = last
    return renumber(out)


def remove_doubtful(labels: np.ndarray, fg: np.ndarray, min_relative_size: float = 0.0,
                    min_probability: float = 0.0) -> np.ndarray:
    """Drop nuclei smaller than ``min_relative_size`` times the image's median nucleus area, or
    whose mean foreground probability ``fg`` is under ``min_probability``; renumber 1..k.

    The specks a model adds around a few large nuclei are tiny next to them and faint: an absolute
    ``min_size`` small enough for images of small nuclei keeps them, a size relative to the
    image's own nuclei does not."""
    labels = np.asarray(labels)
    if not labels.max(initial=0):
        return labels.astype(np.int32)
    area = bincount(labels)
    keep = area > 0
    keep[0] = False
    if min_relative_size > 0:
        keep &= area >= min_relative_size * float(np.median(area[keep]))
    if min_probability > 0:
        keep &= label_means(labels, fg, area) >= min_probability
    new_id = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
    return new_id[labels]


def label_means(labels: np.ndarray, values: np.ndarray, area: np.ndarray | None = None) -> np.ndarray:
    """The mean of ``values`` ``(H, W)`` over each label's pixels: float64 ``(labels.max() + 1,)``,
    entry k for label k (0 for a label without pixels, and for the background, entry 0). ``area``:
    ``bincount(labels)`` when already counted. Only the labelled pixels are gathered (no image-sized
    float64 copy)."""
    flat = np.asarray(labels).ravel()
    area = bincount(flat) if area is None else area
    at = flat > 0
    sums = np.bincount(flat[at], weights=np.asarray(values).ravel()[at].astype(np.float64), minlength=len(area))
    return sums / np.maximum(area, 1)
