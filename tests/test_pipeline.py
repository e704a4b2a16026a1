"""One pipeline: the model and its data module agree by construction (the README's Python API with
Lightning's default logger), one inference path, settings that travel with the checkpoint."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from unet_pl import LitUNet, NucleiDataModule
from unet_pl.data import SAMPLE_DIR
from unet_pl.metrics import dsb_image_score

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    # Lightning's defaults where a user keeps them: the logger (TensorBoard, or CSV without it) and checkpointing
    return pl.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                      limit_train_batches=1, limit_val_batches=1, **kwargs)


def test_readme_python_api_with_any_img_size_and_the_default_logger(tmp_path):
    """The README's lines, img_size=64, Lightning's default logger: no hparams merge error, and the
    checkpoint records the side the data module fed."""
    dm = NucleiDataModule(img_size=64, batch_size=16, augment="default", cache_dir=tmp_path / "cache", progress=False)
    model = LitUNet(lr=1e-3, l2=1e-4)
    trainer = _trainer(tmp_path)
    assert trainer.logger is not None
    trainer.fit(model, dm)
    assert model.hparams.img_size == 64 and model.hparams_initial["img_size"] == 64
    loaded = LitUNet.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert loaded.settings.img_size == 64 and loaded.settings.resolution == "resize"


@pytest.mark.parametrize("model_kw, data_kw, words", [
    (dict(resolution="resize"), dict(resolution="native"), ["resolution", "'resize'", "'native'"]),
    (dict(resolution="native"), dict(resolution="resize"), ["resolution", "'native'", "'resize'"]),
    (dict(img_size=128), dict(img_size=64), ["img_size", "128", "64"]),
    (dict(head="mask"), dict(head="mask+boundary"), ["head", "'mask'", "'mask+boundary'"]),
])
def test_a_model_and_data_module_that_disagree_stop_before_the_first_step(tmp_path, model_kw, data_kw, words):
    dm = NucleiDataModule(**data_kw, cache_dir=tmp_path / "cache", progress=False)
    model = LitUNet(**model_kw)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError) as e:
        _trainer(tmp_path, logger=False, enable_checkpointing=False).fit(model, dm)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not one step taken
    assert not list((tmp_path / "cache").glob("*.npz"))  # said before the images were decoded


def test_native_data_trains_a_native_model_that_predicts_whole_images(tmp_path):
    dm = NucleiDataModule(resolution="native", img_size=64, cache_dir=tmp_path / "cache", progress=False)
    model = LitUNet()  # resolution and side from the data module
    _trainer(tmp_path, logger=False, enable_checkpointing=False).fit(model, dm)
    assert (model.settings.resolution, model.settings.img_size) == ("native", 64)


def test_python_api_fit_of_the_boundary_head_tunes_and_says_what_it_set(tmp_path):
    """``fit(model, dm)`` as the README shows it, no train.py: the boundary head's post-processing is
    chosen on the validation images and lands in the checkpoint; the process-wide settings the
    model's callbacks make are printed, not hidden; ``tune=False`` leaves the defaults."""
    dm = NucleiDataModule(resolution="native", img_size=64, head="mask+boundary", cache_dir=tmp_path / "cache",
                          progress=False)
    model = LitUNet(head="mask+boundary")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    shown = logging.getLogger("lightning.pytorch")  # the logger whose lines Lightning prints (GPU available: ...)
    shown.addHandler(handler)
    try:
        _trainer(tmp_path / "a", accelerator="cpu").fit(model, dm)
    finally:
        shown.removeHandler(handler)
    hp = torch.load(next((tmp_path / "a").rglob("*.ckpt")), weights_only=True)["hyper_parameters"]
    assert set(hp["postprocess"]) == {"threshold", "seed_threshold", "min_size", "split_concave"}
    assert set(hp["postprocess"]["split_concave"]) == {"threshold", "seed_threshold", "min_size"}  # chosen for the cut
    said = "\n".join(lines)
    assert "img_size taken from the data module: 64" in said and "keeping freed memory" in said
    assert "post-processing chosen on the validation images" in said and "saved in the checkpoint" in said
    untuned = LitUNet(head="mask+boundary", tune=False)
    _trainer(tmp_path / "b", accelerator="cpu").fit(untuned, dm)
    assert torch.load(next((tmp_path / "b").rglob("*.ckpt")), weights_only=True)["hyper_parameters"]["postprocess"] is None


