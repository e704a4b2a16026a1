"""LitUNet: the notebook's pixel mean IoU, the batch contract, logging, checkpoints."""
from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from unet_pl import LitUNet
from unet_pl.metrics import PixelMeanIoU, pixel_mean_iou


# --- the notebook's mean_iou, worked by hand ----------------------------------------------------


def iou(prob, target) -> float:
    return pixel_mean_iou(torch.tensor(prob), torch.tensor(target, dtype=torch.float32)).item()


def test_pixel_mean_iou_by_hand():
    # t = 0.5, 0.55: pred 1100 vs 1010: fg 1/3, bg 1/3 -> 1/3
    # t = 0.6 .. 0.85 (6 thresholds; 0.6 > 0.6 is false): pred 1000: fg 1/2, bg 2/3 -> 7/12
    # t = 0.9, 0.95: pred 0000: fg 0/2, bg 2/4 -> 1/4
    # mean over the 10 thresholds: (2/3 + 7/2 + 1/2) / 10 = 7/15
    assert iou([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0]) == pytest.approx(7 / 15)


def test_a_class_missing_entirely_is_left_out_of_the_mean():
    # No foreground anywhere, none predicted: only background counts -> 1 (not 1/2).
    assert iou([0.2, 0.3], [0, 0]) == pytest.approx(1.0)
    # No foreground in truth, one pixel predicted at t < 0.7: fg IoU 0 (present), bg 1/2 -> 1/4;
    # at t >= 0.7 fg is absent again -> 1. (4 * 1/4 + 6 * 1) / 10 = 0.7
    assert iou([0.7, 0.2], [0, 0]) == pytest.approx(0.7)
    # All foreground, all found: background absent -> 1.
    assert iou([0.99, 0.98], [1, 1]) == pytest.approx(1.0)


def test_epoch_accumulates_confusion_not_batch_means():
    a = (torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0]))  # 8 thresholds perfect, t >= 0.9: 1/4 -> 0.85
    b = (torch.tensor([0.2, 0.3]), torch.tensor([0.0, 0.0]))  # background only -> 1.0
    assert pixel_mean_iou(*a).item() == pytest.approx(0.85)
    assert pixel_mean_iou(*b).item() == pytest.approx(1.0)
    metric = PixelMeanIoU()
    metric.update(*a)
    metric.update(*b)
    # Summed confusion: t <= 0.85: tp 1, tn 3 -> 1; t >= 0.9: fn 1, tn 3 -> (0 + 3/4) / 2. (8 + 0.75) / 10
    assert metric.compute().item() == pytest.approx(0.875)
    assert metric.compute().item() != pytest.approx((0.85 + 1.0) / 2)  # not the mean of batch means
    assert metric.compute().item() == pytest.approx(pixel_mean_iou(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])).item())


# --- the batch --------------------------------------------------------------------------------


def test_uint8_batches_are_scaled_on_the_device():
    lit = LitUNet()
    image = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    mask = torch.randint(0, 2, (2, 1, 16, 16), dtype=torch.uint8)
    out = lit.on_after_batch_transfer({"image": image, "mask": mask, "id": ["a", "b"]}, 0)
    assert out["image"].dtype == torch.float32 and torch.equal(out["image"], image.float() / 255.0)
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    assert out["mask"].dtype == torch.float32 and out["id"] == ["a", "b"]
    floats = torch.rand(1, 3, 16, 16)
    assert torch.equal(lit.prepare_images(floats), floats)  # already [0, 1]: not divided again


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        LitUNet(optimizer="lamb")


# --- training, logging and checkpoints ------------------------------------------------------------


