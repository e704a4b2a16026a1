"""Real microscopy in: TIFF and OME-TIFF, channels, bit depths, stacks, label-image annotations.
Every file here is written by the test with tifffile or Pillow from the bundled sample's real images."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import tifffile
from PIL import Image

from unet_pl import LitUNet, NucleiDataModule
from unet_pl.data import SAMPLE_DIR
from unet_pl.data.images import decode_masks, list_images, scan_train_dir
from unet_pl.data.readers import read_image, read_raw, reset_dark_warnings

# A grey fluorescence image of the sample with many nuclei, and its per-nucleus masks.
FLUO = "0287e7ee5b007c91ae2bd7628d09735e70496bc6127ecb7f3dd043e04ce37426"


def _fluo() -> tuple[np.ndarray, list[Path]]:
    d = SAMPLE_DIR / FLUO
    return read_image(d / "images" / f"{FLUO}.png")[..., 0], sorted((d / "masks").glob("*.png"))


def _count(image: np.ndarray) -> int:
    """Nuclei of a uint8 image by Otsu's threshold and connected components (scikit-image, not ours)."""
    from skimage.filters import threshold_otsu
    from skimage.measure import label
    from skimage.morphology import remove_small_objects

    fg = image > threshold_otsu(image)
    return int(label(remove_small_objects(fg, 10)).max())


