"""Run-length encoding in the competition's format: pixels from 1, column-major, 'start length'."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from unet_pl.rle import decode, decode_labels, encode, encode_labels

from conftest import REAL_DATA_DIR as DSB  # noqa: E402


def test_encode_known_strings():
    m = np.zeros((4, 3), bool)
    assert encode(m) == ""
    m[0:3, 0] = True  # pixels 1, 2, 3 (first column, top to bottom)
    assert encode(m) == "1 3"
    m[1, 2] = True  # row 1 of column 2: 2 * 4 + 1 + 1 = 10
    assert encode(m) == "1 3 10 1"
    m[3, 0] = True
    m[0, 1] = True  # the run continues from the bottom of column 0 to the top of column 1
    assert encode(m) == "1 5 10 1"
    assert encode(np.ones((2, 2), bool)) == "1 4"


def test_decode_known_strings():
    expected = np.array([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0]], bool)
    assert (decode("1 3 10 1", (4, 3)) == expected).all()
    assert not decode("", (4, 3)).any()
    assert decode("1 12", (4, 3)).all()
    assert (decode("  1 3\t10 1\n", (4, 3)) == expected).all()  # any whitespace separates


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (3, 7), (64, 64), (161, 519)])
def test_round_trip_random(shape):
    rng = np.random.default_rng(sum(shape))
    for p in (0.0, 0.1, 0.5, 0.9, 1.0):
        m = rng.random(shape) < p
        assert (decode(encode(m), shape) == m).all()


def test_encode_labels_matches_per_label_encode():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, (37, 23)) * (rng.random((37, 23)) < 0.5)
    present = [k for k in range(1, 6) if (labels == k).any()]
    assert encode_labels(labels) == [encode(labels == k) for k in present]
    assert encode_labels(np.zeros((3, 3), int)) == []
    for shape in ((1, 9), (9, 1), (2, 2), (64, 3)):  # one row, one column, runs across columns
        dense = rng.integers(0, 3, shape)
        assert encode_labels(dense) == [encode(dense == k) for k in (1, 2) if (dense == k).any()], shape
    wrap = np.zeros((3, 3), int)
    wrap[2, 0] = wrap[0, 1] = 4  # column 0's bottom and column 1's top: one run, pixels 3 and 4
    assert encode_labels(wrap) == ["3 2"]
    restored = decode_labels(encode_labels(labels), labels.shape)
    # Labels come back numbered by row; same partition of pixels.
    for k, new in zip(present, range(1, len(present) + 1)):
        assert ((restored == new) == (labels == k)).all()


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 2 3", "odd number"),
        ("1 x", "not an integer"),
        ("1.5 2", "not an integer"),
        ("0 2", "start below 1"),
        ("-3 2", "start below 1"),
        ("1 0", "run length below 1"),
        ("19 3", "runs past the image"),
        ("1 3 2 2", "overlapping or unsorted"),
        ("5 1 1 1", "overlapping or unsorted"),
        ("1 99999999999999999999999", "too large"),
    ],
)
def test_decode_rejects_malformed(rle, message):
    with pytest.raises(ValueError, match=message):
        decode(rle, (4, 5))


def test_decode_labels_rejects_overlapping_nuclei_unless_allowed():
    with pytest.raises(ValueError, match="nuclei 1 and 2"):
        decode_labels(["1 3", "3 2"], (3, 3))
    labels = decode_labels(["1 3", "", "3 2"], (3, 3), allow_overlap=True)
    assert labels.ravel(order="F").tolist() == [1, 1, 3, 3, 0, 0, 0, 0, 0]
    touching = decode_labels(["1 3", "4 2"], (3, 3))  # runs that touch are fine
    assert touching.ravel(order="F").tolist() == [1, 1, 1, 2, 2, 0, 0, 0, 0]


def _rows_by_image(csv_path: Path, wanted: set[str]) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row["ImageId"] in wanted:
                rows.setdefault(row["ImageId"], []).append(row["EncodedPixels"])
    return rows


@pytest.mark.skipif(not (DSB / "stage1_train_labels.csv").is_file(), reason="shared DSB 2018 data not present")
def test_labels_csv_rows_decode_to_the_mask_pngs():
    from PIL import Image

    folders = sorted(p for p in (DSB / "stage1_train").iterdir() if p.is_dir())
    # A few images of different sizes.
    picked, shapes = [], set()
    for d in folders:
        masks = sorted((d / "masks").glob("*.png"))
        shape = np.asarray(Image.open(masks[0])).shape[:2]
        if shape not in shapes:
            shapes.add(shape)
            picked.append(d)
        if len(picked) == 3:
            break
    rows = _rows_by_image(DSB / "stage1_train_labels.csv", {d.name for d in picked})
    for d in picked:
        masks = [np.asarray(Image.open(m)) > 0 for m in sorted((d / "masks").glob("*.png"))]
        shape = masks[0].shape
        decoded = {r: decode(r, shape) for r in rows[d.name]}
        assert len(decoded) == len(masks)
        for m in masks:
            r = encode(m)
            assert r in decoded, f"{d.name}: a mask PNG has no matching CSV row"
            assert (decoded[r] == m).all()
