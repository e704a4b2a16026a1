"""predict.py and evaluate.py end to end, in subprocesses as a user runs them."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unet_pl.rle import decode_labels

ROOT = Path(__file__).resolve().parents[1]
from unet_pl.data import SAMPLE_DIR  # noqa: E402

DSB = SAMPLE_DIR.parent  # the bundled real sample: runs wherever the package is, no ../shared needed
# Real RGBA images from it, as (H, W): 256x256, 256x320 and 260x347.
REAL = ["0287e7ee5b007c91ae2bd7628d09735e70496bc6127ecb7f3dd043e04ce37426",
        "220b37f4ca7cab486d2b71cd87a46ee7411a5aa142799d96ed98015ab5ba538a",
        "7b38c9173ebe69b4c6ba7e703c0c27f39305d9b2910f46405993d2ea7a963b80"]
SIZES = {"grey16": (200, 150), "wide": (161, 519)}


def run(script: str, *args, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A LitUNet trained for 2 steps on synthetic 32x32 images, its head bias set so that a few
    percent of each real image is foreground (so predictions have nuclei to write)."""
    import lightning.pytorch as pl

    from unet_pl import LitUNet

    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    items = [{"image": im, "mask": (im[:1] > 160).to(torch.uint8)} for im in images]
    model = LitUNet(img_size=32)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(items, batch_size=2))
    from unet_pl.data.images import read_image
    from unet_pl.geometry import resize_image

    x = torch.from_numpy(resize_image(read_image(_real_png(REAL[0])), 32).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        logits = model(model.prepare_images(x))
        model.unet.head.bias -= torch.quantile(logits.flatten(), 0.9)
    path = tmp_path_factory.mktemp("run") / "best.ckpt"
    trainer.save_checkpoint(path)
    return path


def _real_png(image_id: str) -> Path:
    return DSB / "stage1_train" / image_id / "images" / f"{image_id}.png"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Three real RGBA images in the test layout, plus a 16-bit grey and a 161x519 RGB file loose."""
    d = tmp_path_factory.mktemp("stage1_test")
    for i in REAL:
        (d / i / "images").mkdir(parents=True)
        shutil.copy(_real_png(i), d / i / "images")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random(SIZES["grey16"]) * 65535).astype(np.uint16)).save(d / "grey16.png")
    Image.fromarray(rng.integers(0, 256, (*SIZES["wide"], 3), dtype=np.uint8)).save(d / "wide.png")
    return d


@pytest.fixture(scope="module")
def predicted(ckpt, data_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("pred")
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", data_dir, "--out", out / "submission.csv",
            "--masks-dir", out / "masks", "--overlays-dir", out / "overlays", "--gpus", "0",
            "--batch-size", "2", "--num-workers", "0", "--min-size", "3")
    return {"dir": out, "csv": out / "submission.csv", "stdout": p.stdout, "stderr": p.stderr}


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sizes() -> dict[str, tuple[int, int]]:
    sizes = {i: np.asarray(Image.open(_real_png(i))).shape[:2] for i in REAL}
    return {**sizes, **SIZES}


def test_predict_writes_submission_masks_and_overlays(predicted):
    assert "done: 5 images" in predicted["stdout"] and "results:" in predicted["stdout"]
    rows = _read_rows(predicted["csv"])
    assert list(rows[0]) == ["ImageId", "EncodedPixels"]
    by_image: dict[str, list[str]] = {}
    for r in rows:
        by_image.setdefault(r["ImageId"], []).append(r["EncodedPixels"])
    assert set(by_image) == set(_sizes())
    nuclei = 0
    for image_id, (h, w) in _sizes().items():
        png = np.asarray(Image.open(predicted["dir"] / "masks" / f"{image_id}.png"))
        assert png.shape == (h, w) and png.dtype == np.uint16
        rles = [r for r in by_image[image_id] if r]
        assert len(rles) == png.max() and (len(rles) > 0 or by_image[image_id] == [""])
        # Rows decode without overlaps (decode_labels raises on any) to exactly the label PNG.
        assert (decode_labels(rles, (h, w)) == png).all()
        if rles:
            assert np.bincount(png.ravel())[1:].min() >= 3  # --min-size 3
        overlay = Image.open(predicted["dir"] / "overlays" / f"{image_id}.png")
        assert overlay.size == (w, h) and overlay.mode == "RGB"
        nuclei += len(rles)
    assert nuclei > 0


def test_evaluate_against_a_masks_folder(predicted, tmp_path):
    out = tmp_path / "per_image.csv"
    truth = tmp_path / "stage1_train"
    for i in REAL:
        shutil.copytree(DSB / "stage1_train" / i, truth / i)
    p = run("evaluate.py", "--pred", predicted["csv"], "--truth", truth, "--out", out)
    assert "score " in p.stdout and "over 3 images" in p.stdout
    assert "2 predicted images are not in the truth" in p.stdout and "grey16" in p.stdout
    rows = _read_rows(out)
    assert [r["ImageId"] for r in rows] == sorted(REAL)
    assert list(rows[0])[:4] == ["ImageId", "score", "n_true", "n_pred"]
    assert [k for k in rows[0] if k.startswith("score@")] == [f"score@{t:.2f}" for t in np.arange(0.5, 0.96, 0.05)]
    assert [int(r["n_true"]) for r in rows] == [len(list((truth / i / "masks").glob("*.png"))) for i in sorted(REAL)]  # 62, 1, 1
    for r in rows:
        per_t = [float(r[f"score@{t:.2f}"]) for t in np.arange(0.5, 0.96, 0.05)]
        assert float(r["score"]) == pytest.approx(np.mean(per_t), abs=1e-5)
        assert all(a >= b - 1e-9 for a, b in zip(per_t, per_t[1:]))  # stricter thresholds never score higher


def test_evaluate_labels_csv_and_solution_csv(predicted, tmp_path):
    # A stage1_train_labels.csv with its images beside it: sizes come from the images; one
    # image left out of the submission is reported and scored as empty.
    folder = tmp_path / "stage1_train"
    for i in REAL:
        shutil.copytree(DSB / "stage1_train" / i / "images", folder / i / "images")
    with open(DSB / "stage1_train_labels.csv", newline="") as f:
        wanted = [r for r in csv.DictReader(f) if r["ImageId"] in REAL]
    with open(tmp_path / "stage1_train_labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["ImageId", "EncodedPixels"])
        w.writeheader()
        w.writerows(wanted)
    truth_as_pred = tmp_path / "truth_as_pred.csv"
    with open(truth_as_pred, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["ImageId", "EncodedPixels"])
        w.writeheader()
        w.writerows(r for r in wanted if r["ImageId"] != REAL[2])
    p = run("evaluate.py", "--pred", truth_as_pred, "--truth", tmp_path / "stage1_train_labels.csv")
    assert f"score {2 / 3:.4f} over 3 images" in p.stdout  # 1, 1 and 0 for the missing image
    assert "1 truth images have no prediction rows" in p.stdout and REAL[2] in p.stdout

    # A solution CSV (sizes in the CSV): our own submission scored against itself is 1.
    sizes = _sizes()
    solution = tmp_path / "solution.csv"
    with open(solution, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "EncodedPixels", "Height", "Width", "Usage"])
        for r in _read_rows(predicted["csv"]):
            w.writerow([r["ImageId"], r["EncodedPixels"], *sizes[r["ImageId"]], "Public"])
    p = run("evaluate.py", "--pred", predicted["csv"], "--truth", solution)
    assert p.stdout.startswith("score 1.0000 over 5 images")


def test_errors_exit_2_with_one_line(data_dir, tmp_path, capsys):
    from unet_pl.cli.evaluate import main as evaluate_main
    from unet_pl.cli.predict import main as predict_main

    (tmp_path / "empty").mkdir()
    (tmp_path / "res" / "labels").mkdir(parents=True)
    (tmp_path / "res" / "submission.csv").write_text("ImageId,EncodedPixels\n")
    cases = [
        (evaluate_main, ["--pred", str(tmp_path / "res" / "labels"), "--truth", str(tmp_path)],
         f"is a folder; pass the CSV that predict.py wrote, here {tmp_path / 'res' / 'submission.csv'}"),
        (predict_main, ["--ckpt", str(tmp_path / "nope.ckpt"), "--data-dir", str(data_dir)], "nope.ckpt: no such file"),
        (evaluate_main, ["--pred", str(tmp_path / "nope.csv"), "--truth", str(tmp_path)], "nope.csv: no such file"),
        (predict_main, ["--data-dir", str(data_dir), "--at-once", "0"], "--at-once must be >= 1, got 0"),
        (predict_main, ["--data-dir", str(data_dir), "--channel", "0"], "error: --channel counts from 1 (as Fiji does), got 0"),
        (predict_main, ["--data-dir", *map(str, sorted(data_dir.rglob("*.png"))[:2])],  # the shell's cells/*.png
         "a wildcard such as *.tif expands to every file; --data-dir takes one image or the folder holding them"),
        (predict_main, ["--data-dir", str(data_dir / "*.png")],  # quoted: the shell left it alone
         "*.png does not exist (a wildcard such as *.tif is not expanded here: pass the folder)"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_help_gives_each_default_once_and_none_for_switches(capsys):
    """--help ends a flag's line with its default unless the help says it already, or the flag is a switch."""
    from unet_pl.cli.predict import main as predict_main
    from unet_pl.cli.train import main as train_main

    for main in (predict_main, train_main):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: False)" not in text
        assert "(default 2048: about 0.9 GB for the network)" in text or main is train_main
        assert "for the network) (default" not in text
        assert "(default: 42)" in text or main is predict_main  # train.py --seed: given by the formatter