def test_12_bit_data_in_16_bit_files_warns_and_percentile_reads_it_like_the_8_bit_image(tmp_path, caplog):
    from unet_pl.data.readers import reset_dark_warnings

    reset_dark_warnings()
    grey, _ = _fluo()
    twelve = grey.astype(np.uint16) * 16  # 0..4080: 12-bit camera data
    tif, png = tmp_path / "cam.tif", tmp_path / "cam16.png"
    tifffile.imwrite(tif, twelve)
    Image.fromarray(twelve).save(png)
    with caplog.at_level(logging.WARNING):
        dark = read_image(tif)  # the notebook's rule: high byte, nearly black
    assert "cam.tif" in caplog.text and "--intensity percentile" in caplog.text
    assert dark.max() <= 15
    reference = read_image(SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png", intensity="percentile")[..., 0]
    for path in (tif, png):
        stretched = read_image(path, intensity="percentile")
        assert stretched.shape == (*grey.shape, 3) and np.abs(stretched[..., 0].astype(int) - reference).max() <= 1
    n8, n12 = _count(grey), _count(read_image(tif, intensity="percentile")[..., 0])
    assert n8 > 20 and abs(n12 - n8) <= 0.1 * n8


def test_a_folder_of_12_bit_files_names_the_first_three_then_one_line_for_the_rest(tmp_path, caplog):
    from unet_pl.data.readers import DARK_NAMED, reset_dark_warnings

    grey, _ = _fluo()
    for k in range(8):
        tifffile.imwrite(tmp_path / f"cam{k}.tif", grey.astype(np.uint16) * 16)
    reset_dark_warnings()
    with caplog.at_level(logging.WARNING):
        for k in range(8):
            read_image(tmp_path / f"cam{k}.tif")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert DARK_NAMED == 3 and len(said) == 4, said
    assert all(f"cam{k}.tif" in said[k] for k in range(3)) and "not named one by one" in said[3]
    reset_dark_warnings()  # exactly three: all named, no line about others
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for k in range(3):
            read_image(tmp_path / f"cam{k}.tif")
    assert len(caplog.records) == 3 and "not named" not in caplog.text
    reset_dark_warnings()  # a new run names its own
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_image(tmp_path / "cam7.tif")
    assert "cam7.tif" in caplog.text


def test_imagej_hyperstack_and_ome_tiff_pick_the_nuclear_channel(tmp_path):
    grey, _ = _fluo()
    cyto = np.full_like(grey, 90)
    hyper, ome = tmp_path / "two.tif", tmp_path / "two.ome.tif"
    tifffile.imwrite(hyper, np.stack([cyto, grey]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(ome, np.stack([grey, cyto, cyto, cyto]), ome=True, metadata={"axes": "CYX"})
    with pytest.raises(ValueError, match=r"two\.tif: has 2 channels; pass --channel N"):
        read_image(hyper)
    assert np.array_equal(read_image(hyper, channel=2)[..., 0], grey)
    assert np.array_equal(read_image(ome, channel=1)[..., 1], grey)
    with pytest.raises(ValueError, match="has 4 channels"):
        read_image(ome)
    with pytest.raises(ValueError, match="1 to 2"):
        read_image(hyper, channel=3)


def test_a_z_stack_says_how_to_make_one_plane(tmp_path):
    grey, _ = _fluo()
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, np.stack([grey] * 5), imagej=True, metadata={"axes": "ZYX"})
    with pytest.raises(ValueError, match=r"z\.tif: a stack \(5 along z.*Z Project"):
        read_raw(path)


def test_a_time_series_says_to_segment_each_time_point_not_to_project(tmp_path):
    """Projecting a time-lapse over time merges nuclei that moved: the way out is one image per time point."""
    grey, _ = _fluo()
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.stack([grey] * 3), imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(ValueError, match=r"movie\.tif: a time series \(3 along t .*each time point.*Image Sequence") as e:
        read_raw(path)
    assert "Z Project" not in str(e.value) and "first" not in str(e.value)
    # with z-planes or channels too: first one plane per time point, or the nuclear channel, then the frames
    tifffile.imwrite(tmp_path / "tz.tif", np.stack([np.stack([grey] * 2)] * 3), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ValueError, match=r"first project each time point's planes .*All time frames\), then File > Save As"):
        read_raw(tmp_path / "tz.tif")
    tifffile.imwrite(tmp_path / "tc.tif", np.stack([np.stack([grey] * 2)] * 3), imagej=True, metadata={"axes": "TCYX"})
    with pytest.raises(ValueError, match=r"first keep the nuclear channel .*all frames\), then File > Save As"):
        read_raw(tmp_path / "tc.tif", channel=1)


def test_a_multi_position_ome_tiff_says_that_only_its_first_image_is_read(tmp_path, caplog):
    """An OME-TIFF of two positions (two series of one size) is read as its first, with a warning naming the file
    and the count; a file whose second series is a small thumbnail (a slide's overview) gets no warning."""
    grey, _ = _fluo()
    two, thumb = tmp_path / "two positions.ome.tif", tmp_path / "thumb.ome.tif"
    with tifffile.TiffWriter(two, ome=True) as tif:
        tif.write(grey, metadata={"axes": "YX"})
        tif.write(255 - grey, metadata={"axes": "YX"})
    with tifffile.TiffWriter(thumb, ome=True) as tif:
        tif.write(grey, metadata={"axes": "YX"})
        tif.write(grey[::8, ::8], metadata={"axes": "YX"})
    assert len(tifffile.TiffFile(two).series) == 2 and len(tifffile.TiffFile(thumb).series) == 2
    reset_dark_warnings()  # each run names its own first few
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(read_raw(two)[..., 0], grey)
    said = [r.getMessage() for r in caplog.records if "series" in r.getMessage()]
    assert len(said) == 1 and "two positions.ome.tif holds 2 images" in said[0] and "only the first" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(read_raw(thumb)[..., 0], grey)
        read_raw(two)  # read again (training reads a file more than once): not said again
    assert not [r for r in caplog.records if "series" in r.getMessage()]
    # a plate of them: the first three named, then one line for the rest, as the dark-file warning does
    caplog.clear()
    for i in range(5):
        shutil.copy(two, tmp_path / f"well{i}.ome.tif")
    reset_dark_warnings()
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            read_raw(tmp_path / f"well{i}.ome.tif")
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4 and all(f"well{i}.ome.tif holds 2 images" in said[i] for i in range(3))
    assert said[3].startswith("further TIFFs holding several images are not named")


def test_a_folder_given_as_an_image_says_how_to_predict_a_folder(tmp_path):
    from unet_pl import segment

    with pytest.raises(ValueError, match=r"is a folder, not an image file.*predict_folder"):
        segment(LitUNet(img_size=32), tmp_path)


def test_a_folder_of_experiment_folders_names_them_and_the_one_to_pass(tmp_path, caplog):
    """exp/control/*.tif and exp/treated/*.tif: subfolders are not searched; the error says so and names one to pass
    (not the competition's layout, which is not what such a user has)."""
    png = SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png"
    for name in ("my control", "treated"):
        (tmp_path / name).mkdir()
        shutil.copy(png, tmp_path / name / "a.png")
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"subfolders are not searched: my control/, treated/ hold image files; "
                                                r"predict one of them \(e\.g\. '.*my control'\)") as e:
        list_images(tmp_path)
    assert "notes" not in str(e.value) and not [r for r in caplog.records if "skipped" in r.getMessage()]


def _labels_from(masks: list[Path], shape) -> np.ndarray:
    return decode_masks(shape, masks)


@pytest.mark.parametrize("kind", ["uint16 tif", "uint8 png", "uint32 tif"])
def test_a_label_image_in_masks_decodes_to_the_per_nucleus_pngs_it_came_from(tmp_path, kind):
    grey, masks = _fluo()
    truth = _labels_from(masks, grey.shape)
    assert truth.max() == len(masks) > 1
    dtype = {"uint16 tif": np.uint16, "uint8 png": np.uint8, "uint32 tif": np.uint32}[kind]
    # values 3, 6, 9, ...: not consecutive, so the decoder must renumber them
    stored = (truth.astype(np.uint32) * 3).astype(dtype)
    path = tmp_path / ("lab.tif" if "tif" in kind else "lab.png")
    tifffile.imwrite(path, stored) if "tif" in kind else Image.fromarray(stored).save(path)
    assert np.array_equal(decode_masks(grey.shape, [path]), truth)


@pytest.mark.parametrize("top", [1, 255, 65535])
def test_binary_masks_are_foreground_in_every_bit_depth(tmp_path, top):
    grey, masks = _fluo()
    truth = _labels_from(masks, grey.shape)
    converted = []
    for k, m in enumerate(masks):
        path = tmp_path / f"m{k:03d}.tif"
        tifffile.imwrite(path, ((np.asarray(Image.open(m)) > 0) * top).astype(np.uint16))
        converted.append(path)
    assert np.array_equal(decode_masks(grey.shape, converted), truth)


def _label_layout(root: Path, n: int | None = None) -> Path:
    """The bundled sample (its first ``n`` images) as images/<id>.tif + masks/<id>.tif (16-bit label
    images): what Fiji or QuPath export."""
    for it in scan_train_dir(SAMPLE_DIR)[:n]:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        image = np.asarray(Image.open(it.image))
        tifffile.imwrite(root / "images" / f"{it.id}.tif", image[..., :3] if image.ndim == 3 else image)
        tifffile.imwrite(root / "masks" / f"{it.id}.tif", decode_masks(image.shape[:2], list(it.masks)))
    return root


def test_annotations_named_as_cellpose_and_napari_export_them_are_paired(tmp_path, caplog):
    """masks/<name>_cp_masks.png, <name>_Labels.tif (any case), <name>-mask.tif: <name>'s label image, decoded to
    the same nuclei as masks/<name>.tif; an exact name wins over a suffixed one (which is then an
    unused file, said); two suffixed ones for one image are an error naming both."""
    root = _label_layout(tmp_path / "exported", n=3)
    ids = [it.id for it in scan_train_dir(root)]
    before = {i: tifffile.imread(root / "masks" / f"{i}.tif") for i in ids}
    renamed = dict(zip(ids, ("_cp_masks.png", "_Labels.tif", "-mask.tif")))
    for i, suffix in renamed.items():
        src = root / "masks" / f"{i}.tif"
        if suffix.endswith(".png"):
            Image.fromarray(before[i].astype(np.uint16)).save(root / "masks" / f"{i}{suffix}")
            src.unlink()
        else:
            src.rename(root / "masks" / f"{i}{suffix}")
    with caplog.at_level(logging.WARNING):
        items = scan_train_dir(root)
    assert "not used" not in caplog.text, caplog.text
    assert [(it.id, it.masks[0].name) for it in items] == [(i, f"{i}{renamed[i]}") for i in ids]
    for it in items:
        assert np.array_equal(decode_masks(before[it.id].shape, list(it.masks)), before[it.id]), it.id
    # the exact name wins; the suffixed file is named as unused
    tifffile.imwrite(root / "masks" / f"{ids[0]}.tif", before[ids[0]])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = scan_train_dir(root)
    assert items[0].masks[0].name == f"{ids[0]}.tif" and f"{ids[0]}_cp_masks.png" in caplog.text and "not used" in caplog.text
    # two suffixed annotations of one image
    (root / "masks" / f"{ids[0]}.tif").unlink()
    tifffile.imwrite(root / "masks" / f"{ids[0]}_masks.tif", before[ids[0]])
    with pytest.raises(ValueError, match=rf"two label images for {ids[0]}.*_masks\.tif|two label images for {ids[0]}.*_cp_masks\.png"):
        scan_train_dir(root)


def test_a_label_image_folder_trains_like_the_competition_layout(tmp_path):
    """Same images, same nuclei, same seed: the two layouts make the same cache and the same validation IoU."""
    flat = _label_layout(tmp_path / "exported")
    results = []
    for root in (SAMPLE_DIR, flat):
        dm = NucleiDataModule(root, img_size=64, batch_size=8, augment="none", num_workers=0,
                              cache_dir=tmp_path / "cache", progress=False)
        dm.prepare_data()
        dm.setup("fit")
        pl.seed_everything(0, verbose=False)
        model = LitUNet()
        trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, deterministic=True)
        trainer.fit(model, dm)
        results.append((dm.arrays, float(trainer.callback_metrics["val/iou"])))
    (a, iou_a), (b, iou_b) = results
    for key in ("images", "masks", "labels", "ids"):
        assert np.array_equal(a[key], b[key]), key
    assert abs(iou_a - iou_b) <= 0.02


