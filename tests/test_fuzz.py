"""Mutated files into the readers and the CLIs, seeded from real files: only our documented errors
come out (ValueError / FileNotFoundError from the library, exit 2 with one line from a CLI), no
traceback, no hang, nothing written outside the output folder. Bounded: a fixed number of mutants
per format, each call under an alarm; the whole file takes well under a minute on 2 cores.
docs/reliability.md counts the calls."""
from __future__ import annotations

import csv
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from unet_pl.data import SAMPLE_DIR

MUTANTS = 24  # per format
CALL_SECONDS = 30
DOCUMENTED = (ValueError, FileNotFoundError)


def mutants(data: bytes, seed: int, n: int = MUTANTS, alphabet: bytes | None = None) -> Iterator[bytes]:
    """Truncations, flipped bytes, overwritten runs and insertions of ``data``, reproducibly. With
    ``alphabet``, runs are overwritten and inserted with its characters and bits are not flipped (a
    flipped bit makes a byte its neighbour in the alphabet): text that still parses as text, so the
    mutant reaches past the decoder."""
    rng = np.random.default_rng(seed)
    table = np.frombuffer(alphabet, np.uint8) if alphabet else None

    def noise(size: int) -> bytes:
        if table is None:
            return rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        return table[rng.integers(0, len(table), size)].tobytes()

    for k in range(n):
        b = bytearray(data)
        at = int(rng.integers(0, len(b)))
        if k % 4 == 0:
            del b[at:]
        elif k % 4 == 1:
            for pos in rng.integers(0, len(b), int(rng.integers(1, 17))):
                if table is None:
                    b[pos] ^= 1 << int(rng.integers(0, 8))
                else:
                    b[pos] = int(table[rng.integers(0, len(table))])
        elif k % 4 == 2:
            run = int(rng.integers(1, 64))
            b[at:at + run] = noise(run)
        else:
            b[at:at] = noise(int(rng.integers(1, 64)))
        yield bytes(b)


def _alarm(signum, frame):
    raise TimeoutError(f"a call took more than {CALL_SECONDS} s: a hang")


@pytest.fixture(autouse=True)
def _no_hang():
    old = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def call_reader(fn: Callable, *args) -> str:
    """``fn(*args)`` must return or raise a documented error naming no other than our own words."""
    signal.alarm(CALL_SECONDS)
    try:
        fn(*args)
        return "ok"
    except DOCUMENTED as e:
        assert str(e).strip(), f"{type(e).__name__} without a message"
        return "error"
    finally:
        signal.alarm(0)