def test_at_once_1_writes_the_same_submission(ckpt, data_dir, predicted, tmp_path):
    """--at-once 1 (one image at a time, the peak memory of one) gives the default run's rows."""
    out = tmp_path / "submission.csv"
    run("predict.py", "--ckpt", ckpt, "--data-dir", data_dir, "--out", out, "--gpus", "0", "--batch-size", "2",
        "--num-workers", "0", "--min-size", "3", "--at-once", "1")
    assert _read_rows(out) == _read_rows(predicted["csv"])


def test_predict_empty_folder_exits_2(ckpt, tmp_path):
    (tmp_path / "empty").mkdir()
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", tmp_path / "empty", "--gpus", "0", check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("predict.py: error: ") and "holds no images" in lines[0], p.stderr


def test_segment_on_a_non_square_image_equals_predict_py(ckpt, data_dir, predicted):
    """The public inference function and predict.py are one path: same labels for the 161x519 image."""
    from unet_pl import load_model, segment
    from unet_pl.data.images import read_image

    net = load_model(ckpt)
    labels = segment(net, read_image(data_dir / "wide.png"), min_size=3)
    png = np.asarray(Image.open(predicted["dir"] / "masks" / "wide.png"))
    assert labels.shape == SIZES["wide"] and np.array_equal(labels, png)


