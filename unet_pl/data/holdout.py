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

``--holdout group:k/K`` names another kind of hold-out: fold ``k`` of ``K`` of the grouped
cross-validation, whole acquisition groups that training never sees (``unet_pl.data.groups``).
``HOLDOUTS`` accepts those names (``"group:2/3" in HOLDOUTS``), so every ``--holdout`` flag does.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .images import read_image, resolve_train_dir, scan_train_dir
from .readers import COLOUR_THRESHOLD

log = logging.getLogger(__name__)

MODALITIES = ("fluorescence", "brightfield", "histology")
GROUP_PREFIX = "group:"


class _HoldoutNames(tuple):
    """The hold-out names: iterates as ``("none", "stratified", "group:k/K")`` (for help texts and
    messages); ``in`` also holds every well-formed ``group:k/K`` (for argparse ``choices``)."""

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith(GROUP_PREFIX):
            try:
                parse_group_holdout(name)
            except ValueError:
                return False
            return True
        return tuple.__contains__(self, name)


HOLDOUTS = _HoldoutNames(("none", "stratified", GROUP_PREFIX + "k/K"))
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 2018
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


def parse_group_holdout(name: str) -> tuple[int, int]:
    """``"group:k/K"`` -> ``(k, K)``: fold ``k`` (1..K) of ``K >= 2``; ``ValueError`` saying what is wrong."""
    m = re.fullmatch(re.escape(GROUP_PREFIX) + r"(\d+)/(\d+)", name)
    if m is None:
        raise ValueError(f"hold-out {name!r}: a grouped fold is named group:k/K, e.g. group:2/3 for fold 2 of 3")
    fold, folds = int(m.group(1)), int(m.group(2))
    if folds < 2:
        raise ValueError(f"hold-out {name!r}: grouped cross-validation needs K >= 2 folds")
    if not 1 <= fold <= folds:
        raise ValueError(f"hold-out {name!r}: fold {fold} does not exist; the folds of {folds} are numbered 1 to {folds}")
    return fold, folds


def check_holdout(name: str) -> str:
    """``name`` when it is a hold-out name (``HOLDOUTS``), else ``ValueError`` naming the choices or the fault."""
    if name.startswith(GROUP_PREFIX):
        parse_group_holdout(name)
        return name
    if name not in HOLDOUTS:
        raise ValueError(f"unknown hold-out {name!r}; choose one of {', '.join(HOLDOUTS)}")
    return name


def is_group_holdout(name: str) -> bool:
    """Whether ``name`` names a grouped fold (``group:k/K``)."""
    return name.startswith(GROUP_PREFIX)


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
    """The ids ``holdout`` names among ``ids`` of known modality: "none" -> ``[]``; "stratified" -> ``stratified_split``.
    (A grouped fold needs each image's group: ``unet_pl.data.groups.group_holdout``.)"""
    check_holdout(holdout)
    if is_group_holdout(holdout):
        raise ValueError(f"hold-out {holdout}: a grouped fold needs each image's acquisition group, not only its "
                         "modality (unet_pl.data.groups.group_holdout)")
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
    data module and checkpoint have them without that: ``NucleiDataModule.holdout_ids``).
    ``group:k/K``: the images of the acquisition groups of fold k (``unet_pl.data.groups``)."""
    check_holdout(holdout)
    if holdout == "none":
        return []
    if is_group_holdout(holdout):
        from .groups import folder_groups, group_holdout  # groups imports this module

        groups = folder_groups(train_dir, workers)
        return group_holdout(list(groups), list(groups.values()), holdout)
    mods = folder_modalities(train_dir, workers)
    return holdout_from_modalities(list(mods), list(mods.values()), holdout, fraction, seed)


def keep_ids(all_ids: Iterable[str], excluded: Iterable[str]) -> np.ndarray:
    """Indices into ``all_ids`` of the ids not in ``excluded``."""
    ex = set(excluded)
    return np.array([k for k, i in enumerate(all_ids) if str(i) not in ex], dtype=np.int64)
