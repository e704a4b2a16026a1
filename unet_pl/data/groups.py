"""Acquisition groups of ``stage1_train`` and grouped folds that hold out whole groups.

The stratified hold-out (``unet_pl.data.holdout``) draws from the same acquisitions as training,
so it says little about a new kind of image. Here every image gets an acquisition group from
what its pixels say (read with the fixed intensity rule, as stored), and ``--holdout group:k/K``
holds out fold ``k`` of ``K``: whole groups, never seen in training.

    modality       ``image_modality``: fluorescence, brightfield or histology
    size           H x W of the image (acquisitions of the set differ in camera and field)
    fluorescence   the camera's black level: "offset" when the 1st percentile of the grey image
                   is above ``FLOOR_THRESHOLD`` (a background that never reaches black), else "dark".
                   The set's values are 0-6 and 8-24, nothing between.
    histology      the stain: "pink" when the mean colour's hue is above ``PINK_HUE`` degrees
                   (eosin-heavy, 305-322; the others 241-279), else "lavender" when the 99th
                   percentile of the grey image (the slide's background) is below
                   ``PALE_BACKGROUND`` (182-190 in the set), else "pale" (206-228)

Names read ``"fluorescence 256x256 dark"``, ``"histology 256x320 pink"``, ``"brightfield 1024x1024"``.
On the full ``stage1_train`` (670 images; ``python -m unet_pl.data.groups DIR`` prints it):

    ============================= ====== ==================
    group                         images fold (group:k/3)
    ============================= ====== ==================
    fluorescence 256x256 dark        190 3
    fluorescence 256x256 offset      144 2
    fluorescence 360x360 dark         91 1
    fluorescence 520x696 offset       49 1
    fluorescence 520x696 dark         43 1
    fluorescence 512x640 dark         13 2
    fluorescence 603x1272 dark         6 2
    fluorescence 260x347 offset        5 2
    fluorescence 256x320 dark          4 2
    fluorescence 1040x1388 dark        1 2
    brightfield 1024x1024             16 3
    histology 256x320 lavender        66 2
    histology 256x320 pale            38 1
    histology 256x320 pink             4 3
    ============================= ====== ==================

Folds of 3: 221 images (183 fluorescence, 38 histology), 239 (173, 66) and 210 (190, 16
brightfield, 4 histology).
(The counts are measured; ``tests/test_groups.py`` pins them when the full set is present.)
Nucleus scale was looked at too and left out: within one size it is unimodal (Otsu objects of
64-256 px in 256x256 fluorescence), so it gives no clean cut.

Folds (``assign_folds``): modalities in order of size, within one its groups largest first
(equal sizes in a seeded order); each group goes to the fold that holds the fewest images of its
modality so far, then the fewest images, then a seeded fold order. A modality with at least K
groups so has images in every fold; one with fewer (brightfield has one group) is held out by
that many folds only, and those folds train without it: the honest case of a new kind of image.
"""
from __future__ import annotations

import colorsys
import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .holdout import MODALITIES, image_modality, parse_group_holdout
from .images import read_image, resolve_train_dir, scan_train_dir
from .readers import channel_mean

log = logging.getLogger(__name__)

#: 1st-percentile grey (0..255) above which a fluorescence image's background has a camera offset.
FLOOR_THRESHOLD = 7.0
#: Hue (degrees) of the mean colour above which a histology image is pink (eosin-heavy) rather than purple.
PINK_HUE = 290.0
#: 99th-percentile grey (0..255) below which a purple histology slide is "lavender" (darker, more saturated background).
PALE_BACKGROUND = 198.0
#: The fold assignment's seed: it orders groups of equal size and breaks ties between folds.
GROUP_SEED = 2018
#: Folds crossval.py runs by default: histology has three stains, so each of 3 folds holds some out.
DEFAULT_FOLDS = 3


def acquisition_group(image: np.ndarray) -> str:
    """``image`` uint8 ``(H, W, 3)`` as ``read_image`` returns it (fixed intensity) -> its group name (module docstring)."""
    h, w = image.shape[:2]
    modality = image_modality(image)
    name = f"{modality} {h}x{w}"
    grey = channel_mean(image)
    if modality == "fluorescence":
        floor = float(np.percentile(grey, 1))
        return f"{name} {'offset' if floor > FLOOR_THRESHOLD else 'dark'}"
    if modality == "histology":
        r, g, b = (float(v) / 255 for v in image.reshape(-1, 3).mean(axis=0))
        hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        if hue > PINK_HUE:
            return f"{name} pink"
        return f"{name} {'lavender' if float(np.percentile(grey, 99)) < PALE_BACKGROUND else 'pale'}"
    return name


