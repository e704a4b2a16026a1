"""scripts/crossval.py: grouped cross-validation of one recipe, on the bundled sample at 32 px, one epoch a fold."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unet_pl.cli import crossval
from unet_pl.data.holdout import holdout_ids

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--gpus", "0", "--epochs", "1", "--img-size", "32", "--batch-size", "4", "--num-workers", "0"]


def cv_cmd(out: Path, cache: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "crossval.py"), "--out", str(out), "--folds", "2",
            "--", *TINY_TRAIN, "--cache-dir", str(cache)]


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    out = tmp / "cv"
    proc = subprocess.run(cv_cmd(out, tmp / "cache"), cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, out, proc


def test_crossval_scores_each_fold_and_pools_every_image_once(cv_run, sample_dir):
    _, out, proc = cv_run
    rows = read_rows(out / "crossval.csv")
    assert [r["fold"] for r in rows] == ["1/2", "2/2", "pooled"]
    for k in (1, 2):
        expected = holdout_ids(sample_dir, f"group:{k}/2")
        scored = sorted(r["ImageId"] for r in read_rows(out / f"fold_{k}" / "scores.csv"))
        assert scored == expected  # exactly the fold's images
        saved = torch.load(out / f"fold_{k}" / "best.ckpt", map_location="cpu", weights_only=True)["NucleiDataModule"]
        assert saved == {"holdout": f"group:{k}/2", "holdout_ids": expected}
        assert int(rows[k - 1]["images"]) == len(expected)
    pooled = rows[-1]
    assert int(pooled["images"]) == 30 == int(rows[0]["images"]) + int(rows[1]["images"])
    assert sum(int(pooled[f"{m}_images"]) for m in ("fluorescence", "brightfield", "histology")) == 30
    groups = read_rows(out / "crossval_groups.csv")
    assert sum(int(r["images"]) for r in groups) == 30
    assert "| pooled | 30 |" in proc.stdout and "-m unet_pl.cli.train" in proc.stdout
    assert (out / "commands.txt").read_text().count("--holdout group:") == 6  # train, predict, evaluate per fold


def test_crossval_resumes_without_retraining(cv_run):
    tmp, out, _ = cv_run
    stamps = {k: (out / f"fold_{k}" / "best.ckpt").stat().st_mtime_ns for k in (1, 2)}
    proc = subprocess.run(cv_cmd(out, tmp / "cache"), cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("not retrained") == 2 and proc.stdout.count("not predicted again") == 2
    assert {k: (out / f"fold_{k}" / "best.ckpt").stat().st_mtime_ns for k in (1, 2)} == stamps
    assert [r["fold"] for r in read_rows(out / "crossval.csv")] == ["1/2", "2/2", "pooled"]


def test_an_interrupted_fold_resumes_from_last_ckpt(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(crossval, "run", lambda cmd, log: ran.append(cmd))
    fold = tmp_path / "fold_1"
    fold.mkdir()
    (fold / "last.ckpt").write_bytes(b"")
    crossval.train_fold(fold, ["train", "--out", str(fold)], [])
    assert ran == [["train", "--out", str(fold), "--resume", "last"]] and (fold / crossval.TRAINED).is_file()
    with pytest.raises(SystemExit):  # marked trained, but best.ckpt is missing
        crossval.train_fold(fold, ["train"], [])
    (fold / "best.ckpt").write_bytes(b"")
    crossval.train_fold(fold, ["train"], [])
    assert len(ran) == 1  # trained folds are not run again


@pytest.mark.parametrize("argv, words", [
    (["--out", "x", "--", "--holdout", "stratified"], "--holdout in the training (after --) flags"),
    (["--out", "x", "--predict", "--holdout none --tta d4"], "--holdout in the --predict flags"),
    (["--out", "x", "--folds", "1"], "--folds must be at least 2"),
    (["--out", "x", "--folds", "40"], "choose at most that many folds"),
])
def test_bad_usage_is_one_line(argv, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        crossval.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err


def test_scores_are_reused_only_for_the_same_commands(tmp_path, monkeypatch):
    ran = []

    def fake_run(cmd, log):
        ran.append(cmd)
        (tmp_path / "scores.csv").write_text("ImageId,score\n")

    monkeypatch.setattr(crossval, "run", fake_run)
    (tmp_path / "best.ckpt").write_bytes(b"")
    cmds = [["predict", "--tta", "d4"], ["evaluate"]]
    crossval.score_fold(tmp_path, cmds, [])
    crossval.score_fold(tmp_path, cmds, [])
    assert ran == cmds  # the second call reused them
    crossval.score_fold(tmp_path, [["predict", "--tta", "none"], ["evaluate"]], [])
    assert len(ran) == 4  # other predict flags: predicted and scored again