def test_predict_uses_the_checkpoints_tuned_settings_and_flags_override_them(ckpt, data_dir, tmp_path):
    from unet_pl.inference.checkpoint import update_hyperparameters

    tuned = tmp_path / "tuned.ckpt"
    shutil.copy(ckpt, tuned)
    update_hyperparameters(tuned, postprocess={"threshold": 0.9, "seed_threshold": 0.5, "min_size": 50})
    single = tmp_path / "one"
    single.mkdir()
    shutil.copy(_real_png(REAL[0]), single / "a.png")

    def nuclei(*flags) -> tuple[str, np.ndarray]:
        out = tmp_path / f"m{len(flags)}"
        p = run("predict.py", "--ckpt", tuned, "--data-dir", single, "--out", tmp_path / "s.csv", "--gpus", "0",
                "--masks-dir", out, "--no-progress", *flags)
        return p.stdout, np.asarray(Image.open(out / "a.png"))

    said, saved = nuclei()
    assert "tuned on the run's validation images" in said and "threshold 0.9" in said and "min size 50 px" in said
    said, flagged = nuclei("--threshold", "0.5", "--min-size", "0")
    assert "threshold 0.5" in said and "min size" not in said
    # the saved settings are stricter: fewer foreground pixels, and no nucleus under 50 px
    assert (saved > 0).sum() < (flagged > 0).sum()
    assert saved.max() == 0 or np.bincount(saved.ravel())[1:].min() >= 50