def group_modality(group: str) -> str:
    """The modality a group name starts with."""
    return group.split(" ", 1)[0]


def image_groups(paths: Mapping[str, Path], workers: int = 2) -> dict[str, str]:
    """``{id: group}`` for ``{id: image path}``; decodes each image once (``workers`` threads)."""
    ids = list(paths)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        groups = list(pool.map(lambda i: acquisition_group(read_image(paths[i])), ids))
    return dict(zip(ids, groups))


def folder_groups(train_dir: str | Path, workers: int = 2) -> dict[str, str]:
    """``{id: group}`` for every image of a ``stage1_train`` layout (decodes the images once)."""
    items = scan_train_dir(resolve_train_dir(train_dir), with_masks=False)
    return image_groups({it.id: it.image for it in items}, workers)


def assign_folds(groups: Sequence[str], folds: int, seed: int = GROUP_SEED) -> dict[str, int]:
    """``{group: fold}`` (folds numbered from 1) for the group of every image (module docstring).

    ``groups``: one group name per image (repeats count the group's images).
    """
    if folds < 2:
        raise ValueError(f"grouped cross-validation needs at least 2 folds, got {folds}")
    sizes = Counter(groups)
    rng = np.random.default_rng(seed)
    fold_rank = rng.permutation(folds)
    tie = dict(zip(sorted(sizes), rng.permutation(len(sizes))))
    by_modality = Counter()
    for g, n in sizes.items():
        by_modality[group_modality(g)] += n
    order = sorted(sizes, key=lambda g: (-by_modality[group_modality(g)], group_modality(g), -sizes[g], tie[g]))
    held = {m: [0] * folds for m in by_modality}
    total = [0] * folds
    out = {}
    for g in order:
        m = group_modality(g)
        f = min(range(folds), key=lambda f: (held[m][f], total[f], fold_rank[f]))
        held[m][f] += sizes[g]
        total[f] += sizes[g]
        out[g] = f + 1
    return out


def group_holdout(ids: Sequence[str], groups: Sequence[str], holdout: str) -> list[str]:
    """The ids ``holdout`` ("group:k/K") holds out among ``ids`` with their ``groups``: every image
    of the groups fold ``k`` of ``K`` holds. Sorted. ``ValueError`` when that fold is empty."""
    fold, folds = parse_group_holdout(holdout)
    ids, groups = [str(i) for i in ids], [str(g) for g in groups]
    if len(ids) != len(groups):
        raise ValueError(f"{len(ids)} ids but {len(groups)} groups")
    assigned = assign_folds(groups, folds)
    held = sorted(i for i, g in zip(ids, groups) if assigned[g] == fold)
    if not held:
        raise ValueError(f"--holdout {holdout}: fold {fold} of {folds} holds out no image: these {len(ids)} images "
                         f"form {len(set(groups))} acquisition groups; choose at most that many folds")
    counts = Counter(group_modality(groups[k]) for k, i in enumerate(ids) if assigned[groups[k]] == fold)
    log.info("hold-out %s: %d of %d images (%s) in %d groups", holdout, len(held), len(ids),
             ", ".join(f"{counts[m]} {m}" for m in MODALITIES), sum(f == fold for f in assigned.values()))
    return held


def group_table(groups: Mapping[str, str], folds: int = DEFAULT_FOLDS) -> list[tuple[str, int, int]]:
    """``[(group, images, fold)]``: modalities in ``MODALITIES`` order, largest groups first."""
    sizes = Counter(groups.values())
    assigned = assign_folds(list(groups.values()), folds)
    rank = {m: k for k, m in enumerate(MODALITIES)}
    return [(g, sizes[g], assigned[g]) for g in sorted(sizes, key=lambda g: (rank.get(group_modality(g), 9), -sizes[g], g))]


def main(argv: list[str] | None = None) -> None:
    """``python -m unet_pl.data.groups STAGE1_TRAIN [FOLDS]``: the group table of a folder."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m unet_pl.data.groups", description="the acquisition groups of a "
                                "stage1_train folder and the fold of K each is held out by")
    p.add_argument("data_dir", metavar="STAGE1_TRAIN")
    p.add_argument("folds", metavar="FOLDS", type=int, nargs="?", default=DEFAULT_FOLDS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    folds = args.folds
    try:
        groups = folder_groups(args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"{e}\n")
    rows = group_table(groups, folds)
    width = max(len(g) for g, _, _ in rows)
    print(f"{'group':<{width}} images fold of {folds}")
    for g, n, f in rows:
        print(f"{g:<{width}} {n:>6} {f}")
    print(f"{'total':<{width}} {len(groups):>6} {len(rows)} groups")


if __name__ == "__main__":
    main()
