"""unet_pl.data.images and unet_pl.geometry: every pixel format, the notebook's resize, and the errors bad files give."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_png
from PIL import Image
from skimage.transform import resize

from unet_pl.data.cache import build_cache, load_cache
from unet_pl.data.images import TrainItem, is_ignored, list_images, read_image, read_labels_csv, read_mask
from unet_pl.geometry import resize_image, resize_labels, resize_mask

RGB = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 3


def _png16(path: Path, arr: np.ndarray) -> Path:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): grey (H, W) or RGB (H, W, 3)."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([RGB, np.full((4, 5), 7, np.uint8)])
    out = read_image(write_png(tmp_path / "a.png", rgba))
    assert out.dtype == np.uint8 and out.shape == (4, 5, 3)
    np.testing.assert_array_equal(out, RGB)


def test_rgb_is_unchanged(tmp_path):
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "a.png", RGB)), RGB)


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_repeats_to_three_channels(tmp_path, mode):
    grey = RGB[..., 0]
    arr = grey if mode == "L" else np.dstack([grey, np.full_like(grey, 9)])
    out = read_image(write_png(tmp_path / "g.png", arr))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, 2))


def test_palette_image_expands_to_rgb(tmp_path):
    Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), expected)


V16 = np.array([[0, 255, 256, 511], [0x1234, 0x80FF, 0xFF00, 65535]], dtype=np.uint16)
HIGH_BYTE = np.array([[0, 0, 1, 1], [0x12, 0x80, 0xFF, 255]], dtype=np.uint8)  # v >> 8, by hand


def test_16bit_grey_keeps_the_high_byte(tmp_path):
    Image.fromarray(V16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out, np.repeat(HIGH_BYTE[..., None], 3, 2))
    np.testing.assert_array_equal(read_image(_png16(tmp_path / "g16b.png", V16)), out)


def test_16bit_rgb_keeps_the_high_byte_like_grey(tmp_path):
    arr = np.dstack([V16, V16[::-1], V16[:, ::-1]])
    expected = np.dstack([HIGH_BYTE, HIGH_BYTE[::-1], HIGH_BYTE[:, ::-1]])
    np.testing.assert_array_equal(read_image(_png16(tmp_path / "rgb16.png", arr)), expected)


@pytest.mark.parametrize("fg", [1, 255])
def test_mask_0_1_and_0_255_read_the_same(tmp_path, fg):
    m = np.zeros((6, 7), np.uint8)
    m[2:4, 1:5] = fg
    out = read_mask(write_png(tmp_path / "m.png", m))
    assert out.dtype == bool
    np.testing.assert_array_equal(out, m > 0)


def test_rgba_mask_ignores_alpha(tmp_path):
    m = np.zeros((6, 7, 4), np.uint8)
    m[..., 3] = 255
    m[1, 2, :3] = 255
    np.testing.assert_array_equal(read_mask(write_png(tmp_path / "m.png", m)), m[..., 0] > 0)


def test_corrupt_png_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"bad\.png.*corrupt or truncated"):
        read_image(bad)


def test_truncated_png_fails_when_read_not_later(tmp_path):
    good = write_png(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.png"):
        read_image(cut)
    with pytest.raises(ValueError, match=r"cut\.png"):
        read_mask(cut)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_image(tmp_path / "nope.png")


def test_resize_image_is_bilinear_without_blur_and_truncates():
    # 4x4 -> 2x2 without anti-aliasing: each output pixel is the mean of a 2x2 block.
    img = np.zeros((4, 4, 3), np.uint8)
    img[:2, :2] = np.array([[1, 2], [2, 2]], np.uint8)[..., None]  # mean 1.75: truncation gives 1, rounding 2
    img[2:, 2:] = 200
    out = resize_image(img, 2)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], [[1, 0], [0, 200]])


def test_resize_mask_keeps_any_positive_pixel_and_does_not_dilate():
    m = np.zeros((8, 8), bool)
    m[1, 1] = True  # one pixel: weight 1/4 in output (0, 0), outside every other output pixel's support
    out = resize_mask(m, 4)
    assert out.dtype == bool and out.sum() == 1 and out[0, 0]
    # Today's default (anti-aliased) spreads the same pixel over its neighbours: the trap we avoid.
    blurred = resize(m.astype(np.uint8), (4, 4), mode="constant", preserve_range=True) > 0
    assert blurred.sum() > 1


def test_union_then_resize_equals_the_notebooks_resize_each_then_max():
    rng = np.random.default_rng(1)
    masks = [np.zeros((37, 53), np.uint8) for _ in range(6)]
    for m in masks:
        r, c = rng.integers(0, 30), rng.integers(0, 45)
        m[r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = 255
    notebook = np.zeros((16, 16), bool)
    for m in masks:  # the notebook's loop, with the 2018 resize
        notebook = np.maximum(notebook, resize(m, (16, 16), mode="constant", preserve_range=True, anti_aliasing=False)) > 0
    union = np.any(np.stack(masks) > 0, axis=0)
    np.testing.assert_array_equal(resize_mask(union, 16), notebook)


def test_resize_labels_is_nearest_and_keeps_ids():
    lab = np.zeros((40, 40), np.uint16)
    lab[2:20, 2:20], lab[22:38, 22:38] = 1, 7
    out = resize_labels(lab, 10)
    assert out.dtype == np.uint16 and set(np.unique(out)) == {0, 1, 7}


def test_labels_lie_inside_the_mask(sample_dir, tmp_path):
    id_ = sorted(p.name for p in sample_dir.iterdir())[0]
    d = sample_dir / id_
    item = TrainItem(id_, d / "images" / f"{id_}.png", tuple(sorted((d / "masks").glob("*.png"))))
    build_cache([item], "resize", 64, tmp_path / "c.npz", progress=False)
    out = load_cache(tmp_path / "c.npz")
    assert out["labels"][0].max() > 1
    assert not ((out["labels"][0] > 0) & (out["masks"][0] == 0)).any()


def test_is_ignored():
    assert is_ignored(Path("x/.DS_Store")) and is_ignored(Path("Thumbs.db")) and is_ignored(Path("._a.png"))
    assert not is_ignored(Path("a.png"))


def test_list_images_reads_both_layouts_and_skips_clutter(tmp_path):
    write_png(tmp_path / "idA" / "images" / "idA.png", RGB)
    write_png(tmp_path / "flat.png", RGB)
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "notes.txt").write_text("not an image")
    assert [(i, p.relative_to(tmp_path).as_posix()) for i, p in list_images(tmp_path)] == [
        ("flat", "flat.png"), ("idA", "idA/images/idA.png")]


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        list_images(tmp_path)
    (tmp_path / "idB").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no images \(its folders idB/ have no images/ folder inside\)"):
        list_images(tmp_path)
    (tmp_path / "idB" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"idB/images/idB\.png not found"):
        list_images(tmp_path)


def test_labels_csv_header_and_rows(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("ImageId,EncodedPixels\na,1 2 5 1\na,\nb,3 1\n\n")
    assert read_labels_csv(p) == {"a": [(2, "1 2 5 1")], "b": [(4, "3 1")]}
    p.write_text("id,rle\na,1 2\n")
    with pytest.raises(ValueError, match="ImageId,EncodedPixels"):
        read_labels_csv(p)
    p.write_text("ImageId,EncodedPixels\nonly_an_id\n")
    with pytest.raises(ValueError, match="line 2"):
        read_labels_csv(p)