def test_evaluate_reads_a_label_image_truth_folder(tmp_path):
    import csv

    from unet_pl.evaluation import evaluate
    from unet_pl.rle import encode_labels

    flat = _label_layout(tmp_path / "exported")
    pred = tmp_path / "truth_as_pred.csv"
    with open(pred, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "EncodedPixels"])
        for it in scan_train_dir(SAMPLE_DIR):
            labels = decode_masks(np.asarray(Image.open(it.image)).shape[:2], list(it.masks))
            w.writerows([it.id, r] for r in encode_labels(labels))
    rows, missing, extra, _ = evaluate(pred, flat)
    assert len(rows) == 30 and not missing and not extra
    assert all(r["score"] == pytest.approx(1.0) for r in rows) and sum(r["n_true"] for r in rows) > 500


def test_tiff_and_jpeg_training_images_in_the_competition_layout(tmp_path):
    root = tmp_path / "stage1_train"
    originals = []
    for k, it in enumerate(scan_train_dir(SAMPLE_DIR)[:3]):
        shutil.copytree(it.image.parent.parent / "masks", root / it.id / "masks")
        (root / it.id / "images").mkdir(parents=True)
        image = np.asarray(Image.open(it.image))[..., :3]
        originals.append(image)
        if k == 1:
            Image.fromarray(image).save(root / it.id / "images" / f"{it.id}.jpg", quality=95)
        else:
            tifffile.imwrite(root / it.id / "images" / f"{it.id}.tif", image)
    items = scan_train_dir(root)
    assert [it.image.suffix for it in items] == [".tif", ".jpg", ".tif"]
    # the JPEG decodes to its image, give or take the compression
    jpeg = read_image(items[1].image).astype(int)
    assert jpeg.shape == originals[1].shape and np.abs(jpeg - originals[1]).mean() < 3
    dm = NucleiDataModule(root, img_size=32, cache_dir=tmp_path / "c", progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.arrays["images"].shape == (3, 32, 32, 3)


def test_single_files_and_vendor_formats(tmp_path, caplog):
    png = SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png"
    assert list_images(png) == [(FLUO, png)]
    folder = tmp_path / "scope"
    folder.mkdir()
    shutil.copy(png, folder / "a.png")
    (folder / "b.czi").write_bytes(b"ZISRAWFILE")
    # the raw file beside its export: skipped, with the way to export it
    with caplog.at_level(logging.WARNING, logger="unet_pl"):
        assert list_images(folder) == [("a", folder / "a.png")]
    assert "skipped 1 file of a microscope vendor's format (b.czi): open it in Fiji (Bio-Formats)" in caplog.text
    (folder / "a.png").unlink()  # nothing else to predict: the error, with the way out
    with pytest.raises(ValueError, match=r"b\.czi: \.czi files are not read here.*Fiji.*TIFF"):
        list_images(folder)
    train = tmp_path / "train"  # a training folder: an error, as a missing image would change the training
    (train / "x" / "images").mkdir(parents=True)
    (train / "x" / "images" / "x.czi").write_bytes(b"ZISRAWFILE")
    with pytest.raises(ValueError, match=r"x\.czi: \.czi files are not read here"):
        NucleiDataModule(train, img_size=32, cache_dir=tmp_path / "c", progress=False).prepare_data()
    svs = tmp_path / "slide.svs"  # a whole slide of stained tissue: no nuclear channel to save, a region to export
    svs.write_bytes(b"II*\0")
    with pytest.raises(ValueError, match=r"slide\.svs: \.svs whole-slide files are not read here; export a region.*QuPath") as e:
        list_images(svs)
    assert "nuclear channel" not in str(e.value)
    nd2 = tmp_path / "x.nd2"
    nd2.write_bytes(b"ND2")
    with pytest.raises(ValueError, match=r"\.nd2 files are not read here"):
        read_image(nd2)


@pytest.mark.parametrize("compression", ["lzw", "zstd", "jpeg", "deflate"])
def test_compressed_tiffs_read_as_the_uncompressed_image(tmp_path, compression):
    """TIFFs as microscope software and Fiji save them compressed: the pixels of the PNG they came
    from (JPEG: within its loss)."""
    rgb = read_raw(SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png")
    path = tmp_path / f"{compression}.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", compression=compression)
    got = read_raw(path)
    assert got.shape == rgb.shape
    if compression == "jpeg":
        assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 3
    else:
        assert np.array_equal(got, rgb)


def test_a_tiff_whose_codec_is_missing_says_which_package_reads_it(tmp_path):
    """Without imagecodecs (hidden here in a subprocess), an LZW TIFF is one line naming the file and
    the package, not 'corrupt'."""
    import subprocess
    import sys

    path = tmp_path / "lzw.tif"
    tifffile.imwrite(path, _fluo()[0], compression="lzw")
    code = ("import sys; sys.modules['imagecodecs'] = None\n"
            "from unet_pl.data.readers import read_raw\n"
            f"read_raw({str(path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "lzw.tif" in last and "pip install imagecodecs" in last and "corrupt" not in last, last


def test_an_ome_tiffs_id_drops_ome_in_prediction_and_in_label_image_training_folders(tmp_path):
    """``cells.ome.tif`` is the image ``cells`` (its results: labels/cells.tif), and in a label-image
    folder ``images/cells.ome.tif`` pairs with ``masks/cells.tif`` or ``masks/cells.ome.tif``."""
    grey, mask_files = _fluo()
    folder = tmp_path / "scope"
    folder.mkdir()
    tifffile.imwrite(folder / "cells.ome.tif", grey, ome=True)
    tifffile.imwrite(folder / "plain.tif", grey)
    assert [i for i, _ in list_images(folder)] == ["cells", "plain"]
    assert list_images(folder / "cells.ome.tif") == [("cells", folder / "cells.ome.tif")]
    labels = np.zeros(grey.shape, np.uint16)
    for k, f in enumerate(mask_files[:5], start=1):
        labels[np.asarray(Image.open(f)) > 0] = k
    data = tmp_path / "train"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    tifffile.imwrite(data / "images" / "a.ome.tif", grey, ome=True)
    tifffile.imwrite(data / "masks" / "a.tif", labels)
    tifffile.imwrite(data / "images" / "b.ome.tif", grey, ome=True)
    tifffile.imwrite(data / "masks" / "b.ome.tif", labels)
    items = scan_train_dir(data)
    assert [(it.id, [m.name for m in it.masks]) for it in items] == [("a", ["a.tif"]), ("b", ["b.ome.tif"])]


def test_predict_a_single_file_with_the_checkpoints_reading_settings(tmp_path):
    import subprocess
    import sys

    grey, _ = _fluo()
    model = LitUNet(img_size=32, channel=2, intensity="percentile")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    hyper = tmp_path / "cells.tif"
    tifffile.imwrite(hyper, np.stack([np.full_like(grey, 90), grey]).astype(np.uint16) * 16, imagej=True,
                     metadata={"axes": "CYX"})
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "scripts/predict.py", "--ckpt", str(tmp_path / "m.ckpt"), "--data-dir", str(hyper),
                        "--out", str(tmp_path / "s.csv"), "--gpus", "0", "--no-progress", "--masks-dir", str(tmp_path / "m")],
                       capture_output=True, text=True, cwd=root, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "channel 2" in p.stdout and "percentile" in p.stdout and "done: 1 image," in p.stdout
    from unet_pl import load_model, segment

    expected = segment(load_model(tmp_path / "m.ckpt"), tifffile.imread(hyper).transpose(1, 2, 0))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m" / "cells.png")), expected)


def test_the_cache_keys_on_channel_and_intensity(tmp_path):
    paths = {NucleiDataModule(SAMPLE_DIR, cache_dir=tmp_path, **kw).cache_path
             for kw in ({}, {"intensity": "percentile"}, {"channel": 1})}
    assert len(paths) == 3


def test_the_model_takes_the_reading_settings_from_the_data_module(tmp_path):
    dm = NucleiDataModule(SAMPLE_DIR, img_size=32, intensity="percentile", cache_dir=tmp_path, progress=False)
    model = LitUNet()
    pl.Trainer(max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(model, dm)
    assert model.settings.intensity == "percentile"
    with pytest.raises(ValueError, match="intensity"):
        pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False).fit(LitUNet(intensity="fixed"), dm)


def test_grey_intensity_makes_nuclei_bright_on_dark_in_every_modality():
    """intensity="grey": channels averaged, stretched 1-99.8%, inverted on a bright background.
    Checked by hand with numpy, and on the sample's three modalities: inside the true nuclei
    (the union of the masks) the grey image is brighter than outside, whatever the stain."""
    from unet_pl.data.holdout import image_modality
    from unet_pl.data.readers import to_rgb8

    seen = set()
    for item in scan_train_dir(SAMPLE_DIR):
        raw = read_raw(item.image)
        mod = image_modality(read_image(item.image))
        if mod in seen:
            continue
        seen.add(mod)
        grey = to_rgb8(raw, "grey")
        assert grey.shape == (*raw.shape[:2], 3) and (grey[..., 0] == grey[..., 2]).all()
        g = raw.astype(np.float32).mean(axis=2)
        lo, hi = np.percentile(g, [1.0, 99.8])
        by_hand = np.clip((g - lo) * 255.0 / (hi - lo), 0, 255)
        by_hand = 255 - by_hand if np.median(by_hand) > 127.5 else by_hand
        assert np.abs(grey[..., 0].astype(float) - np.rint(by_hand)).max() <= 1
        nuclei = np.zeros(raw.shape[:2], bool)
        for m in item.masks:
            nuclei |= np.asarray(Image.open(m)) > 0
        inside, outside = grey[..., 0][nuclei].mean(), grey[..., 0][~nuclei].mean()
        assert inside > outside + 30, (mod, inside, outside)
    assert seen == {"fluorescence", "brightfield", "histology"}


def test_grey_from_the_histogram_of_channel_sums_is_numpys_formula_to_the_level():
    """The grey rule through its lookup table (``_grey_levels``) gives exactly the float formula with
    numpy's own mean, percentiles, median and rounding: on the sample's images, and on random
    uint8 / 12-bit / 16-bit images of 1-4 channels (and 9, read without the table), constant ones and ones of a
    few levels; with each background: auto inverts where the median is above half, dark never, bright always."""
    from unet_pl.data.readers import read_levels, to_rgb8

    def formula(raw, background="auto"):
        g = (raw if raw.ndim == 3 else raw[:, :, None]).astype(np.float32).mean(axis=2)
        lo, hi = np.percentile(g, (1.0, 99.8))
        scaled = np.clip((g - lo) * (255.0 / max(float(hi - lo), 1e-6)), 0, 255)
        invert = {"auto": np.median(scaled) > 127.5, "dark": False, "bright": True}[background]
        return np.rint(255.0 - scaled if invert else scaled).astype(np.uint8), invert

    rng = np.random.default_rng(3)
    cases = [read_raw(p) for p in sorted(SAMPLE_DIR.glob("*/images/*.png"))]
    for i in range(200):
        dtype, top = [(np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535)][i % 3]
        shape = (int(rng.integers(1, 60)), int(rng.integers(1, 60)), int(rng.integers(1, 5)))
        kind = i % 4
        x = (rng.integers(0, top + 1, shape) if kind == 0 else np.full(shape, int(rng.integers(0, top + 1))) if kind == 1
             else rng.integers(0, 4, shape) * (top // 3) if kind == 2 else (top - rng.gamma(2, top / 20, shape)).clip(0, top))
        cases.append(x.astype(dtype))
    cases += [rng.integers(0, 4096, (20, 30, 9)).astype(np.uint16), (rng.integers(0, 4, (20, 30, 9)) * 80).astype(np.uint8)]
    for i, raw in enumerate(cases):
        grey = to_rgb8(raw, "grey")
        assert (grey[..., 0] == grey[..., 1]).all() and np.array_equal(grey[..., 0], formula(raw)[0]), (raw.shape, raw.dtype)
        for background in ("auto", "dark", "bright"):
            levels, inverted = read_levels(raw, "grey", background=background)
            assert (np.array_equal(levels[..., 0], formula(raw, background)[0])
                    and inverted == formula(raw, background)[1]), (i, background)
    assert read_levels(cases[0], "percentile")[1] is None and read_levels(cases[0], "fixed")[1] is None


def test_percentiles_from_the_histogram_are_numpys_and_the_lookup_is_the_formula():
    from unet_pl.data.readers import percentiles, to_rgb8

    rng = np.random.default_rng(0)
    for i in range(200):
        dtype, top = [(np.uint8, 255), (np.uint16, 4095), (np.uint16, 65535)][i % 3]
        n = int(rng.integers(1, 3000))
        values = (rng.exponential(top / 20, n) if i % 2 else rng.integers(0, top + 1, n)).clip(0, top).astype(dtype)
        raw = values.reshape(n, 1, 1)
        lo, hi = np.percentile(raw, (1.0, 99.8))
        assert percentiles(raw, (1.0, 99.8)) == (lo, hi)
        by_formula = np.clip(np.rint((raw.astype(np.float32) - lo) * (255.0 / max(float(hi - lo), 1e-6))), 0, 255)
        assert np.array_equal(to_rgb8(raw, "percentile")[..., 0], by_formula[..., 0].astype(np.uint8))
    # images larger than the histogram's counting chunk (2**18 pixels), grey and RGB
    for shape, dtype, top in (((700, 600, 1), np.uint16, 4095), ((400, 300, 3), np.uint8, 255)):
        raw = rng.exponential(top / 10, shape).clip(0, top).astype(dtype)
        assert percentiles(raw, (1.0, 99.8)) == tuple(np.percentile(raw, (1.0, 99.8)))


def test_channel_mean_is_numpys_mean_bit_for_bit():
    from unet_pl.data.readers import channel_mean
    from unet_pl.inference.outputs import intensity_image

    rng = np.random.default_rng(1)
    for shape, dtype in (((64, 80, 3), np.uint8), ((64, 80, 3), np.uint16), ((50, 40, 1), np.uint16),
                         ((30, 20, 4), np.uint8), ((30, 20, 9), np.uint16), ((30, 20), np.uint8)):
        raw = rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)
        ref = raw.astype(np.float32) if raw.ndim == 2 else raw.astype(np.float32).mean(axis=2)
        got = channel_mean(raw)
        assert got.dtype == np.float32 and got.shape == raw.shape[:2]
        assert np.array_equal(got, ref), (shape, dtype)
        assert np.array_equal(intensity_image(raw), ref)


def test_binary_mask_warning_only_for_label_image_annotations(tmp_path, caplog):
    """A competition folder has one binary mask file per nucleus, by design: no warning. Binary
    files in the label-image layout merge touching nuclei: warned once, naming every such file
    (not only when the first file in name order is one), and counting them. A label image with
    one nucleus (one value, one blob) is not a mask's mistake: no warning for it."""
    from unet_pl.data.images import TrainItem
    from unet_pl.data.images import warn_if_binary

    two = np.zeros((32, 32), np.uint8)
    two[2:10, 2:10] = 255
    two[16:28, 16:28] = 255  # two separate nuclei with one value: a binary mask
    labelled = two.copy()
    labelled[16:28, 16:28] = 2  # the same nuclei numbered: a label image
    one = np.zeros((32, 32), np.uint8)
    one[8:20, 8:20] = 1  # a label image with one nucleus
    comp = tmp_path / "abc" / "masks"
    comp.mkdir(parents=True)
    Image.fromarray(two).save(comp / "m1.png")
    flat = tmp_path / "flat" / "masks"
    flat.mkdir(parents=True)
    files = {"a": labelled, "b": one, "c": two, "d": labelled, "e": two}
    for name, array in files.items():
        Image.fromarray(array).save(flat / f"{name}.png")
    items = [TrainItem(name, tmp_path / f"flat/images/{name}.png", (flat / f"{name}.png",)) for name in files]
    with caplog.at_level(logging.WARNING):
        assert warn_if_binary([TrainItem("abc", tmp_path / "abc/images/abc.png", (comp / "m1.png",))]) == []
        assert "binary mask" not in caplog.text
        assert warn_if_binary(items[:2]) == [] and "binary mask" not in caplog.text  # the first files are fine
        assert warn_if_binary(items) == [flat / "c.png", flat / "e.png"]
    warned = [r.getMessage() for r in caplog.records if "binary mask" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 of 5 annotations are binary masks"), warned
    assert str(flat / "c.png") in warned[0] and str(flat / "e.png") in warned[0] and "a.png" not in warned[0]


# --- the label-image layout and prediction folders: nothing dropped without a word ------------------

def test_notes_in_a_training_folder_are_skipped_with_a_warning(tmp_path, caplog):
    """A README.txt or a results table beside the images is not an image that would be lost: the
    folder trains as without it, one warning naming the files (an unknown format stays an error)."""
    root = _label_layout(tmp_path / "exported", n=3)
    want = [(it.id, it.image.name) for it in scan_train_dir(root)]
    (root / "images" / "notes.txt").write_text("stained 2026-11-30")
    (root / "images" / "cells_seg.npy").write_bytes(b"x")
    with caplog.at_level(logging.WARNING):
        assert [(it.id, it.image.name) for it in scan_train_dir(root)] == want
    warned = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(warned) == 1 and "notes.txt" in warned[0] and "cells_seg.npy" in warned[0], caplog.text


def test_an_unsupported_file_in_images_is_an_error_naming_it(tmp_path):
    root = _label_layout(tmp_path / "exported", n=3)
    shutil.copy(SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png", root / "images" / "x.gif")  # a GIF in name only is enough
    (root / "images" / "._x.tif").write_bytes(b"\0")  # macOS' shadow file: hidden, never an error
    with pytest.raises(ValueError, match=r"images/x\.gif: not an image format read here.*save it as TIFF or PNG"):
        scan_train_dir(root)
    with pytest.raises(ValueError, match=r"x\.gif"):
        NucleiDataModule(root, cache_dir=tmp_path / "c", progress=False).prepare_data()


def test_an_annotation_in_an_unread_format_is_an_error_and_orphans_are_warned(tmp_path, caplog):
    root = _label_layout(tmp_path / "exported", n=3)
    first = sorted((root / "masks").iterdir())[0]
    tifffile.imwrite(root / "masks" / "orphan.tif", tifffile.imread(first))
    (root / "masks" / "notes.txt").write_text("drawn by hand")
    with caplog.at_level(logging.WARNING):
        items = scan_train_dir(root)
    assert len(items) == 3 and all(len(it.masks) == 1 for it in items)
    warned = [r.getMessage() for r in caplog.records if "orphan.tif" in r.getMessage()]
    assert len(warned) == 1 and "notes.txt" in warned[0] and "2 files without an image" in warned[0]
    # the annotation of an image, in a format not read: named, not "no label image"
    first.rename(first.with_suffix(".gif"))
    with pytest.raises(ValueError, match=rf"{first.stem}\.gif: not an image format read here"):
        scan_train_dir(root)


def test_a_prediction_folder_says_which_files_it_skips(tmp_path, caplog):
    png = SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png"
    shutil.copy(png, tmp_path / "a.png")
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    (tmp_path / "c.webp").write_bytes(b"RIFF")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING):
        assert list_images(tmp_path) == [("a", tmp_path / "a.png")]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "b.gif, c.webp" in skipped[0] and "DS_Store" not in skipped[0]


def test_predict_takes_the_folder_holding_stage1_train_as_train_does(tmp_path, caplog):
    holding = SAMPLE_DIR.parent  # unet_pl/sample: stage1_train, its labels CSV and a README
    assert list_images(holding) == list_images(SAMPLE_DIR) and len(list_images(holding)) == 30
    both = tmp_path / "download"
    for name in ("stage1_train", "stage1_test"):
        (both / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"holds stage1_train and stage1_test; pass the one you mean"):
        list_images(both)
    # a folder of images with a subfolder that is not <id>/images/ (an empty results/): skipped, said
    stray = tmp_path / "scope"
    (stray / "results").mkdir(parents=True)
    shutil.copy(SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png", stray / "a.png")
    with caplog.at_level(logging.WARNING):
        assert list_images(stray) == [("a", stray / "a.png")]
    assert any("skipped 1 folder" in r.getMessage() and "results/" in r.getMessage() for r in caplog.records)
    # one with images/ but not its <id> image is a broken competition folder: said as such
    (stray / "x" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as e:
        list_images(stray)
    assert "competition's layout" in str(e.value) and "remove" not in str(e.value)


def test_a_single_image_file_as_training_data_dir_names_both_layouts(tmp_path):
    png = SAMPLE_DIR / FLUO / "images" / f"{FLUO}.png"
    with pytest.raises(ValueError, match=r"is a file; training takes a folder: the competition's stage1_train.*"
                                         r"images/ with masks/ \(or labels/\) label images"):
        NucleiDataModule(png, cache_dir=tmp_path, progress=False).prepare_data()


def test_evaluate_warns_about_binary_truth_and_names_an_image_given_as_truth(tmp_path, caplog, capsys):
    from unet_pl.cli.evaluate import main
    from unet_pl.evaluation import load_truth

    root = _label_layout(tmp_path / "exported", n=2)
    for m in (root / "masks").iterdir():  # label images flattened to {0, 255}: touching nuclei merge
        tifffile.imwrite(m, ((tifffile.imread(m) > 0) * 255).astype(np.uint8))
    with caplog.at_level(logging.WARNING):
        load_truth(root)
    assert "binary mask" in caplog.text and "scored as one nucleus" in caplog.text
    pred = tmp_path / "p.csv"
    pred.write_text("ImageId,EncodedPixels\n")
    image = sorted((root / "images").iterdir())[0]
    with pytest.raises(SystemExit) as e:
        main(["--pred", str(pred), "--truth", str(image)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert image.name in err and "--truth" in err and "run-length CSV" in err and "codec" not in err


def test_predict_cli_channel_2_on_a_hyperstack_with_a_checkpoint_saved_without_channel(tmp_path):
    """--channel 2 at prediction picks the nuclear plane of an ImageJ hyperstack for a checkpoint that
    recorded no channel: the nuclei equal those of the nuclear plane saved alone."""
    import subprocess
    import sys

    from unet_pl import load_model, segment

    grey, _ = _fluo()
    model = LitUNet(img_size=32, intensity="percentile")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    nuclear = grey.astype(np.uint16) * 16
    hyper, alone = tmp_path / "cells.tif", tmp_path / "nuclei.tif"
    tifffile.imwrite(hyper, np.stack([np.full_like(nuclear, 1440), nuclear]), imagej=True, metadata={"axes": "CYX"})
    tifffile.imwrite(alone, nuclear)
    root = Path(__file__).resolve().parents[1]

    def predict(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "scripts/predict.py", "--ckpt", str(tmp_path / "m.ckpt"), "--data-dir",
                               str(hyper), "--out", str(tmp_path / "s.csv"), "--gpus", "0", "--no-progress",
                               "--masks-dir", str(tmp_path / "m"), *flags], capture_output=True, text=True, cwd=root,
                              timeout=120)

    p = predict()
    assert p.returncode != 0 and "has 2 channels; pass --channel N" in p.stderr
    p = predict("--channel", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "channel 2" in p.stdout and "done: 1 image," in p.stdout
    expected = segment(load_model(tmp_path / "m.ckpt"), alone)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "m" / "cells.png")), expected)


def test_channels_are_never_taken_for_rgb_and_unnamed_planes_name_both_ways_out(tmp_path):
    """An 8-bit ImageJ stack of 3 channels (DAPI/GFP/RFP) is three stains, as in 16 bits, not R, G
    and B: it needs --channel, which picks the plane; so are three samples of a pixel whose photometric
    says grey (grey + alpha: the grey). A plain 2-page TIFF without metadata could
    hold channels or z-planes: the error says both, and --channel picks a page."""
    planes = np.random.default_rng(0).integers(0, 256, (3, 24, 32), dtype=np.uint8)
    stack = tmp_path / "dapi_gfp_rfp.tif"
    tifffile.imwrite(stack, planes, imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(ValueError, match=r"has 3 channels; pass --channel N .*RGB Color"):
        read_raw(stack)
    assert np.array_equal(read_raw(stack, 3)[..., 0], planes[2])
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.moveaxis(planes, 0, 2))  # samples of one pixel: colour
    assert np.array_equal(read_raw(rgb), np.moveaxis(planes, 0, 2))
    grey_samples = tmp_path / "minisblack.tif"  # three samples of a grey pixel: channels, not colour
    tifffile.imwrite(grey_samples, np.moveaxis(planes, 0, 2), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ValueError, match=r"has 3 channels; pass --channel N"):
        read_raw(grey_samples)
    assert np.array_equal(read_raw(grey_samples, 2)[..., 0], planes[1])
    grey_alpha = tmp_path / "grey_alpha.tif"
    tifffile.imwrite(grey_alpha, np.moveaxis(planes[:2], 0, 2), photometric="minisblack", extrasamples=["unassalpha"])
    assert np.array_equal(read_raw(grey_alpha)[..., 0], planes[0])
    pages = tmp_path / "two_pages.tif"
    tifffile.imwrite(pages, planes[:2], metadata=None)
    with pytest.raises(ValueError) as e:
        read_raw(pages)
    assert "--channel N (1 to 2)" in str(e.value) and "Z Project" in str(e.value)
    assert np.array_equal(read_raw(pages, 2)[..., 0], planes[1])


def test_hematoxylin_intensity_is_rgb2hed_on_stained_tissue_and_grey_elsewhere():
    """intensity="hematoxylin": on colour images with a bright background, scikit-image's
    haematoxylin channel stretched 1-99.8% (nuclei bright, whatever the stain's hue); on every
    other image exactly the "grey" rule. On the sample's histology the nuclei are brighter than the
    rest."""
    from skimage.color import rgb2hed

    from unet_pl.data.holdout import image_modality
    from unet_pl.data.readers import to_rgb8

    kinds = set()
    for item in scan_train_dir(SAMPLE_DIR):
        raw = read_raw(item.image)
        mod = image_modality(read_image(item.image))
        out = to_rgb8(raw, "hematoxylin")
        assert out.shape == (*raw.shape[:2], 3) and out.dtype == np.uint8 and (out[..., 0] == out[..., 2]).all()
        if mod != "histology":
            assert np.array_equal(out, to_rgb8(raw, "grey")), mod
            kinds.add(mod)
            continue
        kinds.add(mod)
        h = rgb2hed(raw[..., :3])[..., 0]
        lo, hi = np.percentile(h, [1.0, 99.8])
        by_hand = np.rint(np.clip((h - lo) * 255.0 / (hi - lo), 0, 255))
        assert np.abs(out[..., 0].astype(float) - by_hand).max() <= 1
        nuclei = np.zeros(raw.shape[:2], bool)
        for m in item.masks:
            nuclei |= np.asarray(Image.open(m)) > 0
        inside, outside = out[..., 0][nuclei].mean(), out[..., 0][~nuclei].mean()
        assert inside > outside + 30, (inside, outside)
        # the same tissue as 12-bit data in a 16-bit file is deconvolved too, to about the same image
        out12 = to_rgb8(raw[..., :3].astype(np.uint16) * 16, "hematoxylin")
        assert np.abs(out12.astype(int) - out.astype(int)).mean() < 2
    assert kinds == {"fluorescence", "brightfield", "histology"}
    # a colour image on a dark background (tinted fluorescence) is not deconvolved
    tinted = np.zeros((32, 32, 3), np.uint8)
    tinted[8:16, 8:16] = (40, 90, 200)
    assert np.array_equal(to_rgb8(tinted, "hematoxylin"), to_rgb8(tinted, "grey"))


@pytest.mark.parametrize("kind", ["imagej", "ome"])
@pytest.mark.parametrize("keep", [0.5, 0.75, -100])
def test_a_cut_off_multichannel_tiff_is_refused_not_read_as_its_first_channel(tmp_path, kind, keep, caplog):
    """A hyperstack or OME-TIFF copied only in part (a full disk, an interrupted transfer): tifffile
    still finds its first page and returns it as a grey image, with the file's channel 1 for
    every --channel. The reader refuses the file instead, in its own one message (tifffile's raw
    log lines not printed), and reads the whole file as before."""
    stack = np.random.default_rng(0).integers(0, 4096, (3, 128, 160)).astype(np.uint16)  # 12-bit data
    whole = tmp_path / f"cells.{'ome.' if kind == 'ome' else ''}tif"
    extra = {"imagej": True} if kind == "imagej" else {"ome": True}
    tifffile.imwrite(whole, stack, metadata={"axes": "CYX"}, **extra)
    assert np.array_equal(read_raw(whole, 2)[..., 0], stack[1])
    data = whole.read_bytes()
    cut = tmp_path / f"cut_{whole.name}"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[:keep])
    caplog.clear()
    with caplog.at_level(logging.DEBUG), pytest.raises(ValueError, match=r"cut_cells.*(this TIFF is cut off or damaged|corrupt or truncated)"):
        read_raw(cut, 2)
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.records


def test_float_files_of_whole_numbers_are_read_as_those_integers(tmp_path):
    """Fiji and QuPath save label images (and sometimes camera counts) as 32-bit float: whole numbers
    are read as the integers they hold, the same nuclei and pixels as the integer file; a float image
    with fractions (deconvolved data) is refused in one message saying how to convert it."""
    from unet_pl.data.readers import read_label_image

    labels = decode_masks(*_sample_shape_and_masks())
    tifffile.imwrite(tmp_path / "labels_int.tif", labels.astype(np.uint16))
    tifffile.imwrite(tmp_path / "labels_float.tif", labels.astype(np.float32))
    assert np.array_equal(read_label_image(tmp_path / "labels_float.tif"), read_label_image(tmp_path / "labels_int.tif"))
    counts = np.random.default_rng(0).integers(0, 4096, (64, 80)).astype(np.float32)  # 12-bit counts as float
    tifffile.imwrite(tmp_path / "counts.tif", counts)
    got = read_raw(tmp_path / "counts.tif")
    assert got.dtype == np.uint16 and np.array_equal(got[..., 0], counts.astype(np.uint16))
    tifffile.imwrite(tmp_path / "deconvolved.tif", counts / 7.0)
    with pytest.raises(ValueError, match=r"deconvolved\.tif: float32 pixels with fractions .*Image > Type > 16-bit"):
        read_raw(tmp_path / "deconvolved.tif")


def _sample_shape_and_masks():
    it = scan_train_dir(SAMPLE_DIR)[0]
    return np.asarray(Image.open(it.image)).shape[:2], list(it.masks)


def test_a_label_image_saved_in_colour_keeps_one_nucleus_per_colour(tmp_path):
    """One RGB colour per nucleus (Fiji's glasbey LUT saved as RGB, a napari screenshot of labels):
    touching nuclei of different colours stay apart, each colour's pixels one nucleus; a mask drawn
    in one colour is binary (split into its blobs) as before."""
    from unet_pl.data.readers import read_label_image

    labels = np.zeros((40, 48), np.int32)
    labels[5:20, 5:20] = 1
    labels[5:20, 20:35] = 2  # touching nucleus 1
    labels[25:35, 10:40] = 3
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 255], [255, 0, 1]], np.uint8)  # 1 and 3 differ in one bit of blue
    Image.fromarray(palette[labels]).save(tmp_path / "colour.png")
    got = read_label_image(tmp_path / "colour.png")
    assert len(np.unique(got[got > 0])) == 3
    for k in (1, 2, 3):  # each true nucleus is exactly one label's pixels
        values = np.unique(got[labels == k])
        assert len(values) == 1 and values[0] > 0 and np.array_equal(got == values[0], labels == k), k
    decoded = decode_masks(labels.shape, [tmp_path / "colour.png"])
    assert decoded.max() == 3 and len(np.unique(decoded[labels == 1])) == 1
    one = np.where((labels > 0)[..., None], palette[1], 0).astype(np.uint8)
    Image.fromarray(one).save(tmp_path / "mask.png")
    assert decode_masks(labels.shape, [tmp_path / "mask.png"]).max() == 2  # two blobs: 1+2 touching, and 3
    # a JPEG has no exact colours (its edges blur into many): read as foreground, not as a colour per value
    Image.fromarray(palette[labels]).save(tmp_path / "colour.jpg", quality=90)
    assert set(np.unique(read_label_image(tmp_path / "colour.jpg"))) == {0, 1}


