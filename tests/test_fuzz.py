"""Mutated files into the readers and the CLIs, seeded from real files: only our documented errors
come out (ValueError / FileNotFoundError from the library, exit 2 with one line from a CLI), no
traceback, no hang, nothing written outside the output folder. Bounded: a fixed number of mutants
per format, each call under an alarm."""
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


def mutants(data: bytes, seed: int, n: int = MUTANTS) -> Iterator[bytes]:
    """Truncations, flipped bytes, overwritten runs and insertions of ``data``, reproducibly."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        b = bytearray(data)
        at = int(rng.integers(0, len(b)))
        if k % 4 == 0:
            del b[at:]
        elif k % 4 == 1:
            for pos in rng.integers(0, len(b), int(rng.integers(1, 17))):
                b[pos] ^= 1 << int(rng.integers(0, 8))
        elif k % 4 == 2:
            run = int(rng.integers(1, 64))
            b[at:at + run] = rng.integers(0, 256, run, dtype=np.uint8).tobytes()
        else:
            b[at:at] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
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


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _real_image(suffix: str) -> Path:
    return sorted(SAMPLE_DIR.glob(f"*/images/*{suffix}"))[0]


def test_fuzz_image_readers(tmp_path):
    from PIL import Image

    from unet_pl.data.images import read_image, read_mask

    png = _real_image(".png")
    tif = tmp_path / "seed.tif"
    Image.open(png).convert("RGB").save(tif)
    mask = sorted((png.parent.parent / "masks").glob("*.png"))[0]
    outcomes = []
    for k, (seed_file, reader) in enumerate([(png, read_image), (tif, read_image), (mask, read_mask)]):
        for j, data in enumerate(mutants(seed_file.read_bytes(), seed=k)):
            path = tmp_path / f"m{k}_{j}{seed_file.suffix}"
            path.write_bytes(data)
            outcomes.append(call_reader(reader, path))
    assert "error" in outcomes  # the mutations did break files


def test_fuzz_checkpoints_into_the_loader_and_predict(tmp_path, capsys):
    import lightning.pytorch as pl

    from unet_pl import LitUNet
    from unet_pl.cli.predict import main as predict
    from unet_pl.inference.checkpoint import model_from_checkpoint, read_checkpoint

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(LitUNet(img_size=32))
    trainer.save_checkpoint(tmp_path / "seed.ckpt")
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


def test_fuzz_run_length_csvs_into_evaluate(make_train_dir, tmp_path, capsys):
    from unet_pl.cli.evaluate import main as evaluate
    from unet_pl.data.images import read_labels_csv
    from unet_pl.rle import encode

    truth = make_train_dir(n=2)
    seed = tmp_path / "seed.csv"
    with open(seed, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "EncodedPixels"])
        for d in sorted(truth.iterdir()):
            from unet_pl.data.images import read_mask

            for m in sorted((d / "masks").iterdir()):
                w.writerow([d.name, encode(read_mask(m))])
    before = snapshot(truth)
    outcomes = []
    for j, data in enumerate(mutants(seed.read_bytes(), seed=30)):
        path = tmp_path / f"m{j}.csv"
        path.write_bytes(data)
        outcomes.append(call_reader(read_labels_csv, path))
        outcomes.append(call_cli(evaluate, ["--pred", str(path), "--truth", str(truth)], capsys))
    assert "error" in outcomes and snapshot(truth) == before
    assert not any(p.suffix not in (".csv",) for p in tmp_path.iterdir() if p.is_file())
    assert os.listdir(tmp_path)  # sanity: the mutants were written where we looked
