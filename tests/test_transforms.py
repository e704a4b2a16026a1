"""unet_pl.transforms: the presets and what they may and may not change."""
from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from unet_pl.data.transforms import PRESETS, build_augment, default_augment


def test_none_means_no_augmentation():
    assert build_augment("none") is None and build_augment(None) is None and build_augment("NONE") is None


def test_default_preset_is_flips_rotations_and_mild_jitter():
    t = build_augment("default")
    names = [type(x).__name__ for x in t.transforms]
    assert names == ["HorizontalFlip", "VerticalFlip", "RandomRotate90", "RandomBrightnessContrast"]
    jitter = t.transforms[-1]
    assert max(abs(v) for v in (*jitter.brightness_limit, *jitter.contrast_limit)) <= 0.1
    assert set(PRESETS) == {"none", "default"}


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