def test_distance_head_trains_on_depth_maps_and_predicts_through_the_inference_api(tmp_path, sample_dir):
    """``head="mask+boundary+distance"`` end to end as a user runs it: the data module's crops carry
    each pixel's depth in its nucleus (0 exactly off the nuclei, 1 at their centres), the model fits
    and tunes on them, and the checkpoint loads with ``load_model`` and segments a file with three
    probability maps."""
    from unet_pl import load_model, probabilities, segment

    head = "mask+boundary+distance"
    dm = NucleiDataModule(resolution="native", img_size=64, head=head, cache_dir=tmp_path / "cache", progress=False)
    dm.prepare_data()
    dm.setup("fit")
    for k in range(4):
        item = dm.train_set[k]
        depth, mask = item["distance"][0], item["mask"][0]
        assert item["distance"].dtype == torch.float32 and depth.shape == mask.shape == (64, 64)
        assert torch.equal(depth > 0, mask.bool()) and float(depth.max()) <= 1.0
        if mask.any():
            assert float(depth.max()) == 1.0
    model = LitUNet(head=head)
    assert model.unet.head.out_channels == 3
    _trainer(tmp_path / "a", accelerator="cpu").fit(model, dm)
    ckpt = next((tmp_path / "a").rglob("*.ckpt"))
    hp = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert (hp["head"], hp["out_channels"]) == (head, 3) and set(hp["postprocess"]) == {"threshold", "seed_threshold", "min_size", "split_concave"}
    net = load_model(ckpt)
    image = next((sample_dir).glob("*/images/*.png"))
    prob = probabilities(net, image)
    assert prob.shape[0] == 3 and ((prob >= 0) & (prob <= 1)).all()
    labels = segment(net, image)
    assert labels.shape == prob.shape[1:] and labels.dtype == np.int32