def test_an_unreadable_image_is_skipped_the_rest_written_exit_2(ckpt, tmp_path):
    """A folder of images with one truncated PNG in the middle and a results/ subfolder: the subfolder
    is skipped with a warning, the truncated file named in one closing line, exit 2; the other images'
    label TIFFs, tables and submission rows are all written. The first image unreadable too: the same, so
    what happens does not depend on the file names' order. The first three unreadable: the run stops
    there (a setting that fits none of them, most likely), nothing written."""
    folder = tmp_path / "scope"
    folder.mkdir()
    for name, image_id in (("a.png", REAL[0]), ("c.png", REAL[1])):
        shutil.copy(_real_png(image_id), folder / name)
    data = _real_png(REAL[2]).read_bytes()
    (folder / "b.png").write_bytes(data[: len(data) // 3])  # truncated by a copy cut short
    (folder / "results").mkdir()
    out = tmp_path / "out"
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", folder, "--out-dir", out, "--gpus", 0, "--no-progress", check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "1 image could not be read" in last and "b.png" in last and "other 2 are written" in last, last
    assert "skipped 1 folder" in p.stderr and "results/" in p.stderr
    assert sorted(f.name for f in (out / "labels").iterdir()) == ["a.tif", "c.tif"]
    with open(out / "summary.csv") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["a", "c"]
    with open(out / "submission.csv") as f:
        assert {r["ImageId"] for r in csv.DictReader(f)} == {"a", "c"}

    (folder / "a.png").write_bytes(data[:100])  # now the first one as well
    out2 = tmp_path / "out2"
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", folder, "--out-dir", out2, "--gpus", 0, "--no-progress", check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "2 images could not be read" in last and "a.png" in last and last.endswith("also b"), last
    assert p.stderr.count("skipped: it gets no results") == 2  # each skip said once an image was read
    assert sorted(f.name for f in (out2 / "labels").iterdir()) == ["c.tif"]

    # a setting that fits none of the first three (here --channel 5 of RGB files): the run stops at the
    # third, nothing written
    good = tmp_path / "good"
    good.mkdir()
    for name, image_id in (("a.png", REAL[0]), ("b.png", REAL[1]), ("c.png", REAL[2]), ("d.png", REAL[0])):
        shutil.copy(_real_png(image_id), good / name)
    out3 = tmp_path / "out3"
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", good, "--out-dir", out3, "--gpus", 0, "--no-progress",
            "--channel", 5, check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "a.png" in last and "the next 2 images could not be read either" in last, p.stderr
    assert "skipped: it gets no results" not in p.stderr  # the stop's one line says it all, no skip lines first
    assert not out3.exists()


def test_damaged_files_first_in_a_folder_do_not_stop_the_run(ckpt, tmp_path):
    """Three cut-off files that sort first are damaged files, not a setting that fits no image: they
    are skipped and the good images after them predicted (exit 2, the closing line naming them). A
    folder of damaged files only: one line, nothing written."""
    folder = tmp_path / "scope"
    folder.mkdir()
    data = _real_png(REAL[2]).read_bytes()
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(data[: len(data) // 3])
    only = tmp_path / "only_damaged"
    shutil.copytree(folder, only)
    for name, image_id in (("d.png", REAL[0]), ("e.png", REAL[1])):
        shutil.copy(_real_png(image_id), folder / name)
    out = tmp_path / "out"
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", folder, "--out-dir", out, "--gpus", 0, "--no-progress", check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "3 images could not be read" in last and "a.png" in last and "other 2 are written" in last, last
    assert sorted(f.name for f in (out / "labels").iterdir()) == ["d.tif", "e.tif"]
    out2 = tmp_path / "out2"
    p = run("predict.py", "--ckpt", ckpt, "--data-dir", only, "--out-dir", out2, "--gpus", 0, "--no-progress", check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "a.png" in lines[0] and "other 2 images" in lines[0], p.stderr
    assert not out2.exists()


def test_a_console_script_names_itself_in_its_errors(tmp_path):
    """unet-evaluate (pip's console script), not evaluate.py, in the one error line."""
    script = Path(sys.executable).parent / "unet-evaluate"
    if not script.is_file():
        pytest.skip("the package is not installed with its console scripts (pip install -e .)")
    p = subprocess.run([str(script), "--pred", str(tmp_path / "none.csv"), "--truth", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("unet-evaluate: error:"), p.stderr


def test_the_least_sure_line_counts_the_images_without_nuclei_it_does_not_name(tmp_path):
    """Four blank images and one with nuclei: three blank ones named, 'and 1 more without nuclei'.
    A folder where no image has a nucleus: no least-sure line (the no-nucleus warning says it)."""
    folder = tmp_path / "scope"
    folder.mkdir()
    shutil.copy(_real_png(REAL[0]), folder / "z_cells.png")
    blank = tmp_path / "blank"
    blank.mkdir()
    for k in range(4):
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(folder / f"b{k}.png")
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(blank / f"b{k}.png")
    # the bundled model: it finds nothing in a blank image (a barely trained one finds noise)
    p = run("predict.py", "--data-dir", folder, "--out-dir", tmp_path / "out", "--gpus", 0, "--no-progress")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("least sure: "))
    assert line.startswith("least sure: b0 (no nuclei), b1 (no nuclei), b2 (no nuclei) and 1 more without nuclei: "), line
    p = run("predict.py", "--data-dir", blank, "--out-dir", tmp_path / "out2", "--gpus", 0, "--no-progress")
    assert "least sure" not in p.stdout and "no nucleus in any image" in p.stdout, p.stdout
