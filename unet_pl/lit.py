"""LitUNet: the LightningModule users import. Loss, metrics, steps and the optimizer.

The batch (a dict, as ``unet_pl.data`` yields it):
    image:  uint8 (N, 3, H, W) in [0, 255], or float32 in [0, 1]
    mask:   uint8 or float (N, 1, H, W), foreground 1 (train/val/test)
    labels: int (N, H, W), 0 background, 1..k one per nucleus (val/test, optional)
    id:     list[str]; size: int64 (N, 2) original (H, W) of each image (predict)
    boundary: uint8 (N, 1, H, W), nucleus boundaries (train/val/test with the mask+boundary head)
``on_after_batch_transfer`` turns images into float [0, 1] on the device (the seed's
``Lambda(x / 255)``), so only uint8 crosses the host-device link.
"""
from __future__ import annotations

import logging

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F

from .metrics import DSBScore, PixelMeanIoU, RunningMean, label_components
from .model import UNet
from .optim import OPTIMIZERS, build_optimizer, l2_penalty
from .perf import keep_freed_memory, release_freed_memory
from .targets import head_channels

log = logging.getLogger(__name__)

RESOLUTIONS = ("resize", "native")


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
            from a checkpoint resizes the same way (with ``resolution="native"``: the crop side).
        channels_last: run convolutions in NHWC memory layout (much faster on CPUs and GPUs).
        head: "mask" (one output, the notebook) or "mask+boundary" (a second output, nucleus
            boundaries, trained from the batch's "boundary"; prediction splits touching nuclei
            with a watershed on it). Sets ``out_channels`` (leave that at 1).
        resolution: "resize" (images squashed to ``img_size`` squares, the notebook) or "native"
            (trained on crops of full-size images; prediction runs whole images at their size).
        boundary_weight: BCE ``pos_weight`` of the boundary output (its positives count this
            many times). Boundaries are a few percent of the pixels: with a plain BCE the output
            stayed under 0.4 everywhere and the watershed split almost nothing (hold-out score
            0.374 against 0.433 with 5, both at seed threshold 0.5). The notebook head ignores it.
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
        head: str = "mask",
        resolution: str = "resize",
        boundary_weight: float = 5.0,
    ) -> None:
        super().__init__()
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
        if out_channels != head_channels(head):
            if out_channels != 1:  # an explicit choice that contradicts the head
                raise ValueError(f"head {head!r} has {head_channels(head)} output channels but out_channels={out_channels}; "
                                 "leave out_channels at its default and choose the head")
            out_channels = head_channels(head)
        self.save_hyperparameters()
        self.hparams.out_channels = out_channels  # what the checkpoint must rebuild
        self.unet = UNet(in_channels, out_channels, base_filters)
        if channels_last:
            self.unet = self.unet.to(memory_format=torch.channels_last)
        # the epoch's mean training loss, reduced across DDP ranks once per epoch (not every step)
        self.train_loss = RunningMean()
        self.train_iou = PixelMeanIoU()
        self.val_iou = PixelMeanIoU()
        self.test_iou = PixelMeanIoU()
        self.val_dsb_score = DSBScore()
        self.test_dsb_score = DSBScore()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, H, W)`` for images ``x`` float32 ``(N, C, H, W)`` in [0, 1]."""
        return self.unet(x)

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cpu":
            keep_freed_memory()  # no page faults on every activation (see unet_pl.perf)
        # Prediction resizes images to the checkpoint's img_size: record the size the data module
        # really feeds, so LitUNet() + NucleiDataModule(img_size=256) does not save 128.
        dm = self.trainer.datamodule if self._trainer is not None else None
        size = dm.hparams.get("img_size") if dm is not None and hasattr(dm, "hparams") else None
        if size is not None and size != self.hparams.img_size:
            log.info("img_size: the data module feeds %s px, not %s; the checkpoint records %s", size, self.hparams.img_size, size)
            self.hparams.img_size = size

    def teardown(self, stage: str) -> None:
        release_freed_memory()  # the run's peak goes back to the system (see unet_pl.perf)

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if isinstance(batch, dict):
            batch = dict(batch)
            batch["image"] = self.prepare_images(batch["image"])
            for key in ("mask", "boundary"):
                if key in batch:
                    batch[key] = batch[key].float()
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
        # float16 loss scaling skips overflowed steps inside a fused kernel, unseen by KerasAdam
        fp16 = self._trainer is not None and str(self._trainer.precision).startswith("16")
        return build_optimizer(self.unet, h.optimizer, lr=h.lr, l2=h.l2, betas=tuple(h.betas), eps=h.eps, momentum=h.momentum,
                               fused=False if fp16 else None)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        x, y = batch["image"], self._targets(batch)
        logits = self(x)
        loss = self._loss(logits, y)
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
        iou.update(torch.sigmoid(logits.detach()[:, :1].float()), y[:, :1])
        self.log(f"{stage}/iou", iou, prog_bar=stage != "train", on_step=False, on_epoch=True)
        if stage != "train" and "labels" in batch:
            # The competition score at model resolution, nuclei made as prediction makes them.
            dsb = getattr(self, f"{stage}_dsb_score")
            dsb.update(self._nuclei(logits.detach()), batch["labels"])
            self.log(f"{stage}/dsb_score", dsb, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Keras' sigmoid + binary_crossentropy, computed from logits for numerical safety; with the
        boundary head the mean over both outputs, the boundary's positives weighted by ``boundary_weight``."""
        if self.hparams.out_channels == 1:
            return F.binary_cross_entropy_with_logits(logits.float(), y)
        pos_weight = torch.tensor([1.0, float(self.hparams.boundary_weight)], device=y.device).view(2, 1, 1)
        return F.binary_cross_entropy_with_logits(logits.float(), y, pos_weight=pos_weight)

    def _targets(self, batch: dict) -> torch.Tensor:
        """The loss' targets ``(N, out_channels, H, W)``: the mask, then the boundary for that head."""
        if self.hparams.out_channels == 1:
            return batch["mask"]
        if "boundary" not in batch:
            raise ValueError(f"the {self.hparams.head!r} head trains on the batch's 'boundary' maps, and this batch has "
                             f"none; build the data module with head={self.hparams.head!r}")
        return torch.cat([batch["mask"], batch["boundary"]], 1)

    def _nuclei(self, logits: torch.Tensor):
        """Predicted nuclei (int labels (N, H, W), on the CPU) as prediction makes them at this resolution."""
        if self.hparams.out_channels == 1:
            # The notebook: nuclei = connected components of prob > 0.5.
            return label_components(logits[:, 0] > 0)
        from .postprocess import SEED_THRESHOLDS, split_nuclei

        prob = torch.sigmoid(logits.float()).cpu().numpy()
        seed = SEED_THRESHOLDS[self.hparams.resolution]
        return np.stack([split_nuclei(p[0], p[1], seed_threshold=seed) for p in prob])
