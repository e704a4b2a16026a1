"""unet_pl.transforms: the presets and what they may and may not change."""
from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from scipy import ndimage as ndi

from unet_pl.data import NucleiDataModule
from unet_pl.data.datasets import crop_transform
from unet_pl.data.targets import boundaries
from unet_pl.data.transforms import PRESETS, ZOOM, TouchingCopy, build_augment, default_augment, zoom_range


def test_none_means_no_augmentation():
    assert build_augment("none") is None and build_augment(None) is None and build_augment("NONE") is None


def test_default_preset_is_flips_rotations_and_mild_jitter():
    t = build_augment("default")
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "RandomBrightnessContrast"]
    jitter = t.transforms[-1]
    assert max(abs(v) for v in (*jitter.brightness_limit, *jitter.contrast_limit)) <= 0.1
    assert {"none", "default"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_keeps_uint8_shapes(name):
    t = build_augment(name)
    if name == "none":
        assert t is None
        return
    out = t(image=np.full((16, 16, 3), 100, np.uint8), mask=np.zeros((16, 16), np.uint8))
    assert out["image"].dtype == np.uint8 and out["image"].shape == (16, 16, 3)
    assert (zoom_range(name) is not None) == ("scale" in name)


def test_the_data_module_crops_at_the_scale_presets_magnifications(sample_dm):
    dm = NucleiDataModule(sample_dm.data_dir, resolution="native", img_size=32, augment="colour+scale", num_workers=0,
                          cache_dir=sample_dm.cache_dir, progress=False)
    dm.setup("fit")
    names = [type(x).__name__ for x in dm.train_set.transform.transforms]
    assert "RandomSizedCrop" in names and "RandomCrop" not in names
    assert names[-1] == "Compose" and "ChannelShuffle" in repr(dm.train_set.transform.transforms[-1])  # the preset, after the crop
    crop = dm.train_set.transform.transforms[names.index("RandomSizedCrop")]
    assert crop.min_max_height == (round(32 / ZOOM[1]), round(32 / ZOOM[0]))
    assert dm.train_set[0]["image"].shape == (3, 32, 32)


def test_user_transforms_pass_through_or_get_wrapped():
    mine = A.Compose([A.HorizontalFlip(p=1)])
    assert build_augment(mine) is mine
    wrapped = build_augment(A.VerticalFlip(p=1))
    assert isinstance(wrapped, A.Compose)
    img = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    np.testing.assert_array_equal(wrapped(image=img, mask=img[..., 0])["image"], img[::-1])


def test_unknown_preset_and_wrong_type():
    with pytest.raises(ValueError, match="unknown augment preset 'heavy'.*none, default"):
        build_augment("heavy")
    with pytest.raises(TypeError, match="albumentations transform"):
        build_augment(lambda image, mask: None)


def test_default_keeps_uint8_shapes_and_binary_masks_and_moves_them_together():
    t = default_augment()
    t.set_random_seed(0)
    mask = np.zeros((16, 16), np.uint8)
    mask[2:5, 3:9] = 1  # asymmetric, so every flip and rotation is visible
    image = np.repeat((mask * 200 + 20)[..., None], 3, 2).astype(np.uint8)
    seen = set()
    for _ in range(40):
        out = t(image=image, mask=mask)
        assert out["image"].dtype == np.uint8 and out["image"].shape == (16, 16, 3)
        assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) == {0, 1}
        # the jitter is mild: foreground stays far above background, and sits where the mask is
        np.testing.assert_array_equal(out["mask"], (out["image"][..., 0] > 120).astype(np.uint8))
        seen.add(out["mask"].tobytes())
    assert len(seen) >= 4  # several of the 8 orientations drawn


# --- the colour and scale presets --------------------------------------------------------------