def tiny_loader(n: int = 4, seed: int = 0) -> torch.utils.data.DataLoader:
    """The data module's batch contract, synthetic: uint8 images (3, 32, 32), uint8 masks (1, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    items = [
        {
            "image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g),
            "mask": (torch.rand(1, 32, 32, generator=g) > 0.7).to(torch.uint8),
            "id": f"img{i}",
        }
        for i in range(n)
    ]
    return torch.utils.data.DataLoader(items, batch_size=2)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, **kwargs,
    )


def test_fit_logs_the_design_metrics_and_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    lit = LitUNet(lr=3e-3, l2=1e-4, optimizer="adamw", base_filters=4, img_size=32, channels_last=False)
    t = trainer(tmp_path, max_steps=2, logger=CSVLogger(tmp_path, name="csv"), log_every_n_steps=1)
    t.fit(lit, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(seed=1))

    with open(t.logger.experiment.metrics_file_path) as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v != ""}
    for key in ("train/loss_step", "train/loss_epoch", "val/loss", "val/iou", "train/l2_penalty", "train/loss_with_l2", "train/iou"):
        assert key in logged, f"{key} not logged; got {sorted(logged)}"
    m = t.callback_metrics
    assert m["train/loss_with_l2"].item() == pytest.approx((m["train/loss_epoch"] + m["train/l2_penalty"]).item(), rel=1e-6)
    assert 0.0 <= m["val/iou"].item() <= 1.0

    path = tmp_path / "tiny.ckpt"
    t.save_checkpoint(path)
    loaded = LitUNet.load_from_checkpoint(path)  # no arguments: save_hyperparameters
    assert dict(loaded.hparams) == dict(lit.hparams)
    assert loaded.hparams.img_size == 32 and loaded.hparams.optimizer == "adamw"
    x = torch.rand(2, 3, 32, 32)
    lit.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(lit(x), loaded(x))


def test_no_l2_keys_without_l2(tmp_path):
    lit = LitUNet(base_filters=4, img_size=32)
    t = trainer(tmp_path, fast_dev_run=1)
    t.fit(lit, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(seed=1))
    keys = set(t.callback_metrics)
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/iou"} <= keys
    assert not {k for k in keys if "l2" in k}


def test_checkpoint_records_the_data_modules_img_size(tmp_path):
    from unet_pl import NucleiDataModule

    dm = NucleiDataModule(img_size=32, batch_size=4, num_workers=0, augment="none", cache_dir=tmp_path / "cache", progress=False)
    model = LitUNet()  # img_size left at its default, 128
    trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=False).fit(model, dm)
    assert model.hparams.img_size == 32
    trainer_ckpt = tmp_path / "m.ckpt"
    model.trainer.save_checkpoint(trainer_ckpt)
    assert LitUNet.load_from_checkpoint(trainer_ckpt).hparams.img_size == 32  # prediction resizes to 32 too


def test_prediction_refuses_more_than_one_gpu():
    from unet_pl.inference.folder import choose_device

    with pytest.raises(ValueError, match="one GPU"):
        choose_device(2)
    assert choose_device(0) == torch.device("cpu")


def test_adam_is_fused_except_under_float16_loss_scaling():
    """Fused Adam by default; under 16-mixed GradScaler would call step() on overflowed steps that
    the fused kernel skips inside, and KerasAdam's epsilon would count them."""
    from types import SimpleNamespace

    model = LitUNet()
    assert model.configure_optimizers().defaults["fused"] is True
    for precision, fused in (("bf16-mixed", True), ("32-true", True), ("16-mixed", None)):
        model._trainer = SimpleNamespace(precision=precision)
        assert model.configure_optimizers().defaults["fused"] is fused, precision


@pytest.mark.parametrize("schedule, factor", [("constant", 1.0), ("plateau", 0.3)])
def test_plateau_schedule_cuts_the_learning_rate_when_val_loss_stops_falling(tmp_path, schedule, factor):
    # a learning rate too small to move the weights: val/loss falls by less than the 1e-4 (relative) that
    # counts as lower, so the plateau schedule (the 2nd to 4th epochs without a lower one) cuts it once
    # at the end of the fourth epoch (one more epoch of patience would not yet), the constant one never
    lit = LitUNet(lr=1e-6, lr_schedule=schedule, base_filters=4, img_size=32, channels_last=False)
    t = trainer(tmp_path, max_epochs=4, logger=False)
    t.fit(lit, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(seed=1))
    assert t.optimizers[0].param_groups[0]["lr"] / 1e-6 == pytest.approx(factor)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        LitUNet(lr_schedule="step")