class _Oracle(torch.nn.Module):
    """A stand-in network that knows the true nuclei of ``samples``: foreground probability
    ``inside`` on them and ``outside`` elsewhere for whichever sample image is fed (padded or not);
    with ``boundary``, a second channel of that constant boundary probability."""

    def __init__(self, samples, inside, outside, boundary=None):
        super().__init__()
        self.samples, self.inside, self.outside, self.boundary = samples, inside, outside, boundary
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        p = torch.full((1, 1, *x.shape[-2:]), self.outside)
        seen = (x[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        for image, labels in self.samples:
            h, w = labels.shape
            if seen.shape[0] >= h and seen.shape[1] >= w and np.array_equal(seen[:h, :w], image):
                p[0, 0, :h, :w][torch.from_numpy(labels > 0)] = self.inside
        if self.boundary is not None:
            p = torch.cat([p, torch.full_like(p, self.boundary)], dim=1)
        return torch.log(p / (1 - p)) + self.w


def _decoded_samples(sample_dir, n=3):
    from unet_pl.data.cache import decode_item
    from unet_pl.data.images import scan_train_dir

    return [decode_item(it, None, None) for it in scan_train_dir(sample_dir)[:n]]


def test_tuning_picks_the_best_threshold_by_the_score_and_the_checkpoint_keeps_it(tmp_path, sample_dir):
    """A stand-in network whose probability is 0.45 on the true nuclei and 0.35 elsewhere: only a
    threshold between them finds the nuclei, and the tuner must pick 0.4 (scored by hand: 1.0)."""
    from unet_pl.inference import Settings, segment
    from unet_pl.inference.tune import tune_postprocessing

    samples = _decoded_samples(sample_dir)
    settings = Settings(resolution="native", img_size=64)
    chosen, score = tune_postprocessing(_Oracle(samples, 0.45, 0.35), samples, settings, min_sizes=(0,))
    assert chosen["threshold"] == 0.4
    # touching true nuclei merge into one component, so the score is below 1 but above the others'
    by_hand = [dsb_image_score(lab, segment(_Oracle(samples, 0.45, 0.35), im, settings, threshold=0.4)).score
               for im, lab in samples]
    assert score > 0.3 and score == pytest.approx(np.mean(by_hand))


def test_tuning_keeps_the_largest_seed_threshold_that_scores_as_well(sample_dir):
    """With no boundary anywhere, every seed threshold gives the same watershed (one seed per
    blob), so validation cannot tell them apart: the tuner keeps the largest (fewest splits), not
    the model's own 0.15 (tried first, which the threshold keeps on a tie)."""
    from unet_pl.inference import Settings
    from unet_pl.inference.tune import SEED_THRESHOLDS, tune_postprocessing

    samples = _decoded_samples(sample_dir)
    net = _Oracle(samples, 0.9, 0.2, boundary=0.01)
    settings = Settings(resolution="native", img_size=64, out_channels=2, seed_threshold=0.15)
    chosen, _ = tune_postprocessing(net, samples, settings, min_sizes=(0,))
    assert chosen["threshold"] == 0.5 and chosen["seed_threshold"] == max(SEED_THRESHOLDS)


def test_the_tuner_applies_the_tolerance_it_is_given(sample_dir, monkeypatch):
    """A made-up score surface (``tune.score`` replaced): seed threshold 0.1 better than the others
    by 0.003. Within the default tolerance (0.005) 0.5 is kept; with 0.002, 0.1 wins. Settings
    without a watershed have no seed threshold to choose: the model's stays."""
    from unet_pl.inference import Settings
    from unet_pl.inference import tune

    def made_up(probs, truths, settings):
        return 0.5 - 0.01 * abs(settings.threshold - 0.5) + (0.003 if settings.seed_threshold == 0.1 else 0.0)

    monkeypatch.setattr(tune, "score", made_up)
    samples = _decoded_samples(sample_dir, 1)
    net = _Oracle(samples, 0.9, 0.2, boundary=0.01)
    watershed = Settings(resolution="native", img_size=64, out_channels=2, seed_threshold=0.15)
    assert tune.tune_postprocessing(net, samples, watershed, min_sizes=(0,))[0]["seed_threshold"] == 0.5
    chosen, best = tune.tune_postprocessing(net, samples, watershed, min_sizes=(0,), seed_tolerance=0.002)
    assert (chosen["threshold"], chosen["seed_threshold"], best) == (0.5, 0.1, pytest.approx(0.503))
    plain = Settings(resolution="native", img_size=64, seed_threshold=0.15)
    chosen, _ = tune.tune_postprocessing(_Oracle(samples, 0.9, 0.2), samples, plain, min_sizes=(0,))
    assert (chosen["threshold"], chosen["seed_threshold"]) == (0.5, 0.15)


def test_the_tuner_chooses_again_for_the_cut_and_prediction_takes_it_with_the_cut(sample_dir, monkeypatch):
    """A made-up score surface where the best seed threshold is 0.1 without ``split_concave`` and
    0.3 with it (the cut splits what the extra seeds split): the tuner stores both choices, the
    second under "split_concave"; ``replace(split_concave=True)`` takes it unless given values of
    its own, and ``cut=False`` leaves it out."""
    from unet_pl import LitUNet
    from unet_pl.inference import Settings
    from unet_pl.inference import tune

    def made_up(probs, truths, settings):
        best = 0.3 if settings.split_concave else 0.1
        return 0.5 - 0.01 * abs(settings.threshold - (0.6 if settings.split_concave else 0.5)) - 0.5 * abs(settings.seed_threshold - best)

    monkeypatch.setattr(tune, "score", made_up)
    samples = _decoded_samples(sample_dir, 1)
    net = _Oracle(samples, 0.9, 0.2, boundary=0.01)
    watershed = Settings(resolution="native", img_size=64, out_channels=2, seed_threshold=0.15)
    chosen, best = tune.tune_postprocessing(net, samples, watershed, min_sizes=(0,))
    assert (chosen["threshold"], chosen["seed_threshold"], chosen["min_size"]) == (0.5, 0.1, 0)
    assert chosen["split_concave"] == {"threshold": 0.6, "seed_threshold": 0.3, "min_size": 0}
    assert best == pytest.approx(0.5)  # the plain choice's score
    assert "split_concave" not in tune.tune_postprocessing(net, samples, watershed, min_sizes=(0,), cut=False)[0]

    model = LitUNet(head="mask+boundary", resolution="native")
    model.set_postprocess(chosen)
    s = model.settings
    assert (s.threshold, s.seed_threshold, s.split_concave) == (0.5, 0.1, False)
    cut = s.replace(split_concave=True)
    assert (cut.threshold, cut.seed_threshold, cut.min_size, cut.cut_tuned) == (0.6, 0.3, 0, True)
    mine = s.replace(split_concave=True, seed_threshold=0.2, min_size=20)  # flags given win
    assert (mine.threshold, mine.seed_threshold, mine.min_size) == (0.6, 0.2, 20)
    assert s.replace(min_size=5).seed_threshold == 0.1  # without the cut, the plain choice
    own = s.replace(threshold=0.7).replace(split_concave=True)  # a value of one's own, set before the cut, stays
    assert (own.threshold, own.seed_threshold, own.min_size) == (0.7, 0.3, 0)
    chained = s.replace(min_size=20).replace(split_concave=True)  # in two calls as in one
    assert chained == s.replace(split_concave=True, min_size=20)
    back = cut.replace(split_concave=False)  # off again: the choice without the cut
    assert (back.threshold, back.seed_threshold, back.min_size) == (0.5, 0.1, 0) and back == s
    assert mine.replace(split_concave=False).seed_threshold == 0.2  # one's own stays
    with pytest.raises(ValueError, match="split_concave needs"):
        model.set_postprocess({**chosen, "split_concave": {"threshold": 0.6}})
    with pytest.raises(ValueError, match="split_concave holds threshold"):
        model.set_postprocess({**chosen, "split_concave": True})
    with pytest.raises(ValueError, match="tuned_for_cut: threshold 2"):
        model.set_postprocess({**chosen, "split_concave": {"threshold": 2, "seed_threshold": 0.3, "min_size": 0}})
    # a bad value of the user's own is named as such, not blamed on the checkpoint's stored choice
    for bad, message in (({"channel": 0}, "channel counts from 1"), ({"scale": 0}, "scale 0 is out of range"),
                         ({"tile": 10}, "tile must be")):
        with pytest.raises(ValueError) as e:
            cut.replace(**bad)
        assert str(e.value).startswith(message), str(e.value)


def _surface(text):
    """``"t s:score s:score ..."`` lines (as printed when the grid was measured) -> {(t, s): score}."""
    return {(float(t), float(s)): float(v) for line in text.strip().splitlines()
            for t, *cells in [line.split()] for s, v in (c.split(":") for c in cells)}


# mean scores on the validation images of two grouped-validation fold checkpoints (docs/accuracy.md)
GREY_S42_FOLD2 = """
0.4 0.5:0.4042 0.3:0.4341 0.2:0.4418 0.15:0.4448 0.1:0.4466
0.5 0.5:0.4387 0.3:0.4558 0.2:0.4631 0.15:0.4661 0.1:0.4686
0.6 0.5:0.4500 0.3:0.4635 0.2:0.4710 0.15:0.4729 0.1:0.4771
0.7 0.5:0.4417 0.3:0.4504 0.2:0.4588 0.15:0.4605 0.1:0.4630
"""
TEXTURE_S7_FOLD1 = """
0.4 0.5:0.4238 0.3:0.4340 0.2:0.4272 0.15:0.4258 0.1:0.4236
0.5 0.5:0.4653 0.3:0.4727 0.2:0.4660 0.15:0.4642 0.1:0.4625
0.6 0.5:0.4668 0.3:0.4713 0.2:0.4645 0.15:0.4617 0.1:0.4595
0.7 0.5:0.4386 0.3:0.4422 0.2:0.4330 0.15:0.4297 0.1:0.4283
"""


@pytest.mark.parametrize("surface, tolerance, expected", [
    # best 0.4771 at (0.6, 0.1); (0.6, 0.15) is 0.0042 below it, (0.6, 0.2) 0.0061: 0.15 by hand
    (GREY_S42_FOLD2, 0.005, (0.6, 0.15)),
    (GREY_S42_FOLD2, 0.0, (0.6, 0.1)),
    # best 0.4727 at (0.5, 0.3); the best at seed 0.5 is (0.6, 0.5), 0.0059 below: unchanged
    (TEXTURE_S7_FOLD1, 0.005, (0.5, 0.3)),
    (TEXTURE_S7_FOLD1, 0.006, (0.6, 0.5)),
    # a flat surface: the largest seed threshold at the threshold tried first
    ("0.5 0.5:0.3 0.1:0.3\n0.4 0.5:0.3 0.1:0.3", 0.005, (0.5, 0.5)),
    # a lower seed threshold better by more than the tolerance wins
    ("0.5 0.5:0.30 0.3:0.32 0.1:0.34", 0.005, (0.5, 0.1)),
])
def test_choose_pair_takes_the_largest_seed_threshold_within_the_tolerance(surface, tolerance, expected):
    from unet_pl.inference.tune import choose_pair

    assert choose_pair(_surface(surface), tolerance) == expected


def test_instance_training_saves_tuned_settings_and_predict_uses_them(tmp_path, sample_dir):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "unet_pl.cli.train", "--gpus", "0", "--mode", "instance", "--crop-size", "64",
                        "--epochs", "1", "--num-workers", "0", "--precision", "32", "--holdout", "stratified",
                        "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "post-processing chosen on the validation images" in p.stdout and "; with --split-concave: threshold" in p.stdout
    assert (p.stdout + p.stderr).count("post-processing chosen") == 1  # the summary's line only, not the tuner's too
    hint = next(ln for ln in p.stdout.splitlines() if ln.startswith("its hold-out: "))  # how to score what it never saw
    assert "--holdout stratified --out-dir RESULTS, then " in hint and hint.endswith(f"--ckpt {out / 'best.ckpt'}"), hint
    ckpt = torch.load(out / "best.ckpt", weights_only=True)
    tuned = ckpt["hyper_parameters"]["postprocess"]
    assert set(tuned) == {"threshold", "seed_threshold", "min_size", "split_concave"}
    assert torch.load(out / "last.ckpt", weights_only=True)["hyper_parameters"]["postprocess"] == tuned
    # the hold-out ids travel with the run: predict uses them without decoding the folder
    from unet_pl.data.holdout import holdout_ids

    assert sorted(ckpt["NucleiDataModule"]["holdout_ids"]) == sorted(holdout_ids(sample_dir))
    q = subprocess.run([sys.executable, "scripts/predict.py", "--ckpt", str(out / "best.ckpt"), "--data-dir", str(sample_dir),
                        "--holdout", "stratified", "--out", str(tmp_path / "s.csv"), "--gpus", "0", "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "never trained on" in q.stdout and f"threshold {tuned['threshold']:g}" in q.stdout and "4 images" in q.stdout
    # evaluate.py --ckpt alone scores the hold-out the run saved (its kind taken from the checkpoint)
    e = subprocess.run([sys.executable, "scripts/evaluate.py", "--pred", str(tmp_path / "s.csv"), "--truth", str(sample_dir),
                        "--ckpt", str(out / "best.ckpt")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert e.returncode == 0 and "never trained on" in e.stdout and " over 4 images" in e.stdout, e.stdout + e.stderr
    none = tmp_path / "no_holdout.ckpt"  # a run that held nothing out: nothing of its own to score, said in one line
    torch.save({**ckpt, "NucleiDataModule": {**ckpt["NucleiDataModule"], "holdout": "none", "holdout_ids": None}}, none)
    e = subprocess.run([sys.executable, "scripts/evaluate.py", "--pred", str(tmp_path / "s.csv"), "--truth", str(sample_dir),
                        "--ckpt", str(none)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert e.returncode == 2 and "held no images out" in e.stderr and len(e.stderr.strip().splitlines()) == 1, e.stderr
    # with the cut, the values chosen for it
    q = subprocess.run([sys.executable, "scripts/predict.py", "--ckpt", str(out / "best.ckpt"), "--data-dir", str(sample_dir),
                        "--out", str(tmp_path / "c.csv"), "--gpus", "0", "--no-progress", "--split-concave"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    cut = tuned["split_concave"]
    assert (f"settings (tuned on the run's validation images with the cut, then flags): images at their own size, "
            f"threshold {cut['threshold']:g}, watershed (seed threshold {cut['seed_threshold']:g})") in q.stdout
    # a checkpoint from before the cut's choice (the key removed) gets it back from tune.py, the same as training chose
    old = tmp_path / "old.ckpt"
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "postprocess": {
        k: v for k, v in tuned.items() if k != "split_concave"}}}, old)
    stripped = old.read_bytes()
    r = subprocess.run([sys.executable, "-m", "unet_pl.cli.tune", "--ckpt", str(old), "--data-dir", str(sample_dir),
                        "--out", str(tmp_path / "copy.ckpt")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert old.read_bytes() == stripped  # --out: the checkpoint given is left as it was
    assert torch.load(tmp_path / "copy.ckpt", weights_only=True)["hyper_parameters"]["postprocess"] == tuned
    r = subprocess.run([sys.executable, "-m", "unet_pl.cli.tune", "--ckpt", str(old)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(old, weights_only=True)["hyper_parameters"]["postprocess"] == tuned
    gone = subprocess.run([sys.executable, "-m", "unet_pl.cli.tune", "--ckpt", str(old), "--data-dir", str(tmp_path / "gone")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert gone.returncode == 2 and "give --data-dir" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
    assert "with --split-concave: threshold" in r.stdout and "before: " in r.stdout
    r = subprocess.run([sys.executable, "-m", "unet_pl.cli.tune", "--ckpt", "unet_pl/pretrained/dsb2018_instance.ckpt"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "no record of its run's data" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_lightning_cli_config_round_trip_links_the_geometry(tmp_path):
    """LightningCLI: the data module's geometry is linked into the model; a printed config trains as given."""
    config = tmp_path / "config.yaml"
    base = [sys.executable, "-m", "unet_pl.cli.lightning", "fit"]
    args = ["--data.resolution", "native", "--data.img_size", "64", "--data.head", "mask+boundary",
            "--data.cache_dir", str(tmp_path / "cache"), "--data.progress", "false", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    p = subprocess.run(base + args + ["--print_config"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    config.write_text(p.stdout)
    q = subprocess.run(base + ["--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "Tip:" not in q.stdout + q.stderr  # Lightning's advertising kept out
    fit = Path(sys.executable).parent / "unet-fit"  # pip's console script: exit 0 after a good run, nothing printed
    if fit.is_file():
        f = subprocess.run([str(fit), "fit", "--config", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert f.returncode == 0 and "UNetCLI object" not in f.stdout + f.stderr, f.stderr[-2000:]
    ckpt = torch.load(next((tmp_path / "runs").rglob("*.ckpt")), weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert (hp["resolution"], hp["img_size"], hp["head"], hp["out_channels"]) == ("native", 64, "mask+boundary", 2)


def test_trainer_predict_of_a_folder_with_the_bundled_model_and_the_default_logger(tmp_path):
    """``trainer.predict(model, NucleiDataModule(predict_dir=...))``: a native model with a module left
    at its (resize) geometry predicts, with Lightning's default logger (no hparams merge error), the
    labels ``segment`` gives, and decodes no training set; only how files are read must agree."""
    import shutil

    from unet_pl import segment
    from unet_pl.inference.checkpoint import PRETRAINED

    folder = tmp_path / "images"
    folder.mkdir()
    for it in sorted(SAMPLE_DIR.iterdir())[:2]:
        shutil.copy(it / "images" / f"{it.name}.png", folder / f"{it.name}.png")
    model = LitUNet.load_from_checkpoint(PRETRAINED)
    rule = model.settings.intensity  # the bundled model's reading (not the data module's default "fixed")
    assert rule != "fixed"
    dm = NucleiDataModule(predict_dir=folder, intensity=rule, cache_dir=tmp_path / "cache", progress=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    assert trainer.logger is not None
    out = trainer.predict(model, dm)
    assert [o["id"] for o in out] == sorted(p.stem for p in folder.iterdir())
    assert all(np.array_equal(o["labels"], segment(model, folder / f"{o['id']}.png")) for o in out)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    with pytest.raises(ValueError, match=f"intensity: model '{rule}', data module 'fixed'"):
        pl.Trainer(default_root_dir=tmp_path, enable_progress_bar=False).predict(
            model, NucleiDataModule(predict_dir=folder, cache_dir=tmp_path / "cache", progress=False))


def test_inference_as_the_readme_shows_it_imports_no_lightning(tmp_path):
    """The README's inference lines, in a fresh process: they work and never import Lightning."""
    model = LitUNet(img_size=32)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "best.ckpt")
    code = f"""
import sys
from unet_pl import load_model, segment
from unet_pl.data.readers import read_raw
from unet_pl.data import SAMPLE_DIR

net = load_model({str(tmp_path / 'best.ckpt')!r})
path = sorted(SAMPLE_DIR.glob('*/images/*.png'))[0]
labels = segment(net, path)
image = read_raw(path, net.settings.channel)
labels = segment(net, image)
labels = segment(net, image, tta="d4", min_size=20)
assert labels.shape == image.shape[:2] and net.settings.img_size == 32
from unet_pl import predict_folder
stats = predict_folder(net, path.parent, {str(tmp_path / 'results' / 'submission.csv')!r}, out_dir={str(tmp_path / 'results')!r}, rois=True, progress=False)
assert stats["images"] == 1 and stats["nuclei"] == segment(net, path).max()
print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
    results = tmp_path / "results"
    assert {f.name for f in results.iterdir()} >= {"labels", "rois", "nuclei.csv", "summary.csv", "submission.csv"}


def test_segment_takes_image_arrays_and_says_what_else_to_do():
    from unet_pl import segment

    torch.manual_seed(0)
    model = LitUNet(img_size=32)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    grey_labels = segment(model, rgb[..., 0])  # grey is repeated into RGB, as the readers do
    assert np.array_equal(grey_labels, segment(model, np.repeat(rgb[..., :1], 3, axis=2)))
    rgba = np.concatenate([rgb, np.full((40, 56, 1), 255, np.uint8)], axis=2)
    assert np.array_equal(segment(model, rgba), segment(model, rgb))  # alpha dropped
    # 16-bit pixels follow the model's intensity rule, as files do (fixed: the high byte)
    assert np.array_equal(segment(model, rgb.astype(np.uint16) << 8), segment(model, rgb))
    for bad in (rgb.astype(np.float32) / 255, rgb[None]):
        with pytest.raises(ValueError, match="uint8|shape"):
            segment(model, bad)
    # a hyperstack as tifffile.imread returns it, channels first: refused with the way to (H, W, C),
    # which is then read like a file's channels (channel=N picks one)
    stack = np.random.default_rng(1).integers(0, 4096, (3, 40, 56)).astype(np.uint16)
    for channel in (None, 2):
        with pytest.raises(ValueError, match=r"channels first \(C, H, W\).*np\.moveaxis\(image, 0, -1\)"):
            segment(model, stack, channel=channel)
    moved = np.moveaxis(stack, 0, -1)
    assert np.array_equal(segment(model, moved, channel=2), segment(model, stack[1]))
    # several images at once: refused with the loop to write (a list of paths is not "pixels")
    for several in ([rgb, rgb], [Path("a.tif"), Path("b.tif")], (rgb[..., 0],) * 3):
        with pytest.raises(ValueError, match=r"one image at a time.*for image in images"):
            segment(model, several)


def test_segment_of_a_16_bit_file_equals_predict_py_with_the_bundled_model(tmp_path):
    """The README's inference lines on a 12-bit-in-16-bit, non-square TIFF with the bundled model
    (native, its own intensity rule): the path and ``read_raw``'s pixels give predict.py's labels."""
    import tifffile

    from unet_pl import load_model, segment
    from unet_pl.cli.predict import main
    from unet_pl.data.readers import read_raw

    grey = np.asarray(Image.open(sorted(SAMPLE_DIR.glob("*/images/*.png"))[0]).convert("L"))[:180, :250]
    path = tmp_path / "in" / "cells.tif"
    path.parent.mkdir()
    tifffile.imwrite(path, grey.astype(np.uint16) * 16)  # 12-bit camera data: values up to 4080
    main(["--data-dir", str(path), "--out-dir", str(tmp_path / "out"), "--gpus", "0", "--no-progress"])
    expected = tifffile.imread(tmp_path / "out" / "labels" / "cells.tif")
    net = load_model()
    by_path = segment(net, path)
    assert by_path.shape == (180, 250) and by_path.max() > 3 and np.array_equal(by_path, expected)
    assert np.array_equal(segment(net, read_raw(path, net.settings.channel)), expected)


def test_predict_cli_runs_without_importing_lightning(tmp_path):
    """predict.py with the bundled model, one image, in a fresh interpreter: Lightning never loads
    (it cost ~6 s of start-up before issue 17)."""
    image = sorted(SAMPLE_DIR.glob("*/images/*.png"))[0]
    code = f"""
import sys
from unet_pl.cli.predict import main
main(["--data-dir", {str(image)!r}, "--out-dir", {str(tmp_path / 'out')!r}, "--gpus", "0", "--no-progress"])
print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics')))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "[]" and (tmp_path / "out" / "labels").is_dir()


def test_predict_images_then_labels_from_probabilities_is_segment_for_many_images():
    """The README's way for several images: ``predict_images`` yields each one's probability maps (paths and
    pixels alike, as ``segment`` takes them), ``labels_from_probabilities`` makes its nuclei: ``segment``'s labels."""
    from unet_pl import load_model, segment
    from unet_pl.data import SAMPLE_DIR
    from unet_pl.data.images import scan_train_dir
    from unet_pl.data.readers import read_raw
    from unet_pl.inference import labels_from_probabilities, predict_images

    net = load_model()
    paths = [it.image for it in scan_train_dir(SAMPLE_DIR)[:3]]
    images = [paths[0], read_raw(paths[1]), str(paths[2])]
    probs = list(predict_images(net, images, net.settings))
    assert len(probs) == 3 and all(p.ndim == 3 and p.shape[0] == net.settings.out_channels for p in probs)
    for prob, path in zip(probs, paths):
        labels = labels_from_probabilities(prob, net.settings)
        assert labels.max() > 0 and np.array_equal(labels, segment(net, path))