def _discs(side: int = 320, radius: int = 9, step: int = 32) -> np.ndarray:
    """Labels: a grid of equal discs, one label each (int32, label values above 65535 included)."""
    yy, xx = np.mgrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    n = 0
    for cy in range(step // 2, side, step):
        for cx in range(step // 2, side, step):
            n += 1
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 70000 + n
    return labels


def _whole_areas(labels: np.ndarray) -> np.ndarray:
    """Areas of the labels that do not touch the crop's edge."""
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    ids = np.setdiff1d(np.unique(labels), np.concatenate([[0], edge]))
    return np.array([(labels == i).sum() for i in ids])


def test_scale_preset_shows_nuclei_between_its_magnifications_with_labels_in_place():
    labels = _discs()
    area0 = (labels == labels.max()).sum()
    image = np.repeat(np.where(labels > 0, 220, 30).astype(np.uint8)[..., None], 3, 2)
    t = crop_transform(96, build_augment("scale"), train=True, zoom=zoom_range("scale"))
    t.set_random_seed(0)
    factors = []
    for _ in range(40):
        out = t(image=image, mask=(labels > 0).astype(np.uint8), masks=[labels])
        lab = out["masks"][0]
        assert out["image"].shape == (96, 96, 3) and lab.dtype == np.int32
        assert set(np.unique(lab)) <= set(np.unique(labels))  # nearest neighbour: no made-up label values
        np.testing.assert_array_equal(out["mask"], (lab > 0).astype(np.uint8))
        # the image moved with the labels: bright where a nucleus is, away from the interpolated rims
        inner, outer = ndi.binary_erosion(lab > 0, iterations=2), ndi.binary_dilation(lab > 0, iterations=2)
        grey, rim = out["image"][..., 0].astype(int), np.pad(np.ones((92, 92), bool), 2)  # rim: the crop's edge, resampled either side
        assert (grey[inner & rim] > 150).all() and (grey[~outer & rim] < 100).all()
        areas = _whole_areas(lab)
        if len(areas):
            factors.append(np.sqrt(np.median(areas) / area0))  # linear magnification of this crop
    factors = np.array(factors)
    lo, hi = ZOOM
    assert len(factors) >= 30
    assert factors.min() >= lo * 0.9 and factors.max() <= hi * 1.1  # within the range (pixel rounding)
    assert factors.min() < 0.8 and factors.max() > 1.3  # and it does zoom both ways


def test_without_zoom_the_crop_keeps_the_size():
    labels = _discs()
    t = crop_transform(96, build_augment("default"), train=True)
    t.set_random_seed(0)
    for _ in range(10):
        areas = _whole_areas(t(image=np.zeros((*labels.shape, 3), np.uint8), mask=(labels > 0).astype(np.uint8), masks=[labels])["masks"][0])
        assert (areas == (labels == labels.max()).sum()).all()


def test_colour_preset_changes_colour_but_not_polarity_or_where_nuclei_are():
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 6:20] = 1
    # H&E-like: purple nuclei on a pink background
    image = np.where(mask[..., None] == 1, np.array([90, 40, 140]), np.array([235, 170, 210])).astype(np.uint8)
    t = build_augment("colour")
    t.set_random_seed(0)
    recoloured = 0
    for _ in range(200):
        out = t(image=image, mask=mask)
        m, im = out["mask"], out["image"].astype(int)
        assert m.sum() == mask.sum() and out["image"].dtype == np.uint8
        fg, bg = im[m == 1].mean(), im[m == 0].mean()
        assert abs(fg - bg) > 20  # nuclei stay distinguishable from the background
        assert fg < bg  # the input has dark nuclei on a bright background, and keeps them dark
        order = tuple(np.argsort(im[m == 0].mean(0)))
        recoloured += order != (1, 2, 0)  # the background's channel order (G < B < R) changed: another hue
    assert 90 <= recoloured <= 170  # hue shifts, shuffles and grey: 70%, some of which keep the order


def test_scale_needs_native_resolution():
    with pytest.raises(ValueError, match="needs resolution='native'"):
        NucleiDataModule(augment="scale")
    assert zoom_range("colour") is None and zoom_range("colour+scale") == ZOOM and zoom_range(None) is None


def grey_image(mask: np.ndarray, nucleus: int, background: int) -> np.ndarray:
    """A fluorescence-like uint8 ``(H, W, 3)`` image: ``nucleus`` grey where ``mask``, else ``background``."""
    return np.repeat(np.where(mask == 1, nucleus, background).astype(np.uint8)[..., None], 3, axis=2)


def test_stain_preset_varies_the_stain_of_colour_images_and_leaves_grey_ones_grey():
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 6:20] = 1
    # H&E-like: purple nuclei on a pink background; and a fluorescence-like grey image
    he = np.where(mask[..., None] == 1, np.array([90, 40, 140]), np.array([235, 170, 210])).astype(np.uint8)
    grey = grey_image(mask, 200, 10)
    t = build_augment("stain")
    t.set_random_seed(0)
    restained = 0
    for _ in range(100):
        out = t(image=he, mask=mask)
        m, im = out["mask"], out["image"].astype(int)
        assert m.sum() == mask.sum() and out["image"].dtype == np.uint8
        assert im[m == 1].mean() < im[m == 0].mean() - 20  # nuclei stay darker than the background
        # the stain is another when the nuclei's colour balance (red - blue) moves: brightness alone keeps it
        nuclei = im[m == 1].mean(0)
        restained += abs((nuclei[0] - nuclei[2]) - (90 - 140)) > 5
        g = t(image=grey, mask=mask)["image"]
        assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()  # grey stays grey
    assert 35 <= restained <= 85  # HEStain on 70% of crops (seeds 0-3: 50-58), some of which land near the original


