"""LitUNet: the LightningModule users import. Loss, metrics, steps and the optimizer.

The batch (a dict, as ``unet_pl.data`` yields it):
    image:  uint8 (N, 3, H, W) in [0, 255], or float32 in [0, 1]
    mask:   uint8 or float (N, 1, H, W), foreground 1 (train/val/test)
    labels: int (N, H, W), 0 background, 1..k one per nucleus (val/test, optional)
    id:     list[str]; size: int64 (N, 2) original (H, W) of each image (predict)
``on_after_batch_transfer`` turns images into float [0, 1] on the device (the seed's
``Lambda(x / 255)``), so only uint8 crosses the host-device link.
"""
from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from .metrics import DSBScore, PixelMeanIoU, label_components
from .model import UNet
from .optim import OPTIMIZERS, build_optimizer, l2_penalty


class LitUNet(pl.LightningModule):
    """The seed's U-Net trained as the notebook trains it (sigmoid + binary cross-entropy, Adam).

    Args:
        lr: learning rate (Keras' Adam default 1e-3).
        l2: Keras' ``regularizers.l2(w)`` coefficient ``w`` on every conv and transposed-conv
            kernel, applied as ``weight_decay = 2*w`` (see ``unet_pl.optim``). 0: the notebook.
        optimizer: ``adam`` (coupled: exactly Keras' L2), ``sgd`` or ``adamw`` (decoupled decay,
            a different regulariser).
        betas, eps, momentum: optimizer settings (Keras' Adam defaults; SGD momentum).
        in_channels, out_channels, base_filters: the UNet's shape (the seed: 3, 1, 8).
        img_size: the square side images are resized to for training, kept so that prediction
            from a checkpoint resizes the same way.
        channels_last: run convolutions in NHWC memory layout (much faster on CPUs and GPUs).
    """

    def __init__(
        self,
        lr: float = 1e-3,
        l2: float = 0.0,
        optimizer: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        momentum: float = 0.9,
        in_channels: int = 3,
        out_channels: int = 1,
        base_filters: int = 8,
        img_size: int = 128,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        self.save_hyperparameters()
        self.unet = UNet(in_channels, out_channels, base_filters)
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        # the epoch's mean training loss, reduced across DDP ranks once per epoch (not every step)
        self.train_loss = MeanMetric()
        self.train_iou = PixelMeanIoU()
        self.val_iou = PixelMeanIoU()
        self.test_iou = PixelMeanIoU()
        self.val_dsb_score = DSBScore()
        self.test_dsb_score = DSBScore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, H, W)`` for images ``x`` float32 ``(N, C, H, W)`` in [0, 1]."""
        return self.unet(x)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if isinstance(batch, dict):
            batch = dict(batch)
            batch["image"] = self.prepare_images(batch["image"])
            if "mask" in batch:
                batch["mask"] = batch["mask"].float()
        return batch

    def prepare_images(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] ``(N, C, H, W)`` -> float32 [0, 1], in the model's memory layout."""
        x = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Probabilities ``(N, out_channels, H, W)`` float32 in [0, 1], with the batch's ids and sizes."""
        prob = torch.sigmoid(self(batch["image"]).float())
        return {"prob": prob, **{k: v for k, v in batch.items() if k not in ("image", "mask", "labels")}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return build_optimizer(self.unet, h.optimizer, lr=h.lr, l2=h.l2, betas=tuple(h.betas), eps=h.eps, momentum=h.momentum)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        x, y = batch["image"], batch["mask"]
        logits = self(x)
        # Keras' sigmoid + binary_crossentropy, computed from logits for numerical safety.
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        n = x.shape[0]
        # Epoch-level values reduce across DDP ranks at the epoch's end only; nothing here syncs
        # the host with the device per step (the progress bar reads the step loss when it redraws).
        if stage == "train":
            self.train_loss(loss.detach(), n)
            self.log("train/loss", self.train_loss, prog_bar=True, on_step=True, on_epoch=True)
        else:
            self.log(f"{stage}/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        if self.hparams.l2 > 0:
            # The loss a Keras run reports includes the regularisation penalty: log both.
            penalty = l2_penalty(self.unet, self.hparams.l2)
            self.log(f"{stage}/l2_penalty", penalty, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            self.log(f"{stage}/loss_with_l2", loss.detach() + penalty, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        iou = getattr(self, f"{stage}_iou")
        iou.update(torch.sigmoid(logits.detach().float()), y)
        self.log(f"{stage}/iou", iou, prog_bar=stage != "train", on_step=False, on_epoch=True)
        if stage != "train" and "labels" in batch:
            # The competition score at model resolution: nuclei = connected components of prob > 0.5.
            dsb = getattr(self, f"{stage}_dsb_score")
            dsb.update(label_components(logits.detach()[:, 0] > 0), batch["labels"])
            self.log(f"{stage}/dsb_score", dsb, prog_bar=True, on_step=False, on_epoch=True)
        return loss
