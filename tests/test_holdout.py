"""The fixed, modality-stratified hold-out (unet_pl.holdout)."""
from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from unet_pl.data.holdout import folder_modalities, holdout_ids, image_modality, keep_ids, stratified_split


def test_modality_from_pixel_statistics():
    dark_grey = np.full((8, 8, 3), 12, np.uint8)
    light_grey = np.full((8, 8, 3), 220, np.uint8)
    purple = np.zeros((8, 8, 3), np.uint8) + np.array([180, 120, 200], np.uint8)
    assert image_modality(dark_grey) == "fluorescence"
    assert image_modality(light_grey) == "brightfield"
    assert image_modality(purple) == "histology"


def test_stratified_split_is_seeded_per_stratum_and_rounds():
    ids = [f"f{i:03d}" for i in range(50)] + [f"b{i}" for i in range(3)] + ["lonely"]
    strata = ["fl"] * 50 + ["bf"] * 3 + ["solo"]
    out = stratified_split(ids, strata, 0.1, seed=1)
    assert out == sorted(out) and out == stratified_split(ids, strata, 0.1, seed=1)
    counts = Counter(s for i, s in zip(ids, strata) if i in out)
    assert counts == {"fl": 5, "bf": 1}  # 10% of 50; at least one of 3; never the only image of a stratum
    assert out != stratified_split(ids, strata, 0.1, seed=2)
    # Adding images to one stratum leaves the other's pick alone.
    more = stratified_split(ids + ["b3", "b4"], strata + ["bf", "bf"], 0.1, seed=1)
    assert [i for i in more if i.startswith("f")] == [i for i in out if i.startswith("f")]
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(ids, strata, 0.0)


def test_sample_holdout_covers_every_modality(sample_dir):
    mods = folder_modalities(sample_dir)
    assert Counter(mods.values()) == {"fluorescence": 21, "histology": 7, "brightfield": 2}  # as sample/README.md says
    ids = holdout_ids(sample_dir)
    assert Counter(mods[i] for i in ids) == {"fluorescence": 2, "histology": 1, "brightfield": 1}
    assert holdout_ids(sample_dir, "none") == []
    kept = keep_ids(sorted(mods), ids)
    assert len(kept) == 26 and not set(np.array(sorted(mods))[kept]) & set(ids)
    with pytest.raises(ValueError, match="none, stratified"):
        holdout_ids(sample_dir, "random")


def test_full_set_holdout_is_pinned(real_train_dir):
    ids = holdout_ids(real_train_dir)
    mods = folder_modalities(real_train_dir)
    assert Counter(mods.values()) == {"fluorescence": 546, "histology": 108, "brightfield": 16}
    assert Counter(mods[i] for i in ids) == {"fluorescence": 55, "histology": 11, "brightfield": 2}
    # The README's hold-out scores were measured on exactly these 68 images.
    assert hashlib.sha256(",".join(ids).encode()).hexdigest()[:16] == "cbd3619e314a044b"


@pytest.mark.parametrize("intensity", ["fixed", "percentile", "grey", "hematoxylin"])
def test_the_data_modules_stratified_holdout_is_the_folders_whatever_the_intensity_rule(sample_dir, tmp_path, intensity):
    """train.py holds out what predict.py and evaluate.py score: the data module's stratified hold-out
    (from its cache) is ``holdout_ids`` of the folder (the files as stored) under every intensity
    rule, though grey makes the sample's H&E look like fluorescence (a grey model once trained on
    most of the hold-out and held out other images)."""
    from unet_pl import NucleiDataModule

    dm = NucleiDataModule(sample_dir, resolution="native", holdout="stratified", intensity=intensity,
                          cache_dir=tmp_path, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.holdout_ids == holdout_ids(sample_dir)
    assert Counter(dm.arrays["modalities"]) == {"fluorescence": 21, "histology": 7, "brightfield": 2}
