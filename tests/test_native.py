"""Beyond the notebook: native-resolution crops, the boundary head, the hold-out flags, and the
train -> predict -> evaluate chain on the bundled sample in subprocesses."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unet_pl import LitUNet, NucleiDataModule
from unet_pl.data.cache import native_image
from unet_pl.data.holdout import holdout_ids
from unet_pl.data.targets import contacts

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ data


@pytest.mark.parametrize("crop", [32, 64])  # smaller and larger than the 40x48 images
def test_native_crops_keep_image_mask_labels_and_boundary_aligned(make_train_dir, tmp_path, crop):
    root = make_train_dir(n=3, h=40, w=48)
    dm = NucleiDataModule(root, resolution="native", img_size=crop, val_split=0.34, batch_size=2, num_workers=0, cache_dir=tmp_path / "c",
                                head="mask+boundary", progress=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.cache_path.name.startswith("dsb2018-native-")
    image, labels = native_image(dm.arrays, 0)
    assert image.shape == (40, 48, 3) and labels.shape == (40, 48) and labels.max() == 2  # full size, two nuclei
    torch.manual_seed(0)
    for k in range(6):
        item = dm.train_set[k % len(dm.train_set)]
        img, mask, bnd = item["image"], item["mask"][0], item["boundary"][0]
        assert img.shape == (3, crop, crop) and mask.shape == bnd.shape == (crop, crop)
        # The synthetic nuclei are 200 on a background below 30: after any crop, flip, rotation
        # or jitter, bright pixels are exactly the mask.
        assert torch.equal(img[0] > 110, mask.bool())
        assert bnd.bool().logical_and(~mask.bool()).sum() == 0 and (bnd.sum() > 0) == (mask.sum() > 0)
        assert tuple(item["size"].tolist()) == (40, 48)
        # where nuclei touch, from the labels as they were moved (the brute-force count is in test_postprocess)
        assert item["contact"].dtype == torch.uint8 and item["contact"].shape == (1, crop, crop)
    val = dm.val_set[0]
    assert torch.equal(val["image"], dm.val_set[0]["image"]) and val["labels"].shape == (crop, crop)
    np.testing.assert_array_equal(val["contact"][0].numpy(), contacts(val["labels"].numpy()))


def test_holdout_images_are_never_trained_or_validated(sample_dir, tmp_path):
    held = set(holdout_ids(sample_dir))
    dm = NucleiDataModule(sample_dir, img_size=32, num_workers=0, cache_dir=tmp_path, holdout="stratified", progress=False)
    dm.prepare_data()
    dm.setup("fit")
    seen = {dm.train_set.ids[j] for j in dm.train_set.indices} | {dm.val_set.ids[j] for j in dm.val_set.indices}
    assert len(held) == 4 and not seen & held and len(seen) == 26
    # the ids come from the cache's modalities (no second decoding) and travel in checkpoints
    assert set(dm.holdout_ids) == held and set(dm.state_dict()["holdout_ids"]) == held
    # Without the flag the split is the one the notebook mode always made.
    dm0 = NucleiDataModule(sample_dir, img_size=32, num_workers=0, cache_dir=tmp_path, progress=False)
    dm0.setup("fit")
    from unet_pl.data import split_indices

    assert np.array_equal(dm0.val_set.indices, split_indices(30, 0.1, 42)[1])


# ------------------------------------------------------------------ model


def test_head_sets_the_output_channels_and_checkpoints_remember_it(tmp_path):
    import lightning.pytorch as pl

    model = LitUNet(head="mask+boundary", resolution="native", img_size=32)
    assert model.unet.head.out_channels == 2 and model.hparams.out_channels == 2
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "mask": torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "boundary": torch.zeros(2, 1, 32, 32, dtype=torch.uint8),
             "labels": torch.zeros(2, 32, 32, dtype=torch.int32)}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)], batch_size=2))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = LitUNet.load_from_checkpoint(tmp_path / "m.ckpt")
    assert loaded.hparams.head == "mask+boundary" and loaded.hparams.resolution == "native" and loaded.unet.head.out_channels == 2
    with pytest.raises(ValueError, match="out_channels"):
        LitUNet(head="mask+boundary", out_channels=3)
    # A checkpoint written before these options existed loads as the notebook's model.
    trainer.strategy.connect(LitUNet(img_size=32))
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=False)
    for k in ("head", "resolution"):
        ckpt["hyper_parameters"].pop(k)
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = LitUNet.load_from_checkpoint(tmp_path / "old.ckpt")
    assert (old.hparams.head, old.settings.resolution, old.unet.head.out_channels) == ("mask", "resize", 1)


def test_contact_weight_weighs_the_step_loss():
    import lightning.pytorch as pl

    torch.manual_seed(0)
    batch = {"image": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
             "mask": (torch.rand(2, 1, 32, 32) > 0.5).to(torch.uint8), "boundary": (torch.rand(2, 1, 32, 32) > 0.9).to(torch.uint8),
             "contact": torch.zeros(2, 1, 32, 32, dtype=torch.uint8)}
    batch["contact"][:, :, :16] = 1  # the top half: where nuclei touch

    def val_loss(model):
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(2)], batch_size=2)
        return trainer.validate(model, loader, verbose=False)[0]["val/loss"]

    plain = LitUNet(head="mask+boundary", resolution="native", img_size=32)
    weighted = LitUNet(head="mask+boundary", resolution="native", img_size=32, contact_weight=2.0)
    weighted.load_state_dict(plain.state_dict())
    # the same network; its per-pixel losses on the top half count 3 times: recompute by hand
    with torch.no_grad():
        logits = plain(batch["image"].float() / 255)
        y = torch.cat([batch["mask"], batch["boundary"]], 1).float()
        pix = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none",
                                                                   pos_weight=torch.tensor([1.0, 5.0]).view(2, 1, 1))
    assert val_loss(plain) == pytest.approx(pix.mean().item(), rel=1e-4)
    assert val_loss(weighted) == pytest.approx((pix * (1 + 2 * batch["contact"])).mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="'contact' maps"):
        weighted._weights({"image": batch["image"]})
    with pytest.raises(ValueError, match="number >= 0"):
        LitUNet(head="mask+boundary", contact_weight=float("nan"))


def test_ring_plus_contact_boundary_target_adds_the_contact_pixels_to_the_boundary_it_learns():
    from unet_pl.data.targets import boundaries, contacts

    # two 4 x 4 nuclei one background pixel apart, and one alone: by hand, the pixels with both of
    # the pair within 2 px are columns 4-6 (the pair's facing edges and the gap) in rows 0-6
    lab = np.zeros((12, 16), np.int32)
    lab[1:5, 1:5], lab[1:5, 6:10], lab[9:12, 13:16] = 1, 2, 3
    ring, near = boundaries(lab), contacts(lab)
    assert near[0:7, 4:7].all() and near.sum() == 7 * 3
    batch = {"mask": torch.from_numpy((lab > 0).astype(np.uint8))[None, None],
             "boundary": torch.from_numpy(ring)[None, None], "contact": torch.from_numpy(near)[None, None]}
    plain = LitUNet(head="mask+boundary", resolution="native", img_size=32)
    wide = LitUNet(head="mask+boundary", resolution="native", img_size=32, boundary_target="ring+contact")
    np.testing.assert_array_equal(plain._targets(batch)[0, 1].numpy(), ring)
    np.testing.assert_array_equal(wide._targets(batch)[0, 1].numpy(), ring | near)  # background pixel at column 5 too
    np.testing.assert_array_equal(wide._targets(batch)[0, 0].numpy(), lab > 0)  # the foreground unchanged
    with pytest.raises(ValueError, match="'contact' maps"):
        wide._targets({k: batch[k] for k in ("mask", "boundary")})
    with pytest.raises(ValueError, match="boundary head"):
        LitUNet(head="mask", boundary_target="ring+contact")
    with pytest.raises(ValueError, match="unknown boundary_target"):
        LitUNet(head="mask+boundary", boundary_target="thick")


def test_boundary_positives_are_weighted_and_the_boundary_is_required():
    logits = torch.zeros(1, 2, 4, 4)  # p = 0.5 everywhere: BCE is log 2 per pixel
    y = torch.zeros(1, 2, 4, 4)
    y[:, 1, 0, 0] = 1  # one boundary pixel
    log2 = float(np.log(2))
    for w in (1.0, 5.0):
        loss = LitUNet(head="mask+boundary", boundary_weight=w)._loss(logits, y)
        assert loss.item() == pytest.approx(log2 * (32 - 1 + w) / 32)
    assert LitUNet()._loss(logits[:, :1], y[:, :1]).item() == pytest.approx(log2)  # the notebook: plain BCE
    # the distance head's third output: BCE against the soft depth, its values unweighted
    logits3, y3 = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    y3[:, 1, 0, 0] = 1
    logits3[:, 2], y3[:, 2] = 2.0, 0.25
    p = 1 / (1 + np.exp(-2.0))
    depth_bce = -(0.25 * np.log(p) + 0.75 * np.log(1 - p))
    loss = LitUNet(head="mask+boundary+distance", boundary_weight=5.0)._loss(logits3, y3)
    assert loss.item() == pytest.approx((log2 * (32 - 1 + 5) + 16 * depth_bce) / 48, rel=1e-6)
    with pytest.raises(ValueError, match="'distance'"):
        LitUNet(head="mask+boundary+distance")._targets({"mask": y[:, :1], "boundary": y[:, 1:]})
    with pytest.raises(ValueError, match="boundary"):
        LitUNet(head="mask+boundary")._targets({"mask": y[:, :1]})


def test_notebook_prediction_is_unchanged_by_the_new_options(sample_dir):
    """segment's notebook path = the notebook's cells written out here with scikit-image: resize
    without blur, truncate to uint8, x / 255, sigmoid, resize back, > 0.5, 8-connected components."""
    from skimage.measure import label
    from skimage.transform import resize

    from unet_pl import segment
    from unet_pl.data.images import read_image

    torch.manual_seed(0)
    model = LitUNet(img_size=64).eval()
    image = read_image(next(iter(sorted(sample_dir.glob("*/images/*.png")))))
    small = resize(image, (64, 64), order=1, mode="constant", preserve_range=True, anti_aliasing=False).astype(np.uint8)
    x = torch.from_numpy(small.transpose(2, 0, 1).copy())[None].float() / 255
    with torch.no_grad():
        model.unet.head.bias -= torch.quantile(model(x).flatten(), 0.8)
        prob = torch.sigmoid(model(x))[0, 0].numpy()
    back = resize(prob, image.shape[:2], mode="constant", preserve_range=True, anti_aliasing=False)
    old = label(back > 0.5)
    new = segment(model, image, precision="32")  # the notebook's arithmetic (auto may pick bfloat16)
    assert old.max() > 0 and np.array_equal(old, new)


# ------------------------------------------------------------------ the CLIs, as users run them


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert p.returncode == 0, f"{args} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def test_instance_mode_train_predict_evaluate_on_the_holdout(sample_dir, tmp_path):
    out = tmp_path / "run"
    _run("-m", "unet_pl.cli.train", "--gpus", "0", "--mode", "instance", "--crop-size", "64", "--epochs", "1",
         "--batch-size", "8", "--num-workers", "0", "--holdout", "stratified", "--precision", "32",
         "--cache-dir", str(tmp_path / "cache"), "--out", str(out))
    hp = torch.load(out / "best.ckpt", map_location="cpu", weights_only=True)["hyper_parameters"]
    assert (hp["head"], hp["resolution"], hp["out_channels"], hp["img_size"]) == ("mask+boundary", "native", 2, 64)
    sub = tmp_path / "sub.csv"
    p = _run("scripts/predict.py", "--ckpt", str(out / "best.ckpt"), "--data-dir", str(sample_dir), "--out", str(sub),
             "--holdout", "stratified", "--tta", "d4", "--fill-holes", "--min-size", "5", "--gpus", "0",
             "--masks-dir", str(tmp_path / "masks"), "--no-progress", "--tile", "512")
    assert "4 images" in p.stdout
    held = holdout_ids(sample_dir)
    from PIL import Image

    for i in held:  # whole images at their own size, the 1024x1024 brightfield one in tiles
        png = np.asarray(Image.open(tmp_path / "masks" / f"{i}.png"))
        assert png.shape == Image.open(sample_dir / i / "images" / f"{i}.png").size[::-1]
    p = _run("scripts/evaluate.py", "--pred", str(sub), "--truth", str(sample_dir), "--holdout", "stratified")
    assert "over 4 images" in p.stdout and "not in the truth" not in p.stdout
    # a subset of the folder as the truth: its own hold-out is other images, said so; --ckpt scores the run's
    subset = tmp_path / "subset"
    subset.mkdir()
    for d in sorted(sample_dir.iterdir())[:20] + [sample_dir / i for i in held]:
        if d.is_dir() and not (subset / d.name).exists():
            shutil.copytree(d, subset / d.name)
    assert set(holdout_ids(subset)) != set(held)
    p = _run("scripts/evaluate.py", "--pred", str(sub), "--truth", str(subset), "--holdout", "stratified")
    assert f"computed from the images of {subset}" in p.stdout
    assert "in the truth but not in this hold-out" in p.stdout and "--ckpt" in p.stdout
    p = _run("scripts/evaluate.py", "--pred", str(sub), "--truth", str(subset), "--holdout", "stratified",
             "--ckpt", str(out / "best.ckpt"))
    assert "the 4 images that" in p.stdout and "over 4 images" in p.stdout and "hold-out (ignored)" not in p.stdout
    # a subset holding only some of the run's hold-out: those are scored, and it says so
    shutil.rmtree(subset / held[0])
    p = _run("scripts/evaluate.py", "--pred", str(sub), "--truth", str(subset), "--holdout", "stratified",
             "--ckpt", str(out / "best.ckpt"))
    assert "3 of them are in" in p.stdout and "over 3 images" in p.stdout, p.stdout
