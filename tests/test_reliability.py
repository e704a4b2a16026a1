"""Nothing lost, nothing executed: each bad input or fault ends in one line and exit status 2, before
any long work, and never runs code from a file or overwrites a run. docs/reliability.md lists them."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import write_png

from unet_pl import LitUNet, NucleiDataModule

ROOT = Path(__file__).resolve().parents[1]


def save_ckpt(path: Path, **hparams) -> Path:
    """A real LitUNet checkpoint (untrained) as Lightning writes it."""
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(LitUNet(**hparams))
    trainer.save_checkpoint(path)
    return path


class _Marker:
    """Unpickling this creates a file: what a crafted checkpoint could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"payload": _Marker(marker)}}, path)
    return path


def one_line_exit_2(main, argv, capsys) -> str:
    """Run a CLI main in-process: it must exit 2 with one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------- checkpoints never run code


def test_a_crafted_checkpoint_runs_nothing_anywhere_we_load_one(tmp_path, capsys):
    from unet_pl.cli.predict import main as predict
    from unet_pl.cli.train import main as train

    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError):  # weights_only by default
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    err = one_line_exit_2(train, ["--gpus", "0", "--resume", str(evil), "--out", str(tmp_path / "run")], capsys)
    assert "evil.ckpt" in err and not marker.exists()
    err = one_line_exit_2(predict, ["--ckpt", str(evil), "--data-dir", str(tmp_path), "--gpus", "0"], capsys)
    assert "evil.ckpt" in err and not marker.exists()
    with pytest.raises(ValueError) as e:
        LitUNet.load_from_checkpoint(evil)  # as the README shows it
    message = str(e.value)
    assert "evil.ckpt" in message and "refused" in message and len(message.splitlines()) == 1
    assert "weights_only" not in message and e.value.__cause__ is None
    assert not marker.exists()
    # unet-fit --ckpt_path: Lightning loads a local file passing no weights_only, so torch's own
    # default decides (True since torch 2.6, which pyproject.toml requires)
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    with pytest.raises(pickle.UnpicklingError):
        TorchCheckpointIO().load_checkpoint(evil)
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_damaged_checkpoints_are_one_line(tmp_path, capsys):
    from unet_pl.cli.train import main as train

    good = save_ckpt(tmp_path / "good.ckpt", img_size=32)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    for bad in (truncated, text):
        err = one_line_exit_2(train, ["--gpus", "0", "--resume", str(bad), "--out", str(tmp_path / "r")], capsys)
        assert bad.name in err and "--resume" in err


def test_resuming_an_instance_checkpoint_in_notebook_mode_names_the_flag(tmp_path, capsys):
    from unet_pl.cli.train import main as train

    ckpt = save_ckpt(tmp_path / "last.ckpt", head="mask+boundary", resolution="native", img_size=64)
    err = one_line_exit_2(train, ["--gpus", "0", "--mode", "notebook", "--resume", str(ckpt), "--cache-dir", str(tmp_path / "c")], capsys)
    assert "--mode instance" in err


def test_resuming_a_weights_only_checkpoint_is_one_line_and_makes_no_run_folder(tmp_path, capsys):
    from unet_pl.cli.train import main as train
    from unet_pl.inference.checkpoint import PRETRAINED, export_model

    exported = export_model(save_ckpt(tmp_path / "best.ckpt", img_size=32), tmp_path / "small.ckpt")
    for ckpt, mode in ((exported, "notebook"), (PRETRAINED, "instance")):
        err = one_line_exit_2(train, ["--gpus", "0", "--mode", mode, "--resume", str(ckpt), "--out", str(tmp_path / "run"),
                                      "--cache-dir", str(tmp_path / "c")], capsys)
        assert ckpt.name in err and "weights only" in err and "without --resume" in err
        assert not (tmp_path / "run").exists() and not (tmp_path / "c").exists()


def test_resuming_into_another_runs_folder_is_refused(tmp_path, capsys):
    from unet_pl.cli.train import main as train

    run_a = tmp_path / "runA"
    run_a.mkdir()
    ckpt = save_ckpt(run_a / "last.ckpt", img_size=32)
    run_two = tmp_path / "run_two"
    run_two.mkdir()
    before = {name: os.urandom(64) for name in ("best.ckpt", "hparams.yaml")}
    for name, data in before.items():
        (run_two / name).write_bytes(data)
    err = one_line_exit_2(train, ["--gpus", "0", "--resume", str(ckpt), "--out", str(run_two),
                                  "--cache-dir", str(tmp_path / "c")], capsys)
    assert "run_two" in err and "another run" in err and "nothing was changed" in err
    assert {name: (run_two / name).read_bytes() for name in before} == before and sorted(os.listdir(run_two)) == sorted(before)


def test_a_keras_file_that_is_not_hdf5_is_one_line(tmp_path, capsys):
    from unet_pl.cli.predict import main as predict

    fake = tmp_path / "model.h5"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not HDF5")
    err = one_line_exit_2(predict, ["--keras-h5", str(fake), "--data-dir", str(tmp_path), "--gpus", "0"], capsys)
    assert "model.h5" in err and "Keras" in err


# ---------------------------------------------------------------- run folders are never overwritten


def test_a_run_folder_is_never_overwritten(tmp_path, capsys):
    from unet_pl.cli.train import main as train

    run = tmp_path / "run"
    run.mkdir()
    before = {name: os.urandom(64) for name in ("best.ckpt", "last.ckpt", "hparams.yaml")}
    for name, data in before.items():
        (run / name).write_bytes(data)
    err = one_line_exit_2(train, ["--gpus", "0", "--out", str(run), "--epochs", "1"], capsys)
    assert "--resume last" in err and "another --out" in err
    assert {name: (run / name).read_bytes() for name in before} == before and sorted(os.listdir(run)) == sorted(before)


def test_a_run_folder_inside_the_training_folder_is_refused(make_train_dir, tmp_path, capsys):
    from unet_pl.cli.train import main as train

    data = make_train_dir(n=4, root=tmp_path / "train")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    for out in (data / "run1", data):
        err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(data), "--out", str(out), "--epochs", "1"], capsys)
        assert f"--out {out} is inside the training folder" in err and "--out runs/NAME" in err, err
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing made there


def test_an_unwritable_run_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    from unet_pl.cli.train import main as train

    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = one_line_exit_2(train, ["--gpus", "0", "--out", str(blocker / "run")], capsys)
    assert "--out" in err and str(blocker) in err
    # a read-only working directory without --out (root writes anywhere, so the check is simulated)
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.chdir(ro)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).resolve() == ro.resolve() else real_access(p, mode))
    err = one_line_exit_2(train, ["--gpus", "0"], capsys)
    assert "runs" in err and "not writable" in err and "--out" in err
    # resuming a run whose folder is read-only: said before the checkpoint is even read
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "last.ckpt").write_bytes(b"not read")
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).resolve() == old.resolve() else real_access(p, mode))
    err = one_line_exit_2(train, ["--gpus", "0", "--resume", str(old / "last.ckpt")], capsys)
    assert "cannot write into the run folder" in err and str(old) in err


def test_an_unwritable_prediction_folder_is_one_line_before_any_image(tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    from unet_pl.cli.predict import main as predict
    from unet_pl.data import SAMPLE_DIR
    from unet_pl.inference import folder, outputs

    ckpt = save_ckpt(tmp_path / "best.ckpt", img_size=32)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted(SAMPLE_DIR.glob("*/images/*.png"))[0], images / "a.png")
    argv = ["--ckpt", str(ckpt), "--data-dir", str(images), "--gpus", "0", "--no-progress"]
    real_predict_folder, real_access = folder.predict_folder, os.access

    def predict_folder(*args, **kwargs):
        raise AssertionError("prediction started before the outputs were checked")

    # root writes anywhere, so a read-only folder is simulated where the check asks
    ro, mount = tmp_path / "ro", tmp_path / "mount"
    ro.mkdir()
    mount.mkdir()
    monkeypatch.setattr(folder, "predict_folder", predict_folder)
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p).resolve() in (ro.resolve(), mount.resolve())
                        else real_access(p, mode))
    monkeypatch.chdir(ro)  # a read-only working directory, no --out-dir: submission.csv would go there
    err = one_line_exit_2(predict, argv, capsys)
    assert "submission.csv" in err and str(ro.resolve()) in err and "not writable" in err
    err = one_line_exit_2(predict, [*argv, "--out-dir", str(mount / "preds")], capsys)  # a read-only mount
    assert str(mount / "preds") in err and "not writable" in err
    assert not (mount / "preds").exists()
    # and a folder that turns read-only (or full) while the images are predicted: one line, nothing replaced
    monkeypatch.setattr(folder, "predict_folder", real_predict_folder)
    out = tmp_path / "out"

    def commit(self, order=None):
        raise OSError(errno.EROFS, "Read-only file system", str(out / f"{outputs.STAGING_PREFIX}1" / "submission.csv"))

    monkeypatch.setattr(outputs.Outputs, "commit", commit)
    err = one_line_exit_2(predict, [*argv, "--out-dir", str(out)], capsys)
    assert f"cannot write into {out} (Read-only file system)" in err and "unchanged" in err
    assert not (out / "submission.csv").exists()


# ---------------------------------------------------------------- bad data, said before the long work


def test_one_training_image_is_one_line_and_leaves_no_run_folder(make_train_dir, tmp_path, capsys):
    from unet_pl.cli.train import main as train

    root = make_train_dir(n=1)
    for extra in ([], ["--patience", "0"]):
        err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(root), "--out", str(tmp_path / "run"),
                                      "--cache-dir", str(tmp_path / "c"), *extra], capsys)
        assert "at least 2" in err and str(root) in err
        assert not (tmp_path / "run").exists()


def test_cache_folder_problems_are_said_before_decoding(make_train_dir, tmp_path, capsys, monkeypatch):
    from unet_pl.cli.train import main as train
    from unet_pl.data import cache

    root = make_train_dir(n=3)
    a_file = tmp_path / "cachefile"
    a_file.write_text("x")

    def decode_item(*args):
        raise AssertionError("decoding started before the cache folder was checked")

    monkeypatch.setattr(cache, "decode_item", decode_item)
    err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(root), "--cache-dir", str(a_file),
                                  "--out", str(tmp_path / "r1")], capsys)
    assert "cachefile" in err and "is a file" in err and "--cache-dir" in err

    def read_only(folder):  # root writes anywhere: the probe's answer on a read-only folder, simulated
        raise PermissionError(13, "Permission denied", str(folder / "tmpabc"))

    monkeypatch.setattr(cache, "_write_probe", read_only)
    err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(root), "--cache-dir", str(tmp_path / "ro"),
                                  "--out", str(tmp_path / "r0")], capsys)
    assert f"cannot write into the cache folder {tmp_path / 'ro'} (Permission denied)" in err and "--cache-dir" in err
    monkeypatch.undo()
    monkeypatch.setattr(cache, "decode_item", decode_item)
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: type("U", (), {"free": 1 << 19})())  # 0.5 MB
    err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"),
                                  "--resolution", "native", "--out", str(tmp_path / "r2")], capsys)
    assert "needs about 1.0 MB" in err and "0.5 MB are free" in err
    assert not any((tmp_path / r).exists() for r in ("r0", "r1", "r2"))


def test_errors_recommend_flags_that_exist(make_train_dir, tmp_path, capsys):
    from unet_pl.cli.train import build_parser
    from unet_pl.cli.train import main as train

    root = make_train_dir(n=3)
    for m in (root / "img01" / "masks").iterdir():
        m.unlink()
    err = one_line_exit_2(train, ["--gpus", "0", "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"),
                                  "--out", str(tmp_path / "r")], capsys)
    assert "--empty-masks background" in err
    flags = build_parser().format_help()
    assert "--empty-masks" in flags and "--labels-csv" in flags
    # and the flag does what the message says: the image trains as background
    args = ["--gpus", "0", "--data-dir", str(root), "--cache-dir", str(tmp_path / "c"), "--fast-dev-run",
            "--empty-masks", "background", "--precision", "32"]
    train(args)
    capsys.readouterr()
    err = one_line_exit_2(train, [*args[:6], "--labels-csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "r")],
                          capsys)
    assert "nope.csv" in err and "--labels-csv" in err


def test_an_image_over_pillows_pixel_limit_is_not_called_corrupt(tmp_path, monkeypatch):
    from PIL import Image

    from unet_pl.data.images import image_size, read_image

    path = write_png(tmp_path / "big.png", np.zeros((40, 40, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1,600 px is over twice the limit: Pillow's bomb error
    with pytest.raises(ValueError) as e:
        read_image(path)
    assert "big.png" in str(e.value) and "tiles" in str(e.value) and "corrupt" not in str(e.value)
    monkeypatch.undo()
    # the case at Pillow's own limit: a header that claims 14000 x 14000 px, read for its size
    # (--mode instance's native cache) and for its pixels
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(14000, 14000))
    for read in (image_size, read_image):
        with pytest.raises(ValueError) as e:
            read(huge)
        message = str(e.value)
        assert "huge.png" in message and "tiles" in message and "replace or delete" not in message, message


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR (8-bit RGB), then IEND: enough for Pillow to read the size."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- the cache: leftovers and races


def test_stale_temporaries_are_removed_and_concurrent_runs_decode_once(make_train_dir, tmp_path):
    from unet_pl.data.cache import building

    root = make_train_dir(n=3)
    dm = NucleiDataModule(root, img_size=32, cache_dir=tmp_path / "c", progress=False)
    path = dm.cache_path
    path.parent.mkdir(parents=True)
    stale = path.with_name(path.name + ".x1y2.tmp")
    script = (f"import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
              f"from unet_pl import NucleiDataModule\n"
              f"NucleiDataModule({str(root)!r}, img_size=32, cache_dir={str(tmp_path / 'c')!r}, progress=False).prepare_data()\n")
    with building(path):  # hold the lock: both runs start and wait, as two runs started together would
        stale.write_bytes(b"half a cache from a kill -9")
        procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, cwd=ROOT) for _ in range(2)]
        waiting = []
        for p in procs:  # each reaches the lock and says it waits (earlier lines: import-time logging)
            seen: list[str] = []
            while not seen or "waiting for it" not in seen[-1]:
                line = p.stdout.readline()
                if not line:
                    break
                seen.append(line)
            waiting.append("".join(seen))
        assert stale.exists()  # nobody touched the cache while the lock was held
    outs = [w + p.communicate(timeout=120)[0] for w, p in zip(waiting, procs)]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("decoding 3 images" in o for o in outs) == 1, outs
    assert sum("decoded by another run meanwhile" in o for o in outs) == 1, outs
    assert path.is_file() and not stale.exists() and not list(path.parent.glob("*.tmp"))


def test_export_never_replaces_the_checkpoint_it_reads(tmp_path, capsys):
    from unet_pl.cli.export import main as export

    ckpt = save_ckpt(tmp_path / "best.ckpt", img_size=32)
    before = ckpt.read_bytes()
    err = one_line_exit_2(export, ["--ckpt", str(ckpt), "--out", str(tmp_path / "." / "best.ckpt")], capsys)
    assert "best.ckpt" in err and ckpt.read_bytes() == before
    export(["--ckpt", str(ckpt), "--out", str(tmp_path / "small.ckpt")])
    assert LitUNet.load_from_checkpoint(tmp_path / "small.ckpt").settings == LitUNet.load_from_checkpoint(ckpt).settings


def test_a_folder_or_another_file_where_a_checkpoint_or_csv_goes_is_one_line(tmp_path, capsys):
    """What users pass by mistake: the run folder as --ckpt, hparams.yaml as --ckpt, predict's output
    folder as --pred, a submission whose images are none of the truth's."""
    from unet_pl.cli.evaluate import main as evaluate
    from unet_pl.cli.predict import main as predict
    from unet_pl.data import SAMPLE_DIR

    image = next(SAMPLE_DIR.glob("*/images/*.png"))
    out = ["--data-dir", str(image), "--out-dir", str(tmp_path / "out"), "--gpus", "0", "--no-progress"]
    err = one_line_exit_2(predict, ["--ckpt", str(tmp_path)] + out, capsys)
    assert "is a folder" in err and str(tmp_path / "best.ckpt") in err
    (tmp_path / "hparams.yaml").write_text("img_size: 128\n")
    err = one_line_exit_2(predict, ["--ckpt", str(tmp_path / "hparams.yaml")] + out, capsys)
    assert "not a checkpoint file" in err and "weights_only" not in err
    err = one_line_exit_2(evaluate, ["--pred", str(tmp_path), "--truth", str(SAMPLE_DIR)], capsys)
    assert "is a folder" in err and "submission.csv" in err
    (tmp_path / "other.csv").write_text("ImageId,EncodedPixels\nnot_a_sample_image,1 5\n")
    err = one_line_exit_2(evaluate, ["--pred", str(tmp_path / "other.csv"), "--truth", str(SAMPLE_DIR)], capsys)
    assert "no image of" in err and "not_a_sample_image" in err and "wrong --pred or --truth" in err