def test_cosine_schedule_follows_the_half_cosine_over_max_epochs(tmp_path):
    """lr at the start of epoch e of E = schedule_epochs: lr * (1 + cos(pi e / E)) / 2, by hand for E = 4:
    1, (1 + 1/sqrt 2) / 2, 1/2, (1 - 1/sqrt 2) / 2."""
    from lightning.pytorch.callbacks import Callback

    class Record(Callback):
        def __init__(self):
            self.lrs = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    lit = LitUNet(lr=1e-3, lr_schedule="cosine", schedule_epochs=4, base_filters=4, img_size=32, channels_last=False, tune=False)
    record = Record()
    t = trainer(tmp_path, max_epochs=5, logger=False, callbacks=[record])
    t.fit(lit, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(seed=1))
    half = 0.5 ** 0.5
    assert record.lrs == pytest.approx([1e-3, 1e-3 * (1 + half) / 2, 0.5e-3, 1e-3 * (1 - half) / 2, 0.0])  # then 0
    for bad in (None, 0, 2.5):
        with pytest.raises(ValueError, match="cosine' needs schedule_epochs"):
            LitUNet(lr_schedule="cosine", schedule_epochs=bad)


def test_ema_keeps_the_moving_average_of_the_weights_by_hand(tmp_path):
    """``ema=d``: after fit the model holds e_k = d_k e_(k-1) + (1 - d_k) w_k over the weights w_k after
    each optimizer step (e_1 = w_1), with TensorFlow's warm-up d_k = min(d, k / (9 + k)) (its
    ``ExponentialMovingAverage(num_updates)`` rule, k - 1 steps averaged before), computed here from
    the recorded weights; a checkpoint holds the average as its weights (what prediction loads) and
    the current weights to resume from."""
    from lightning.pytorch.callbacks import Callback, WeightAveraging

    from unet_pl.inference.checkpoint import load_model

    class Record(Callback):
        def __init__(self):
            self.steps = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append({k: v.detach().clone() for k, v in pl_module.unet.state_dict().items()})

    torch.manual_seed(0)
    decay = 0.3  # below the warm-up's d_k from the 2nd average on: both branches of the min are used
    lit = LitUNet(lr=1e-2, ema=decay, base_filters=4, img_size=32, channels_last=False, tune=False)
    record = Record()
    t = trainer(tmp_path, max_epochs=3, logger=False, callbacks=[record])
    t.fit(lit, train_dataloaders=tiny_loader(), val_dataloaders=tiny_loader(seed=1))
    assert sum(isinstance(c, WeightAveraging) for c in t.callbacks) == 1
    assert len(record.steps) == 6  # 2 batches x 3 epochs
    by_hand = dict(record.steps[0])
    for k_step, w in enumerate(record.steps[1:], start=2):
        d = min(decay, (1 + (k_step - 1)) / (10 + (k_step - 1)))
        by_hand = {k: d * by_hand[k] + (1 - d) * w[k] for k in w}
    last = record.steps[-1]
    got = lit.unet.state_dict()
    for k in by_hand:
        assert torch.allclose(got[k], by_hand[k], atol=1e-6), k
    assert any(not torch.allclose(by_hand[k], last[k], atol=1e-4) for k in by_hand)  # the average is not the last step

    lit.unet.load_state_dict(last)  # the current weights, as during training
    path = tmp_path / "ema.ckpt"
    t.save_checkpoint(path)
    net = load_model(path)
    for k, v in net.state_dict().items():
        assert torch.allclose(v, by_hand[k], atol=1e-6), k
    current = torch.load(path, weights_only=True)["current_model_state"]
    assert all(torch.equal(current["unet." + k], last[k]) for k in last)


def test_ema_of_a_short_run_is_mostly_its_last_weights_not_its_start():
    """Warm-up: 60 steps of weights moving from w_0 to w_60 in a straight line, averaged with decay
    0.995, end within the last quarter of the way (a plain EMA keeps 0.995 ** 59 = 74% of w_1 and ends
    at 9); after 5,000 steps the decay is the one asked for."""
    from unet_pl.callbacks import WarmedEMA

    avg_fn = WarmedEMA(0.995)
    e = torch.zeros(1)
    for n in range(1, 61):  # e after the first step is w_1 = 1 (AveragedModel copies it)
        e = torch.ones(1) if n == 1 else avg_fn(e, torch.full((1,), float(n)), torch.tensor(n - 1))
    assert e.item() > 45, e
    one = avg_fn(torch.zeros(1), torch.ones(1), torch.tensor(5000))
    assert one.item() == pytest.approx(1 - 0.995)


def test_ema_off_adds_no_averaging_and_bad_decays_are_refused(tmp_path):
    from lightning.pytorch.callbacks import WeightAveraging

    lit = LitUNet(base_filters=4, img_size=32, channels_last=False)
    assert not any(isinstance(c, WeightAveraging) for c in lit.configure_callbacks())
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="ema must be a decay in"):
            LitUNet(ema=bad)
