"""A fixed, seeded, modality-stratified hold-out of ``stage1_train`` that nothing trains on.

The competition's 670 training images come from three kinds of microscopy, told apart by
pixel statistics alone (as the bundled sample's README picks them):

    fluorescence  grey (the three channels equal), dark: bright nuclei on black (546 images)
    brightfield   grey, light background, dark nuclei (16)
    histology     colour (H&E-stained tissue, purple on white) (108)

``holdout_ids(train_dir)`` takes ``round(fraction * n)`` images of each modality (at least one
where a modality has two or more images) by a seeded shuffle of the sorted ids, so the split
depends only on the folder's contents, the fraction and the seed: every command that passes
``--holdout stratified`` (train.py excludes the images; predict.py and evaluate.py restrict to
them) sees the same 68 images of the full set (55 fluorescence, 2 brightfield, 11 histology).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .images import read_image, resolve_train_dir, scan_train_dir

log = logging.getLogger(__name__)

MODALITIES = ("fluorescence", "brightfield", "histology")
HOLDOUTS = ("none", "stratified")
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 2018
#: Mean |R-G| + |G-B| (0..255 scale) above which an image is colour. Grey images of the set
#: score < 1, the colour ones > 15: any value in between gives the same split.
COLOUR_THRESHOLD = 5.0
#: Mean brightness above which a grey image is brightfield (fluorescence < 60, brightfield > 200).
BRIGHT_THRESHOLD = 128.0


def image_modality(image: np.ndarray) -> str:
    """``image`` uint8 ``(H, W, 3)`` -> "fluorescence", "brightfield" or "histology" (see the module docstring)."""
    f = image.astype(np.float32)
    colour = float(np.abs(f[..., 0] - f[..., 1]).mean() + np.abs(f[..., 1] - f[..., 2]).mean())
    bright = float(f.mean()) > BRIGHT_THRESHOLD
    if colour > COLOUR_THRESHOLD:
        return "histology" if bright else "fluorescence"  # a dark colour image: tinted fluorescence
    return "brightfield" if bright else "fluorescence"


def stratified_split(ids: Sequence[str], strata: Sequence[str], fraction: float = HOLDOUT_FRACTION,
                     seed: int = HOLDOUT_SEED) -> list[str]:
    """The held-out ids: per stratum, ``round(fraction * n)`` ids (>= 1 when n >= 2) of a seeded shuffle. Sorted."""
    if len(ids) != len(strata):
        raise ValueError(f"{len(ids)} ids but {len(strata)} strata")
    if not 0 < fraction < 1:
        raise ValueError(f"the hold-out fraction must lie in (0, 1), got {fraction}")
    out: list[str] = []
    for k, name in enumerate(sorted(set(strata))):
        members = sorted(i for i, s in zip(ids, strata) if s == name)
        n = len(members)
        take = 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))
        # One generator per stratum, seeded by (seed, stratum index): adding images of one
        # modality does not reshuffle the others.
        perm = np.random.default_rng([seed, k]).permutation(n)
        out += [members[j] for j in perm[:take]]
    return sorted(out)


def folder_modalities(train_dir: str | Path, workers: int = 2) -> dict[str, str]:
    """``{image id: modality}`` for every image folder of a ``stage1_train`` layout (decodes the images)."""
    items = scan_train_dir(resolve_train_dir(train_dir), with_masks=False)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        mods = list(pool.map(lambda it: image_modality(read_image(it.image)), items))
    return {it.id: m for it, m in zip(items, mods)}


def holdout_from_modalities(ids: Sequence[str], modalities: Sequence[str], holdout: str = "stratified",
                            fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> list[str]:
    """The ids ``holdout`` names among ``ids`` of known modality: "none" -> ``[]``; "stratified" -> ``stratified_split``."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"unknown hold-out {holdout!r}; choose one of {', '.join(HOLDOUTS)}")
    if holdout == "none":
        return []
    ids, modalities = [str(i) for i in ids], [str(m) for m in modalities]
    held = stratified_split(ids, modalities, fraction, seed)
    mods = dict(zip(ids, modalities))
    counts = {m: sum(mods[i] == m for i in held) for m in MODALITIES}
    log.info("hold-out: %d of %d images (%s)", len(held), len(ids), ", ".join(f"{v} {k}" for k, v in counts.items()))
    return held


def holdout_ids(train_dir: str | Path, holdout: str = "stratified", fraction: float = HOLDOUT_FRACTION,
                seed: int = HOLDOUT_SEED, workers: int = 2) -> list[str]:
    """The ids ``--holdout`` names in a ``stage1_train`` folder (decodes every image; a training run's
    data module and checkpoint have them without that: ``NucleiDataModule.holdout_ids``)."""
    if holdout not in HOLDOUTS:
        raise ValueError(f"unknown hold-out {holdout!r}; choose one of {', '.join(HOLDOUTS)}")
    if holdout == "none":
        return []
    mods = folder_modalities(train_dir, workers)
    return holdout_from_modalities(list(mods), list(mods.values()), holdout, fraction, seed)


def keep_ids(all_ids: Iterable[str], excluded: Iterable[str]) -> np.ndarray:
    """Indices into ``all_ids`` of the ids not in ``excluded``."""
    ex = set(excluded)
    return np.array([k for k, i in enumerate(all_ids) if str(i) not in ex], dtype=np.int64)