def test_a_colour_fluorescence_merge_read_without_a_channel_is_named_with_the_way_out(tmp_path, caplog):
    """An RGB merge (DAPI in blue, a cytoplasm stain in red) on a dark background: the grey rule
    averages the stains, so the cells read as nuclei. The file is named with --channel; with the
    channel picked, or for H&E on white and grey fluorescence, nothing is said."""
    from scipy import ndimage as ndi

    from unet_pl.data.readers import reset_dark_warnings, to_rgb8

    grey, masks = _fluo()
    cells = ndi.grey_dilation(grey, size=(9, 9))  # each nucleus' cell: a larger blob around it
    merge = tmp_path / "merge.tif"
    tifffile.imwrite(merge, np.stack([cells, np.zeros_like(grey), grey], axis=-1), photometric="rgb")
    reset_dark_warnings()
    with caplog.at_level(logging.WARNING):
        averaged = read_image(merge, intensity="grey")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "merge.tif" in said[0] and "--channel 3" in said[0], said
    assert "crowded with nuclei (H&E)" in said[0] and "--background bright" in said[0]  # the other way it happens
    caplog.clear()
    reset_dark_warnings()
    with caplog.at_level(logging.WARNING):  # a background given is the user's reading already: not second-guessed
        to_rgb8(read_raw(merge), "grey", merge, background="dark")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # what the warning is about: averaged, the cells read bright where the nucleus alone does not
    nuclei = np.zeros(grey.shape, bool)
    for m in masks:
        nuclei |= np.asarray(Image.open(m)) > 0
    around = ndi.binary_dilation(nuclei, iterations=3) & ~nuclei
    blue = read_image(merge, channel=3, intensity="grey")
    assert averaged[..., 0][around].mean() > blue[..., 0][around].mean() + 20
    caplog.clear()
    dapi = tmp_path / "dapi_blue.tif"  # one stain shown in blue (Fiji's "RGB Color"): the grey rule reads it as --channel 3 does
    tifffile.imwrite(dapi, np.stack([np.zeros_like(grey), np.zeros_like(grey), grey], axis=-1), photometric="rgb")
    with caplog.at_level(logging.WARNING):
        read_image(merge, channel=3, intensity="grey")
        assert np.array_equal(read_image(dapi, intensity="grey"), read_image(dapi, channel=3, intensity="grey"))
        for item in scan_train_dir(SAMPLE_DIR):  # H&E on white, brightfield, grey fluorescence (RGBA PNGs)
            to_rgb8(read_raw(item.image), "grey", item.image)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_a_cellpose_training_folder_images_beside_their_masks_trains_as_it_is(tmp_path, caplog):
    """Cellpose's layout: <name>.tif beside <name>_masks.tif (or _cp_masks.png) in one folder, with
    its models/ subfolder, _seg.npy files and <name>_flows.tif outputs: read as the images/ + masks/
    layout of the same files (same images, same nuclei), the extra files skipped with a warning."""
    flat = _label_layout(tmp_path / "exported", n=4)
    cellpose = tmp_path / "cellpose_train"
    (cellpose / "models").mkdir(parents=True)
    ids = [it.id for it in scan_train_dir(flat)]
    for k, i in enumerate(ids):
        shutil.copy(flat / "images" / f"{i}.tif", cellpose / f"{i}.tif")
        shutil.copy(flat / "masks" / f"{i}.tif", cellpose / f"{i}{'_masks' if k % 2 else '_cp_masks'}.tif")
    shutil.copy(flat / "masks" / f"{ids[0]}.tif", cellpose / "gone_masks.tif")  # its image deleted: said, not trained on
    (cellpose / f"{ids[0]}_seg.npy").write_bytes(b"\x93NUMPY")
    tifffile.imwrite(cellpose / f"{ids[1]}_flows.tif", np.zeros((4, 8, 8), np.uint8), photometric="minisblack")
    with caplog.at_level(logging.WARNING):
        items = scan_train_dir(cellpose)
    assert [it.id for it in items] == ids
    assert "_flows.tif" in caplog.text and "_seg.npy" in caplog.text and "gone_masks.tif" in caplog.text
    for it, ref in zip(items, scan_train_dir(flat)):
        assert it.image.name == ref.image.name and len(it.masks) == 1
        shape = tifffile.imread(it.image).shape[:2]
        assert np.array_equal(decode_masks(shape, list(it.masks)), decode_masks(shape, list(ref.masks)))
    # predicting the same folder segments the images only, the label images and outputs named as skipped
    from unet_pl.data.images import list_images

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [i for i, _ in list_images(cellpose)] == ids
    assert f"{ids[0]}_cp_masks.tif" in caplog.text and "_flows.tif" in caplog.text
    # an image there without its mask: the error says which file to put beside it
    lone = tmp_path / "lone"
    lone.mkdir()
    for i in ids[:2]:
        shutil.copy(flat / "images" / f"{i}.tif", lone / f"{i}.tif")
    shutil.copy(flat / "masks" / f"{ids[0]}.tif", lone / f"{ids[0]}_masks.tif")
    with pytest.raises(ValueError, match=rf"{ids[1]}\.tif has no {ids[1]}_masks\.tif .* beside it"):
        NucleiDataModule(lone, cache_dir=tmp_path / "cache", num_workers=0, progress=False).prepare_data()
    # OME-TIFFs as Cellpose names their masks: a.ome.tif and a.ome_masks.tif
    ome = tmp_path / "ome"
    ome.mkdir()
    for i in ids[:2]:
        shutil.copy(flat / "images" / f"{i}.tif", ome / f"{i}.ome.tif")
        shutil.copy(flat / "masks" / f"{i}.tif", ome / f"{i}.ome_masks.tif")
    assert [(it.id, it.masks[0].name) for it in scan_train_dir(ome)] == [(i, f"{i}.ome_masks.tif") for i in ids[:2]]
    assert [i for i, _ in list_images(ome)] == ids[:2]
    # the competition layout beside a stray image and its mask is still the competition layout
    competition = tmp_path / "stage1_train"
    shutil.copytree(SAMPLE_DIR / FLUO, competition / FLUO)
    shutil.copy(flat / "images" / f"{ids[0]}.tif", competition / "overview.tif")
    shutil.copy(flat / "masks" / f"{ids[0]}.tif", competition / "overview_mask.tif")
    assert [it.id for it in scan_train_dir(competition)] == [FLUO]