def test_texture_preset_grains_or_blurs_the_image_and_keeps_grey_and_the_mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 1
    t = build_augment("texture")
    t.set_random_seed(0)
    textured = 0
    for _ in range(200):
        out = t(image=grey_image(mask, 160, 20), mask=mask)
        m, im = out["mask"], out["image"]
        assert m.sum() == mask.sum() and im.dtype == np.uint8 and (np.diff(im, axis=2) == 0).all()  # grey stays grey
        # grain spreads the flat nucleus' pixels, and so does a blur (at its edge); the brightness jitter alone does not
        textured += im[..., 0][m == 1].std() > 2
    assert 70 <= textured <= 130, textured  # 50% of crops (seed 0: 93)


def test_a_seeded_item_draws_every_flip_and_rotation_and_crops_anywhere():
    """The sampler's seed per item (``NucleiDataset.seed_transform``) must give the transforms independent
    draws: with one generator per transform started from the same seed, the two flips always fired
    together (no crop was ever mirrored) and the crop's position followed them."""
    from unet_pl.data.datasets import NucleiDataset

    m = np.arange(64 * 64, dtype=np.int32).reshape(64, 64)
    image = np.zeros((64, 64, 3), np.uint8)
    t = crop_transform(16, build_augment("default"), train=True)
    ds = NucleiDataset({"ids": np.array(["a"])}, transform=t)
    seen, tops = {}, {True: [], False: []}
    for seed in range(400):
        ds.seed_transform(seed)
        out = t(image=image, mask=np.zeros((64, 64), np.uint8), masks=[m])["masks"][0]
        top, left = divmod(int(out.min()), 64)  # the crop's corner in the source
        crop = m[top:top + 16, left:left + 16]
        # which of the 8 symmetries of the square turned the crop into the output
        k = next(k for k in range(8) if np.array_equal(np.rot90(crop if k < 4 else crop.T, k % 4), out))
        seen[k] = seen.get(k, 0) + 1
        tops[k >= 4].append(top)
    assert len(seen) == 8 and min(seen.values()) >= 20, seen  # mirrored views too (k >= 4), about 50 each
    assert abs(np.mean(tops[True]) - np.mean(tops[False])) < 6, tops  # the crop's row does not follow the mirror


def _one_nucleus_and_a_far_one():
    """A 64 x 64 crop: nucleus 3, an ellipse whose pixels all differ (so each copied pixel says where it
    came from), and nucleus 7, far away in a corner (not touching the edge), too small to be copied."""
    from skimage.draw import ellipse
    labels = np.zeros((64, 64), np.uint16)
    rr, cc = ellipse(30, 30, 9, 5, rotation=0.4, shape=labels.shape)
    labels[rr, cc] = 3
    labels[52:56, 52:56] = 7  # 16 pixels, under min_area
    grey = np.zeros((64, 64), np.uint8)
    grey[rr, cc] = 60 + np.arange(len(rr))  # 60..~200, all different
    grey[labels == 7] = 250
    return np.repeat(grey[..., None], 3, axis=2), labels


def _turned(shape: np.ndarray) -> list[np.ndarray]:
    """The eight right-angle symmetries of a binary shape, each cropped to its box."""
    out = []
    for s in (shape, shape.T):
        for k in range(4):
            r = np.rot90(s, k)
            out.append(r[np.ix_(r.any(1), r.any(0))])
    return out