def call_cli(main: Callable, argv: list[str], capsys) -> str:
    """A CLI run in-process must end with exit 0, or exit 2 and one line on stderr."""
    signal.alarm(CALL_SECONDS)
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.alarm(0)
    err = capsys.readouterr().err.strip()
    assert code in (0, None, 2), (code, err)
    if code == 2:
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return "error"
    return "ok"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A real LitUNet checkpoint as Lightning writes it (untrained; 32 px squares, so prediction is cheap)."""
    import lightning.pytorch as pl

    from unet_pl import LitUNet

    path = tmp_path_factory.mktemp("ckpt") / "seed.ckpt"
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(LitUNet(img_size=32))
    trainer.save_checkpoint(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _real_image(suffix: str) -> Path:
    return sorted(SAMPLE_DIR.glob(f"*/images/*{suffix}"))[0]


def _image_seeds(folder: Path) -> tuple[Path, Path, Path]:
    """A sample PNG, the same pixels as a TIFF (as tifffile writes it for microscopes), and one of its masks."""
    import tifffile
    from PIL import Image

    png = _real_image(".png")
    tif = folder / "seed.tif"
    tifffile.imwrite(tif, np.asarray(Image.open(png).convert("RGB")), photometric="rgb")
    return png, tif, sorted((png.parent.parent / "masks").glob("*.png"))[0]


def test_fuzz_image_readers(tmp_path):
    from unet_pl.data.images import image_size, read_image, read_mask

    png, tif, mask = _image_seeds(tmp_path)
    outcomes = []
    for k, (seed_file, readers) in enumerate([(png, (read_image, image_size)), (tif, (read_image, image_size)),
                                               (mask, (read_mask,))]):
        for j, data in enumerate(mutants(seed_file.read_bytes(), seed=k)):
            path = tmp_path / f"m{k}_{j}{seed_file.suffix}"
            path.write_bytes(data)
            outcomes += [call_reader(reader, path) for reader in readers]
    assert "error" in outcomes and "ok" in outcomes  # the mutations broke some files, not all


def test_fuzz_images_into_predict_and_the_data_module(tmp_path, tiny_ckpt, capsys):
    """Every third PNG and TIFF mutant of test_fuzz_image_readers (the same seeds) as the one image of a
    predict.py folder, and as an image of a training folder (its real masks beside it, and a second,
    untouched sample image: training needs two) whose cache NucleiDataModule.prepare_data builds, at
    32 px squares and at native size in turn."""
    from unet_pl import NucleiDataModule
    from unet_pl.cli.predict import main as predict

    capsys.readouterr()  # what the fixtures printed is not the CLI's
    png, tif, _ = _image_seeds(tmp_path)
    masks = png.parent.parent / "masks"
    other = next(d for d in sorted(SAMPLE_DIR.iterdir()) if d.is_dir() and d != png.parent.parent)
    out = tmp_path / "out"
    predicted, decoded = [], []
    for k, seed_file in enumerate((png, tif)):
        for j, data in enumerate(mutants(seed_file.read_bytes(), seed=k)):
            if j % 3:
                continue
            name = f"m{k}_{j}"
            images = tmp_path / "predict" / name
            images.mkdir(parents=True)
            (images / f"a{seed_file.suffix}").write_bytes(data)
            before = snapshot(images)
            predicted.append(call_cli(predict, ["--ckpt", str(tiny_ckpt), "--data-dir", str(images), "--gpus", "0",
                                                "--out-dir", str(out / name), "--num-workers", "0", "--no-progress"],
                                      capsys))
            assert snapshot(images) == before
            item = tmp_path / "train" / name / name
            (item / "images").mkdir(parents=True)
            (item / "images" / f"{name}{seed_file.suffix}").write_bytes(data)
            shutil.copytree(masks, item / "masks")
            shutil.copytree(other, item.parent / other.name)
            before = snapshot(item.parent)
            dm = NucleiDataModule(item.parent, img_size=32, cache_dir=tmp_path / "cache", progress=False,
                                  resolution="native" if j % 2 else "resize")
            decoded.append(call_reader(dm.prepare_data))
            assert snapshot(item.parent) == before
    assert "error" in predicted and "ok" in predicted and "error" in decoded and "ok" in decoded, (predicted, decoded)
    assert {p.name for p in tmp_path.iterdir()} == {"seed.tif", "predict", "train", "out", "cache"}
    assert not list((tmp_path / "cache").glob("*.tmp"))  # a failed decoding leaves no half-written cache


def test_fuzz_checkpoints_into_the_loader_and_predict(tmp_path, tiny_ckpt, capsys):
    from unet_pl.cli.predict import main as predict
    from unet_pl.inference.checkpoint import model_from_checkpoint, read_checkpoint

    shutil.copy(tiny_ckpt, tmp_path / "seed.ckpt")
    capsys.readouterr()  # INFO lines the seed's Trainer may have logged into this capture are not predict.py's
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(_real_image(".png"), images / "a.png")
    out = tmp_path / "out"
    before = snapshot(images)

    def load(path):
        return model_from_checkpoint(read_checkpoint(path), path)

    outcomes = []
    for j, data in enumerate(mutants((tmp_path / "seed.ckpt").read_bytes(), seed=10, n=MUTANTS // 2)):
        path = tmp_path / f"m{j}.ckpt"
        path.write_bytes(data)
        outcomes.append(call_reader(load, path))
        outcomes.append(call_cli(predict, ["--ckpt", str(path), "--data-dir", str(images), "--out", str(out / "s.csv"),
                                           "--gpus", "0", "--no-progress"], capsys))
    assert "error" in outcomes and snapshot(images) == before
    assert {p.name for p in tmp_path.iterdir()} <= {"seed.ckpt", "images", "out", *(f"m{j}.ckpt" for j in range(MUTANTS))}


def test_fuzz_keras_h5(tmp_path, capsys):
    import h5py

    from unet_pl.cli.predict import main as predict
    from unet_pl.keras import read_keras_convs

    seed = tmp_path / "seed.h5"
    with h5py.File(seed, "w") as f:  # the legacy Keras 2 layout, one conv layer
        f.attrs["layer_names"] = [b"conv2d_1"]
        g = f.create_group("conv2d_1")
        g.attrs["weight_names"] = [b"conv2d_1/kernel:0", b"conv2d_1/bias:0"]
        g.create_dataset("conv2d_1/kernel:0", data=np.zeros((3, 3, 3, 8), np.float32))
        g.create_dataset("conv2d_1/bias:0", data=np.zeros(8, np.float32))
    outcomes = []
    for j, data in enumerate(mutants(seed.read_bytes(), seed=20)):
        path = tmp_path / f"m{j}.h5"
        path.write_bytes(data)
        outcomes.append(call_reader(read_keras_convs, path))
        if j % 4 == 0:
            outcomes.append(call_cli(predict, ["--keras-h5", str(path), "--data-dir", str(tmp_path), "--gpus", "0"], capsys))
    assert "error" in outcomes


def test_fuzz_run_length_csvs_into_evaluate(tmp_path, capsys):
    """The bundled sample's own stage1_train_labels.csv, mutated, as the prediction; the sample (that CSV
    beside its image folders) as the truth. Half the mutants are bytes (mostly not text any more), half
    the characters of the format (digits, spaces, commas, newlines, a minus, a letter): those reach the
    run-length parser and the scoring."""
    from unet_pl.cli.evaluate import main as evaluate
    from unet_pl.data.images import read_labels_csv

    truth = SAMPLE_DIR.parent / "stage1_train_labels.csv"
    assert truth.is_file(), "the bundled sample lost its run-length CSV"
    rows = list(csv.reader(truth.open()))
    assert rows[0] == ["ImageId", "EncodedPixels"] and len(rows) > 1000  # real masks, every nucleus of 30 images
    before = snapshot(SAMPLE_DIR.parent)
    outcomes = []
    data = truth.read_bytes()
    kinds = (mutants(data, seed=30, n=MUTANTS // 2), mutants(data, seed=31, n=MUTANTS // 2, alphabet=b"0123456789 ,\n-a"))
    for j, data in enumerate(m for kind in kinds for m in kind):
        path = tmp_path / f"m{j}.csv"
        path.write_bytes(data)
        outcomes.append(call_reader(read_labels_csv, path))
        outcomes.append(call_cli(evaluate, ["--pred", str(path), "--truth", str(truth)], capsys))
    assert "error" in outcomes and "ok" in outcomes and snapshot(SAMPLE_DIR.parent) == before
    assert sorted(os.listdir(tmp_path)) == sorted(f"m{j}.csv" for j in range(MUTANTS))  # nothing else written
