"""Acquisition groups and grouped folds (unet_pl.data.groups), and the group:k/K hold-out names."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from unet_pl.data.groups import (
    FLOOR_THRESHOLD, acquisition_group, assign_folds, folder_groups, group_holdout, group_modality, group_table,
)
from unet_pl.data.holdout import HOLDOUTS, check_holdout, holdout_from_modalities, holdout_ids, parse_group_holdout


def flat(h: int, w: int, rgb, spots=(255, 255, 255)) -> np.ndarray:
    """An ``(h, w, 3)`` uint8 image of colour ``rgb`` with a few nucleus-like squares of ``spots``."""
    image = np.zeros((h, w, 3), np.uint8) + np.array(rgb, np.uint8)
    image[4:10, 4:10] = spots
    image[20:26, 30:36] = spots
    return image


def test_groups_from_size_black_level_and_stain():
    dark, offset = flat(40, 48, (2, 2, 2), (200, 200, 200)), flat(40, 48, (12, 12, 12), (200, 200, 200))
    assert acquisition_group(dark) == "fluorescence 40x48 dark"
    assert acquisition_group(offset) == "fluorescence 40x48 offset"
    assert acquisition_group(flat(64, 40, (2, 2, 2), (200, 200, 200))) == "fluorescence 64x40 dark"  # H x W
    # The black level is the 1st percentile: nuclei covering most of the field do not move it.
    crowded = np.full((40, 48, 3), 100, np.uint8)
    crowded[:2] = int(FLOOR_THRESHOLD) + 2
    assert acquisition_group(crowded) == "fluorescence 40x48 offset"
    crowded[:2] = 0
    assert acquisition_group(crowded) == "fluorescence 40x48 dark"
    assert acquisition_group(flat(40, 48, (220, 220, 220), (60, 60, 60))) == "brightfield 40x48"
    purple_nuclei = (90, 40, 140)
    assert acquisition_group(flat(32, 40, (180, 160, 205), purple_nuclei)) == "histology 32x40 lavender"  # background ~182
    assert acquisition_group(flat(32, 40, (205, 200, 215), purple_nuclei)) == "histology 32x40 pale"  # background ~207
    assert acquisition_group(flat(32, 40, (195, 115, 185), purple_nuclei)) == "histology 32x40 pink"  # hue ~308
    assert group_modality("histology 32x40 pink") == "histology"


def synthetic_groups() -> tuple[list[str], list[str]]:
    """ids and groups: fluorescence groups of 50, 30, 20, 10 and 5 images, histology of 12, 8 and 3, brightfield 6."""
    sizes = {"fluorescence 256x256 dark": 50, "fluorescence 256x256 offset": 30, "fluorescence 360x360 dark": 20,
             "fluorescence 520x696 dark": 10, "fluorescence 603x1272 dark": 5, "histology 256x320 lavender": 12,
             "histology 256x320 pale": 8, "histology 256x320 pink": 3, "brightfield 1024x1024": 6}
    groups = [g for g, n in sizes.items() for _ in range(n)]
    return [f"img{k:03d}" for k in range(len(groups))], groups


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_folds_hold_out_whole_groups_every_image_once(folds):
    ids, groups = synthetic_groups()
    held = [group_holdout(ids, groups, f"group:{k}/{folds}") for k in range(1, folds + 1)]
    assert sorted(i for fold in held for i in fold) == sorted(ids)  # every image exactly once
    group_of = dict(zip(ids, groups))
    for k, fold in enumerate(held):
        inside = {group_of[i] for i in fold}
        others = {group_of[i] for j, f in enumerate(held) if j != k for i in f}
        assert not inside & others  # a group is never split between folds
        assert Counter(group_of[i] for i in fold) == {g: groups.count(g) for g in inside}
    per_modality = [Counter(group_modality(group_of[i]) for i in fold) for fold in held]
    n_groups = Counter(group_modality(g) for g in set(groups))
    for m, n in n_groups.items():
        holding = sum(c[m] > 0 for c in per_modality)
        assert holding == min(n, folds), (m, holding)  # every fold where the modality has >= K groups
        counts = [c[m] for c in per_modality]
        largest = max(groups.count(g) for g in set(groups) if group_modality(g) == m)
        assert max(counts) - min(counts) <= largest  # greedy balance: off by at most one group


def test_folds_are_deterministic_and_independent_of_order():
    ids, groups = synthetic_groups()
    first = assign_folds(groups, 3)
    pairs = list(zip(ids, groups))
    random.Random(0).shuffle(pairs)
    assert assign_folds([g for _, g in pairs], 3) == first
    assert group_holdout(*zip(*pairs), "group:2/3") == group_holdout(ids, groups, "group:2/3")
    assert sorted(set(first.values())) == [1, 2, 3]


def test_more_folds_than_groups_is_an_error():
    ids, groups = ["a", "b", "c"], ["fluorescence 8x8 dark", "fluorescence 8x8 dark", "histology 8x8 pale"]
    errors = []
    for k in (1, 2, 3):
        try:
            group_holdout(ids, groups, f"group:{k}/3")
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and "2 acquisition groups; choose at most that many folds" in errors[0]
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(groups, 1)


@pytest.mark.parametrize("name, words", [
    ("group:5/4", "fold 5 does not exist; the folds of 4 are numbered 1 to 4"),
    ("group:0/4", "fold 0 does not exist"),
    ("group:1/1", "K >= 2"),
    ("group:2", "named group:k/K"),
    ("group:k/K", "named group:k/K"),
    ("random", "choose one of none, stratified, group:k/K"),
])
def test_bad_holdout_names(name, words):
    with pytest.raises(ValueError, match=words):
        check_holdout(name)
    assert name not in HOLDOUTS


def test_good_holdout_names():
    assert parse_group_holdout("group:2/4") == (2, 4)
    for name in ("none", "stratified", "group:1/2", "group:12/12"):
        assert name in HOLDOUTS and check_holdout(name) == name
    with pytest.raises(ValueError, match="acquisition group"):
        holdout_from_modalities(["a", "b"], ["fluorescence"] * 2, "group:1/2")


@pytest.mark.parametrize("module", ["train", "evaluate", "predict"])
def test_every_holdout_flag_takes_group_names_and_refuses_bad_ones_in_one_line(module, capsys):
    import importlib

    parser = importlib.import_module(f"unet_pl.cli.{module}").build_parser()
    required = {"train": [], "evaluate": ["--pred", "p.csv", "--truth", "t"], "predict": ["--data-dir", "d"]}[module]
    assert parser.parse_args([*required, "--holdout", "group:2/3"]).holdout == "group:2/3"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*required, "--holdout", "group:5/4"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "group:5/4" in err
    if module != "predict":  # predict's flag only says "invalid choice" (choices=HOLDOUTS without the type check)
        assert "numbered 1 to 4" in err


def test_sample_folds_cover_every_image_once(sample_dir):
    groups = folder_groups(sample_dir)
    assert len(groups) == 30 and set(map(group_modality, groups.values())) == {"fluorescence", "brightfield", "histology"}
    held = [holdout_ids(sample_dir, f"group:{k}/3") for k in (1, 2, 3)]
    assert sorted(i for fold in held for i in fold) == sorted(groups)
    assert held[1] == group_holdout(list(groups), list(groups.values()), "group:2/3")


def test_data_module_holds_out_the_fold_and_keeps_it_in_the_checkpoint(sample_dir, tmp_path):
    from unet_pl import NucleiDataModule

    dm = NucleiDataModule(sample_dir, img_size=32, num_workers=0, cache_dir=tmp_path, holdout="group:1/3", progress=False)
    dm.prepare_data()
    dm.setup("fit")
    expected = holdout_ids(sample_dir, "group:1/3")
    assert dm.holdout_ids == expected and expected
    ids = dm.arrays["ids"]
    used = {str(ids[j]) for j in [*dm.train_set.indices, *dm.val_set.indices]}
    assert not used & set(expected) and len(used) + len(expected) == 30
    assert dm.state_dict() == {"holdout": "group:1/3", "holdout_ids": expected}
    with pytest.raises(ValueError, match="fold 4 does not exist"):
        NucleiDataModule(sample_dir, holdout="group:4/3")


def test_full_set_groups_are_pinned(real_train_dir):
    """The table in unet_pl.data.groups' docstring and docs/accuracy.md."""
    rows = group_table(folder_groups(real_train_dir), 3)
    assert [(g, n) for g, n, _ in rows] == [
        ("fluorescence 256x256 dark", 190), ("fluorescence 256x256 offset", 144), ("fluorescence 360x360 dark", 91),
        ("fluorescence 520x696 offset", 49), ("fluorescence 520x696 dark", 43), ("fluorescence 512x640 dark", 13),
        ("fluorescence 603x1272 dark", 6), ("fluorescence 260x347 offset", 5), ("fluorescence 256x320 dark", 4),
        ("fluorescence 1040x1388 dark", 1), ("brightfield 1024x1024", 16), ("histology 256x320 lavender", 66),
        ("histology 256x320 pale", 38), ("histology 256x320 pink", 4)]
    assert [f for _, _, f in rows] == [3, 2, 1, 1, 1, 2, 2, 2, 2, 2, 3, 2, 1, 3]


def test_groups_module_usage_and_a_missing_folder_are_one_line_with_status_2(tmp_path):
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "unet_pl.data.groups", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "STAGE1_TRAIN" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "unet_pl.data.groups", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nope" in bad.stderr