def test_touching_copy_presses_a_turned_copy_of_a_nucleus_against_it_as_a_new_nucleus():
    import random
    image, labels = _one_nucleus_and_a_far_one()
    original = labels == 3
    box = original[np.ix_(original.any(1), original.any(0))]
    whole = 0
    for seed in range(30):
        t = TouchingCopy(p=1.0)
        t.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = t(image=image, mask=(labels > 0).astype(np.uint8), masks=[labels])
        lab, im = np.asarray(out["masks"][0]), out["image"]
        new = lab == 8  # the next label
        assert set(np.unique(lab)) == {0, 3, 7, 8}
        assert (out["mask"] == (lab > 0)).all()
        assert (lab == 7).sum() == 16 and (im[labels == 7] == 250).all()  # the other nucleus untouched
        assert new.sum() >= 0.7 * original.sum()  # most of the copy landed
        assert 0 < original.sum() - (lab == 3).sum() <= 0.3 * original.sum()  # the copy lies over the original's edge
        # every pixel of the copy is one of the original's values, each at most once: a copy, not a paint
        values = im[..., 0][new]
        assert np.isin(values, image[..., 0][original]).all() and len(np.unique(values)) == len(values)
        # pressed against the original (4-neighbours), so the boundary target draws a line on both sides
        b = boundaries(lab).astype(bool)
        assert (b & new & ndi.binary_dilation(lab == 3)).any() and (b & (lab == 3) & ndi.binary_dilation(new)).any()
        if new.sum() == original.sum():  # landed whole: the shape is the original turned
            whole += 1
            assert any(s.shape == new[np.ix_(new.any(1), new.any(0))].shape and (s == new[np.ix_(new.any(1), new.any(0))]).all()
                       for s in _turned(box))
    assert whole >= 5, whole


def test_touching_copy_without_labels_uses_the_blobs_and_leaves_crops_without_a_whole_nucleus_alone():
    import random
    image, labels = _one_nucleus_and_a_far_one()
    t = TouchingCopy(p=1.0)
    t.set_random_state(np.random.default_rng(0), random.Random(0))
    out = t(image=image, mask=(labels > 0).astype(np.uint8))
    assert out["mask"].sum() > (labels > 0).sum() and out["image"].shape == image.shape
    edge_only = np.zeros((64, 64), np.uint16)
    edge_only[0:10, 20:30] = 1  # touches the crop's edge: a cut nucleus is not copied
    edge_only[30:33, 30:33] = 2  # 9 pixels: under min_area
    grey = np.repeat((edge_only > 0).astype(np.uint8)[..., None] * 200, 3, axis=2)
    out = t(image=grey, mask=(edge_only > 0).astype(np.uint8), masks=[edge_only])
    assert (np.asarray(out["masks"][0]) == edge_only).all() and (out["image"] == grey).all()


def test_texture_touch_preset_is_texture_with_touching_copies_before_the_grain():
    names = [type(x).__name__ for x in build_augment("texture+touch").transforms]
    assert names == [type(x).__name__ for x in build_augment("texture").transforms][:4] + ["TouchingCopy", "OneOf"]


def test_the_validation_crop_is_the_centre_unless_that_misses_every_nucleus():
    """Eval crops: albumentations' PadIfNeeded + CenterCrop wherever the centre holds a nucleus pixel
    (or the image none); where the centre is all background but the image is not, the square with
    the most nucleus pixels, counted by hand over every position."""
    import cv2
    import albumentations as A

    rng = np.random.default_rng(0)
    t = crop_transform(32, None, train=False)
    ref = A.Compose([A.PadIfNeeded(32, 32, border_mode=cv2.BORDER_REFLECT_101, p=1.0), A.CenterCrop(32, 32, p=1.0)])
    for h, w in ((64, 80), (33, 47), (20, 90), (32, 32)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        labels = np.zeros((h, w), np.int32)
        labels[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] = 1  # a nucleus in the centre
        for lab in (labels, np.zeros_like(labels)):  # with it, and an image without nuclei
            mask = (lab > 0).astype(np.uint8)
            got, want = t(image=image, mask=mask, masks=[lab]), ref(image=image, mask=mask, masks=[lab])
            for key in ("image", "mask"):
                assert np.array_equal(got[key], want[key]), (h, w, key)
            assert np.array_equal(got["masks"][0], want["masks"][0])
    # nuclei only near a corner: the crop holds as many nucleus pixels as the best square does
    h, w = 96, 128
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = np.zeros((h, w), np.int32)
    labels[2:12, 3:15] = 1
    labels[20:30, 100:120] = 2
    labels[80:90, 110:126] = 3
    mask = (labels > 0).astype(np.uint8)
    best = max(int(mask[y:y + 32, x:x + 32].sum()) for y in range(h - 31) for x in range(w - 31))
    got = t(image=image, mask=mask, masks=[labels])
    assert got["mask"].shape == (32, 32) and int(got["mask"].sum()) == best > 0
    ys, xs = np.nonzero([[np.array_equal(image[y:y + 32, x:x + 32], got["image"]) for x in range(w - 31)] for y in range(h - 31)])
    y, x = int(ys[0]), int(xs[0])  # where the crop came from: image, mask and labels cut at the same place
    assert np.array_equal(got["masks"][0], labels[y:y + 32, x:x + 32]) and np.array_equal(got["mask"], mask[y:y + 32, x:x + 32])
