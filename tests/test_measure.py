"""``nucleus_table`` against scikit-image's ``regionprops_table`` (the independent reference) on
random touching nuclei, awkward shapes and a real competition image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.measure import regionprops_table
from skimage.segmentation import watershed

from unet_pl.inference.measure import COLUMNS, nucleus_table, solidity
from unet_pl.inference.outputs import NUCLEUS_PROPERTIES

from conftest import REAL_DATA_DIR

REAL_IMAGE = "0121d6759c5adb290c8e828fc882f37dfaf3663ec885c663859948c154a443ed"  # 86 masks


def assert_matches_regionprops(labels: np.ndarray, intensity: np.ndarray) -> dict:
    ref = regionprops_table(labels, intensity_image=intensity, properties=NUCLEUS_PROPERTIES)
    got = nucleus_table(labels, intensity)
    assert list(got) == list(ref) == list(COLUMNS)
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        if ref[k].dtype.kind == "i":
            np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
        elif k == "orientation":  # +-pi/2 is one axis; skimage's sign for a symmetric nucleus is rounding noise
            turn = np.abs(got[k] - ref[k])
            np.testing.assert_allclose(np.minimum(turn, np.abs(turn - np.pi)), 0, atol=1e-9, err_msg=k)
        else:
            np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=0, err_msg=k)
    return got


def watershed_nuclei(rng: np.random.Generator, h: int = 120, w: int = 150, n: int = 40) -> np.ndarray:
    """Touching nuclei of random shapes (some 1-pixel wide, some on the border), labels 3, 10, 17, ..."""
    seeds = np.zeros((h, w), int)
    pts = rng.integers(0, [h, w], (n, 2))
    seeds[pts[:, 0], pts[:, 1]] = np.arange(1, n + 1)
    mask = ndi.binary_opening(rng.random((h, w)) < 0.85)
    labels = watershed(rng.random((h, w)), seeds, mask=mask)
    return np.where(labels > 0, labels * 7 + 3, 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_touching_nuclei_with_non_consecutive_labels(seed):
    rng = np.random.default_rng(seed)
    labels = watershed_nuclei(rng)
    assert len(np.unique(labels)) > 20
    got = assert_matches_regionprops(labels, (rng.random(labels.shape) * 1000).astype(np.float32))
    assert np.all(np.diff(got["label"]) > 0) and np.all(got["label"] % 7 == 3)
    assert_matches_regionprops(labels, rng.integers(0, 65536, labels.shape).astype(np.uint16))
    # labels on both sides of uint16's range: every odd one moved up by 65536, so that a sort of the
    # labels cast to uint16 would put them back among the even ones (the wrong order)
    moved = np.where(labels % 2 == 1, labels + 65536, labels)
    big = assert_matches_regionprops(moved, rng.random(labels.shape))
    assert big["label"].max() > 65536 > big["label"].min()


def test_random_overlapping_ellipses():
    rng = np.random.default_rng(3)
    h, w = 256, 256
    labels = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, 80):  # later ellipses cut into earlier ones; some leave the image
        cy, cx = rng.uniform(-10, h + 10, 2)
        a, b = rng.uniform(1, 25, 2)
        th = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(th) + (xx - cx) * np.sin(th)
        v = -(yy - cy) * np.sin(th) + (xx - cx) * np.cos(th)
        labels[(u / a) ** 2 + (v / b) ** 2 <= 1] = k * 1000
    assert_matches_regionprops(labels, rng.normal(100, 30, (h, w)).astype(np.float32))


def test_one_pixel_one_row_border_hole_and_line_nuclei():
    labels = np.zeros((30, 40), np.int32)
    labels[0, 0] = 5  # one pixel, in the corner
    labels[3, 2:20] = 9  # one row
    labels[5:15, 39] = 11  # one column along the right border
    labels[10:20, 5:15] = 2
    labels[13:16, 8:11] = 0  # a hole
    labels[29, :] = 100  # the whole bottom row
    for i in range(8):
        labels[20 + i, 20 + i] = 7  # diagonal line
    for i in range(6):
        labels[20 + i, 35 - i] = 8  # anti-diagonal line
    labels[22:25, 28:31] = 12
    labels[23, 31] = 12
    rng = np.random.default_rng(4)
    intensity = rng.random(labels.shape).astype(np.float32)
    got = assert_matches_regionprops(labels, intensity)
    np.testing.assert_array_equal(got["label"], [2, 5, 7, 8, 9, 11, 12, 100])
    assert got["area"][0] == 100 - 9 and got["solidity"][0] < 1  # the hole is in the hull, not in the area
    assert_matches_regionprops(labels, (intensity * 255).astype(np.uint8))
    assert_matches_regionprops(labels, intensity.astype(np.float64))


def test_symmetric_nuclei_have_an_exact_orientation():
    """mu11 is computed exactly: an axis-aligned nucleus lying along the columns is +pi/2, along the rows 0."""
    labels = np.zeros((20, 30), np.int32)
    labels[2:5, 3:20] = 1  # along the columns (3 rows, 17 columns)
    labels[4, 2] = labels[4, 20] = 1  # symmetric about column 11
    labels[8:19, 24:27] = 2  # along the rows
    labels[10, 23] = labels[16, 23] = 2  # symmetric about row 13
    got = assert_matches_regionprops(labels, np.ones(labels.shape, np.float32))
    np.testing.assert_array_equal(got["orientation"], [np.pi / 2, 0.0])


def test_no_nuclei_gives_empty_columns_of_the_right_dtypes():
    got = assert_matches_regionprops(np.zeros((10, 12), np.int32), np.zeros((10, 12), np.float32))
    assert all(len(v) == 0 for v in got.values())
    assert got["label"].dtype == got["bbox-0"].dtype == np.int64 and got["solidity"].dtype == np.float64


def test_intensity_mean_is_numpys_float32_mean_for_long_nuclei():
    """float32 means are numpy's pairwise sums (blocks of 128, halves rounded to 8), not float64 sums."""
    rng = np.random.default_rng(5)
    labels = np.zeros((40, 400), np.int32)
    for k, n in enumerate([1, 7, 8, 9, 127, 128, 129, 255, 256, 257, 300, 399, 400], start=1):
        labels[k, :n] = k
    labels[20:40, :] = 20  # 8000 values
    intensity = (rng.random(labels.shape) * 1e4).astype(np.float32)
    got = assert_matches_regionprops(labels, intensity)
    means = [np.mean(intensity[labels == k]) for k in got["label"]]
    np.testing.assert_array_equal(got["intensity_mean"], np.asarray(means, np.float64))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        nucleus_table(np.zeros((4, 4), int), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="integer"):
        nucleus_table(np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        nucleus_table(-np.ones((4, 4), int), np.zeros((4, 4)))


def test_a_real_competition_image():
    folder = REAL_DATA_DIR / "stage1_train" / REAL_IMAGE
    if not folder.is_dir():
        pytest.skip(f"the competition's data is not at {REAL_DATA_DIR} (set UNET_PL_DSB2018)")
    masks = sorted((folder / "masks").glob("*.png"))
    assert len(masks) > 50
    labels = None
    for k, path in enumerate(masks, start=1):  # one nucleus per mask PNG (0/255)
        m = np.asarray(Image.open(path)) > 0
        labels = np.zeros(m.shape, np.int32) if labels is None else labels
        labels[m] = k
    image = np.asarray(Image.open(folder / "images" / f"{REAL_IMAGE}.png").convert("RGB"))
    got = assert_matches_regionprops(labels, image.astype(np.float32).mean(axis=2))
    assert len(got["label"]) == len(masks)
    assert_matches_regionprops(labels, image[..., 0])


def test_solidity_of_some_labels_matches_regionprops():
    rng = np.random.default_rng(5)
    labels = watershed_nuclei(rng)
    ref = regionprops_table(labels, properties=("label", "solidity"))
    which = rng.permutation(ref["label"])[:15]  # a subset, in no order
    expected = ref["solidity"][np.searchsorted(ref["label"], which)]
    np.testing.assert_allclose(solidity(labels, which), expected, rtol=1e-12)
    assert (expected < 1).any()  # some concave ones among them
    assert solidity(labels, np.zeros(0, int)).shape == (0,)
    with pytest.raises(ValueError, match="not in the image"):
        solidity(labels, [4])  # labels are 7k + 3
