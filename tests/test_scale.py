"""Settings.scale: images resized to the nucleus sizes the model learned, probabilities back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_pl.inference import Settings
from unet_pl.inference.predict import probabilities
from unet_pl.inference.scale import TRAINING_MEDIAN_AREAS, auto_factor, check_scale, resize


def discs(side: int, radius: int, n: int = 4) -> np.ndarray:
    """``n`` x ``n`` discs of ``radius`` on a ``side`` square: labels 1..n*n."""
    yy, xx = np.mgrid[:side, :side]
    lab = np.zeros((side, side), np.int32)
    step = side // n
    for i in range(n):
        for j in range(n):
            cy, cx = step // 2 + i * step, step // 2 + j * step
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 1 + i * n + j
    return lab


def test_auto_factor_leaves_training_sizes_alone_and_brings_others_to_the_median():
    lo, mid, hi = TRAINING_MEDIAN_AREAS
    assert auto_factor(discs(256, 8)) == 1.0  # ~200 px: inside the training range
    big = discs(1024, 30)  # ~2,800 px nuclei
    area = np.median(np.bincount(big.ravel())[1:])
    assert area > hi and auto_factor(big) == pytest.approx(np.sqrt(mid / area))
    small = discs(256, 3)  # ~29 px
    area = np.median(np.bincount(small.ravel())[1:])
    assert area < lo and auto_factor(small) == pytest.approx(np.sqrt(mid / area))
    assert auto_factor(discs(64, 3, n=1)) == 1.0  # one nucleus: nothing to measure
    assert auto_factor(discs(4096, 300, n=4)) == 0.25  # the factor stops at 1/4


def test_check_scale_and_settings():
    assert check_scale("auto") == "auto" and check_scale("0.5") == 0.5
    for bad in ("big", 0, 20):
        with pytest.raises(ValueError, match="scale"):
            check_scale(bad)
    assert Settings(resolution="native", scale="2").scale == 2.0
    with pytest.raises(ValueError, match="native-resolution"):
        Settings(resolution="resize", scale=0.5)


def test_resize_is_bilinear_and_keeps_the_dtype():
    x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4) * 10
    up = resize(x, (8, 8))
    assert up.dtype == torch.uint8 and up.shape == (1, 1, 8, 8)
    ref = torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="bilinear", align_corners=False).round()
    assert torch.equal(up, ref.to(torch.uint8))
    assert resize(x, (4, 4)) is x


class Blur(torch.nn.Module):
    """A stand-in network whose output depends on the scale: a 9x9 box mean of the first channel."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x[:, :1] * 8 - 4, 9, stride=1, padding=4, count_include_pad=False)


def test_a_factor_resizes_the_image_and_the_probabilities_come_back_at_its_size():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 96, 3), dtype=np.uint8)  # halves are multiples of 16: no padding
    net = Blur()
    s = Settings(resolution="native")
    same = probabilities(net, image, s)
    half = probabilities(net, image, s.replace(scale=0.5))
    assert same.shape == half.shape == (1, 128, 96)
    # by hand: shrink (antialiased), the same network, probabilities grown back
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    small = resize(x, (64, 48)).float() / 255
    by_hand = resize(torch.sigmoid(net(small)), (128, 96))
    assert np.allclose(half, by_hand[0].numpy(), atol=1e-5)
    assert not np.allclose(half, same, atol=1e-3)
    auto = probabilities(net, image, s.replace(scale="auto"))  # first pass: nuclei sizes unknown here
    assert auto.shape == same.shape


def test_auto_scale_recovers_an_image_at_four_times_the_magnification():
    """The bundled model on a real sample image and on the same image enlarged 4x (its nuclei 16x
    the area of any in training): at 4x it finds almost nothing right; scale="auto" measures the
    nuclei, shrinks the image back to training sizes and scores about what the original does."""
    from unet_pl.data import SAMPLE_DIR
    from unet_pl.data.images import decode_masks, read_image, scan_train_dir
    from unet_pl.inference import load_model, segment
    from unet_pl.metrics import dsb_image_score

    item = next(it for it in scan_train_dir(SAMPLE_DIR) if it.id.startswith("1023509c"))
    image = read_image(item.image)
    truth = decode_masks(image.shape[:2], list(item.masks))
    big = resize(torch.from_numpy(image).permute(2, 0, 1)[None], (4 * image.shape[0], 4 * image.shape[1]))
    big = big[0].permute(1, 2, 0).numpy()
    big_truth = np.kron(truth, np.ones((4, 4), truth.dtype))
    net = load_model()
    original = dsb_image_score(truth, segment(net, image)).score
    as_is = dsb_image_score(big_truth, segment(net, big)).score
    auto = dsb_image_score(big_truth, segment(net, big, scale="auto")).score
    assert as_is < original - 0.3 and auto > original - 0.1, (original, as_is, auto)


def test_the_settings_line_says_how_images_meet_the_network():
    s = Settings(resolution="native")
    assert s.describe().startswith("images at their own size,")
    assert s.replace(scale=0.5).describe().startswith("images resized by 0.5,")
    assert "scale auto" in s.replace(scale="auto").describe()
    assert s.replace(tile=512).describe().startswith("images at their own size in tiles of at most 512 px,")
