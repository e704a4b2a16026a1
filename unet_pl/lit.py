"""LitUNet: the LightningModule users import. Loss, metrics, steps and the optimizer.

The batch (a dict, as ``unet_pl.data`` yields it):
    image:  uint8 (N, 3, H, W) in [0, 255], or float32 in [0, 1]
    mask:   uint8 or float (N, 1, H, W), foreground 1 (train/val/test)
    labels: int (N, H, W), 0 background, 1..k one per nucleus (val/test, optional)
    id:     list[str]; size: int64 (N, 2) original (H, W) of each image (predict)
    boundary: uint8 (N, 1, H, W), nucleus boundaries (train/val/test with the mask+boundary head)
    contact: uint8 (N, 1, H, W), where two nuclei touch (with boundary; used with ``contact_weight``)
    distance: float (N, 1, H, W) in [0, 1], each pixel's depth in its nucleus (the mask+boundary+distance head)
``on_after_batch_transfer`` turns images into float [0, 1] on the device (the seed's
``Lambda(x / 255)``), so only uint8 crosses the host-device link.
"""
from __future__ import annotations

import math
import os
import pickle
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .geometry import BOUNDARY_TARGETS, SHARED_KEYS, agreed_keys, check_resolution, check_side, head_channels, reconcile
from .inference.predict import labels_from_probabilities, probabilities, to_input
from .inference.settings import CUT_KEY, TUNED_KEYS, Settings
from .metrics import DSBScore, PixelMeanIoU, RunningMean, label_components
from .model import UNet
from .optim import OPTIMIZERS, build_optimizer, l2_penalty

# By design (docs/design.md): the uint8 -> float conversion lives in on_after_batch_transfer, which
# Lightning warns about whenever a model overrides it; said once here, not at every fit.
warnings.filterwarnings("ignore", message=r"You have overridden `on_after_batch_transfer` in `LightningModule`")

LR_SCHEDULES = ("constant", "plateau", "cosine")


class LitUNet(pl.LightningModule):
    """The seed's U-Net trained as the notebook trains it (sigmoid + binary cross-entropy, Adam).

    Args:
        lr: learning rate (Keras' Adam default 1e-3).
        l2: Keras' ``regularizers.l2(w)`` coefficient ``w`` on every conv and transposed-conv
            kernel, applied as ``weight_decay = 2*w`` (see ``unet_pl.optim``). 0: the notebook.
        optimizer: ``adam`` (coupled: exactly Keras' L2), ``sgd`` or ``adamw`` (decoupled decay,
            a different regulariser).
        lr_schedule: "constant" (Keras' notebook: ``lr`` throughout) or "plateau" (the learning rate
            times 0.3 at the end of the third epoch in a row without a val/loss lower by 1e-4 relative,
            down to ``lr / 100``: torch's ``ReduceLROnPlateau`` with patience 2, which cuts after
            patience + 1 such epochs). Early stopping needs a patience above 3 to let a cut act.
            "cosine": each epoch ``e`` of ``schedule_epochs`` ``E`` at ``lr * (1 + cos(pi * e / E)) / 2``,
            from ``lr`` to almost 0 at the last epoch (then 0).
        schedule_epochs: the epochs the cosine schedule spans (required with it; train.py passes ``--epochs``).
        betas, eps, momentum: optimizer settings (Keras' Adam defaults; SGD momentum).
        in_channels, out_channels, base_filters: the UNet's shape (the seed: 3, 1, 8).
        img_size: the side of the squares the network trains on (resize: every image squashed to
            it; native: the crop side), kept so that prediction from a checkpoint does the same.
            None: the data module's (``unet_pl.geometry.reconcile``; 128 without one).
        channels_last: run convolutions in NHWC memory layout (much faster on CPUs and GPUs).
        head: "mask" (one output, the notebook) or "mask+boundary" (a second output, nucleus
            boundaries, trained from the batch's "boundary"; prediction splits touching nuclei
            with a watershed on it), or "mask+boundary+distance" (a third output, each pixel's depth in its
            nucleus, ``unet_pl.data.targets.distances``, a soft target of the same BCE; its watershed seeds
            need a low boundary and a high depth). Sets ``out_channels`` (leave that at 1).
        resolution: "resize" (images squashed to ``img_size`` squares, the notebook) or "native"
            (trained on crops of full-size images; prediction runs whole images at their size).
            None: the data module's ("resize" without one). A data module with other values
            than these three (``head`` too) is a ``ValueError`` before the first step.
        boundary_weight: BCE ``pos_weight`` of the boundary output (its positives count this
            many times). Boundaries are a few percent of the pixels: with a plain BCE the output
            stayed under 0.4 everywhere and the watershed split almost nothing (hold-out score
            0.374 against 0.433 with 5, both at seed threshold 0.5). The notebook head ignores it.
        contact_weight: where two nuclei touch (the batch's ``contact``, ``unet_pl.data.targets.contacts``),
            both outputs' loss counts ``1 + contact_weight`` times; 0: not weighted (the default).
            ``mask+boundary`` head only.
        boundary_target: what the boundary output learns: "ring" (each nucleus' outermost ring of pixels,
            the default) or "ring+contact" (also every pixel, nucleus or background, within 2 px of two nuclei:
            the batch's ``contact``, a wider line where nuclei touch, as the "touching borders" output of
            DSB 2018 entries; the watershed still grows the nuclei over the whole foreground).
        dice_weight: adds ``dice_weight * (1 - soft Dice)`` of the foreground output to the loss, the Dice
            taken per image (``(2 sum(p y) + 1) / (sum(p) + sum(y) + 1)``, p the sigmoid) and averaged over
            the batch, as many DSB 2018 entries trained their masks; 0: BCE alone (the default, Keras').
        lovasz_weight: adds ``lovasz_weight`` times the Lovász hinge of the foreground output to the loss
            (Berman et al., CVPR 2018: the convex surrogate of the Jaccard loss, 1 - IoU, that DSB 2018 and
            TGS Salt entries trained their masks with), taken per image and averaged over the batch;
            0: off (the default).
        ema: keep an exponential moving average of the weights, updated after every optimizer step with
            this decay (Lightning's ``WeightAveraging``; 0.995 averages over about the last 200 steps). The
            decay warms up as TensorFlow's does, ``min(decay, (1 + n) / (10 + n))`` after n steps, so short
            runs do not keep their random initial weights (``unet_pl.callbacks.WarmedEMA``).
            Validation, early stopping, ``best.ckpt``, tuning and the model after ``fit`` use the average;
            ``last.ckpt`` also keeps the current weights to resume from. 0: off (the default, Keras').
        channel, intensity: how the files are read (``unet_pl.data.readers``): the nuclear channel of
            multi-channel files and the intensity rule. None: the data module's (without one:
            no channel selection, "fixed").
        postprocess: ``{"threshold", "seed_threshold", "min_size"}`` chosen on the validation split
            at the end of training (``unet_pl.callbacks.TunePostprocessing``); prediction's defaults.
            Optionally also ``"split_concave": {the same keys}``, chosen with that cut on: what
            prediction uses with ``--split-concave``.
        tune_score: the mean validation score ``postprocess`` was chosen with (set by tuning; below
            ``unet_pl.inference.tune.UNTRAINED_SCORE`` prediction warns that the model finds almost nothing).
        tune: choose ``postprocess`` at the end of ``fit`` (the model adds ``TunePostprocessing``).
            None: for the ``mask+boundary`` head (its watershed has thresholds worth choosing; about
            20 s on 45 validation images on a 2-core CPU, both searches), not for the notebook's ``mask`` head.

    ``settings`` is what inference needs (``unet_pl.inference.Settings``): ``segment(model, image)``.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        l2: float = 0.0,
        optimizer: str = "adam",
        lr_schedule: str = "constant",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-7,
        momentum: float = 0.9,
        in_channels: int = 3,
        out_channels: int = 1,
        base_filters: int = 8,
        img_size: int | None = None,
        channels_last: bool = True,
        head: str = "mask",
        resolution: str | None = None,
        boundary_weight: float = 5.0,
        contact_weight: float = 0.0,
        boundary_target: str = "ring",
        dice_weight: float = 0.0,
        lovasz_weight: float = 0.0,
        ema: float = 0.0,
        postprocess: dict | None = None,
        tune_score: float | None = None,
        channel: int | None = None,
        intensity: str | None = None,
        tune: bool | None = None,
        schedule_epochs: int | None = None,
    ) -> None:
        super().__init__()
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if lr_schedule == "cosine" and not (isinstance(schedule_epochs, int) and schedule_epochs >= 1):
            raise ValueError(f"lr_schedule 'cosine' needs schedule_epochs, the epochs its decay spans (an int >= 1, e.g. the "
                             f"Trainer's max_epochs), got {schedule_epochs!r}")
        if resolution is not None:
            check_resolution(resolution)
        if img_size is not None:
            img_size = check_side(img_size)  # a plain int in hparams and checkpoints
        if not (math.isfinite(contact_weight) and contact_weight >= 0):
            raise ValueError(f"contact_weight must be a number >= 0, got {contact_weight}")
        if not (math.isfinite(dice_weight) and dice_weight >= 0):
            raise ValueError(f"dice_weight must be a number >= 0, got {dice_weight}")
        if not (math.isfinite(lovasz_weight) and lovasz_weight >= 0):
            raise ValueError(f"lovasz_weight must be a number >= 0, got {lovasz_weight}")
        if not (math.isfinite(ema) and 0 <= ema < 1):
            raise ValueError(f"ema must be a decay in [0, 1) (0: off), got {ema}")
        if boundary_target not in BOUNDARY_TARGETS:
            raise ValueError(f"unknown boundary_target {boundary_target!r}; choose one of {', '.join(BOUNDARY_TARGETS)}")
        if boundary_target != "ring" and head_channels(head) == 1:
            raise ValueError(f"boundary_target {boundary_target!r} needs a boundary head ('mask+boundary'), got head {head!r}")
        if contact_weight and head_channels(head) == 1:
            raise ValueError(f"contact_weight needs the 'mask+boundary' head (it weighs where nuclei touch), got head {head!r}")
        if out_channels != head_channels(head):
            if out_channels != 1:  # an explicit choice that contradicts the head
                raise ValueError(f"head {head!r} has {head_channels(head)} output channels but out_channels={out_channels}; "
                                 "leave out_channels at its default and choose the head")
            out_channels = head_channels(head)
        self.save_hyperparameters()
        self.hparams.out_channels = out_channels  # what the checkpoint must rebuild
        self.settings  # noqa: B018 - bad postprocess values fail here, not at the end of training
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

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool = True, **kwargs) -> LitUNet:
        """Lightning's ``load_from_checkpoint``, but ``weights_only=True`` unless asked otherwise:
        our checkpoints hold tensors and plain values only, and a file that holds code is refused
        with a one-line ``ValueError`` naming it."""
        try:
            return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                                strict=strict, weights_only=weights_only, **kwargs)
        except pickle.UnpicklingError:
            name = checkpoint_path if isinstance(checkpoint_path, (str, os.PathLike)) else "the checkpoint"
            raise ValueError(f"{name}: not a unet_pl checkpoint, or one holding code: refused (nothing in it was run); "
                             "use a best.ckpt or last.ckpt that train.py wrote") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, out_channels, H, W)`` for images ``x`` float32 ``(N, C, H, W)`` in [0, 1]."""
        return self.unet(x)

    @property
    def settings(self) -> Settings:
        """How inference uses this model: its geometry and post-processing (``unet_pl.inference.Settings``)."""
        return Settings.from_hparams(self.hparams)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and hasattr(dm, "hparams"):
            # predicting, the model's geometry rules (whole images); only how files are read must agree
            self.take_from_datamodule({k: dm.hparams[k] for k in agreed_keys(stage == "predict") if k in dm.hparams})

    def take_from_datamodule(self, data: dict) -> None:
        """Adopt the data module's side and resolution where this model has none; ``ValueError`` on a
        disagreement (``unet_pl.geometry.reconcile``). Both the checkpoint and the logged
        hyperparameters get the adopted values, so Lightning's merge of the two sees no clash."""
        taken = reconcile(self.hparams, {k: data[k] for k in SHARED_KEYS if k in data})
        for key, value in taken.items():
            if value is not None:
                rank_zero_info(f"unet_pl: LitUNet's {key} taken from the data module: {value}")
            self.hparams[key] = value
            self._hparams_initial[key] = value

    def set_postprocess(self, chosen: dict, score: float | None = None) -> None:
        """Store the post-processing prediction will use by default (keys ``TUNED_KEYS``, and ``CUT_KEY``:
        the same keys chosen for ``--split-concave``) and the validation score it was chosen with."""
        chosen = {k: chosen[k] for k in (*TUNED_KEYS, CUT_KEY) if k in chosen}
        Settings.from_hparams({**self.hparams, "postprocess": chosen})  # validates
        self.hparams["postprocess"] = chosen
        self.hparams["tune_score"] = None if score is None else round(float(score), 4)

    def configure_callbacks(self) -> list:
        """``KeepFreedMemory``: on CPU runs glibc keeps freed memory for reuse (no page faults per
        activation; ``unet_pl.perf``), logged when it takes effect, released when the run ends.
        ``AdaptiveThreads``: on CPU runs the thread count follows the machine's load (fewer threads
        while another program holds a core; ``unet_pl.perf.ThreadChooser``). Both say so through
        Lightning's logger when they take effect; ``trainer.callbacks`` lists them.
        ``EMAAveraging`` with ``ema``: an exponential moving average whose decay warms up
        (``unet_pl.callbacks.WarmedEMA``; before tuning, which reads the averaged ``best.ckpt``);
        ``TunePostprocessing`` with ``tune`` (see the class docstring)."""
        from .callbacks import AdaptiveThreads, EMAAveraging, KeepFreedMemory, TunePostprocessing

        tune = self.hparams.get("tune")
        tune = head_channels(self.hparams.head) > 1 if tune is None else tune
        ema = float(self.hparams.get("ema", 0.0))  # checkpoints from before it: off
        averaging = []
        if ema:
            averaging = [EMAAveraging(ema)]  # updated after every optimizer step
        return [KeepFreedMemory(), AdaptiveThreads(), *averaging] + ([TunePostprocessing()] if tune else [])

    def on_after_batch_transfer(self, batch, dataloader_idx: int = 0):
        if self._trainer is not None and self.trainer.predicting:
            return batch  # whole images for the inference path, which prepares them itself
        if isinstance(batch, dict):
            batch = dict(batch)
            batch["image"] = self.prepare_images(batch["image"])
            for key in ("mask", "boundary", "distance"):
                if key in batch:
                    batch[key] = batch[key].float()
        return batch

    def prepare_images(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] ``(N, C, H, W)`` -> float32 [0, 1], in the model's memory layout."""
        return to_input(image, channels_last=self.hparams.channels_last)

    #: Training steps run as this many micro-batches, each on its own thread with one torch
    #: thread (``_split_step``); 1: the whole batch at once. ``AdaptiveThreads`` sets it for CPU fits.
    micro_batches: int = 1

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.micro_batches > 1 and batch["image"].shape[0] >= self.micro_batches:
            return self._split_step(batch)
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The data module's predict stage yields one full-size image a batch (uint8 ``(1, H, W, 3)``):
        ``{"id", "prob" float (C, H, W), "labels" int32 (H, W)}`` as ``unet_pl.segment`` makes them."""
        settings = self.settings.decoded()  # the data module read the file with the model's channel and intensity
        prob = probabilities(self.unet, batch["image"][0].cpu().numpy(), settings)
        return {"id": batch["id"][0], "prob": prob, "labels": labels_from_probabilities(prob, settings)}

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        h = self.hparams
        # float16 loss scaling skips overflowed steps inside a fused kernel, unseen by KerasAdam
        fp16 = self._trainer is not None and str(self._trainer.precision).startswith("16")
        optimizer = build_optimizer(self.unet, h.optimizer, lr=h.lr, l2=h.l2, betas=tuple(h.betas), eps=h.eps,
                                    momentum=h.momentum, fused=False if fp16 else None)
        if h.get("lr_schedule", "constant") == "constant":  # checkpoints from before it: constant
            return optimizer
        if h.lr_schedule == "cosine":
            epochs = h.schedule_epochs
            cosine = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 + math.cos(math.pi * min(e, epochs) / epochs)) / 2)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.3, patience=2,
                                                             min_lr=h.lr / 100)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch"}}

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        y = self._targets(batch)
        logits = self(batch["image"])
        loss = self._loss(logits, y, self._weights(batch))
        self._log_step(batch, stage, loss, logits, y)
        return loss

    def _split_step(self, batch: dict) -> torch.Tensor:
        """The training step as ``micro_batches`` parts of the batch, forward and backward of each on
        its own thread at once (``unet_pl.perf.run_parts``): the same loss and gradients as the whole
        batch (each part's mean loss weighted by its share of the images), up to float rounding
        and dropout's random draws. Returns the batch's loss with a term whose gradient is the
        parts' gradients summed, so that Lightning's zero_grad, backward, accumulation and
        clipping run as for ``_step``."""
        from .perf import run_parts

        x, y, weight = batch["image"], self._targets(batch), self._weights(batch)
        n, device = x.shape[0], x.device.type
        params = [p for p in self.parameters() if p.requires_grad]
        autocast = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)  # per thread: carried over

        def part(rows: slice) -> tuple:
            with torch.autocast(device, dtype=autocast[1], enabled=autocast[0]):
                logits = self(x[rows])
                loss = self._loss(logits, y[rows], None if weight is None else weight[rows]) * ((rows.stop - rows.start) / n)
            return loss.detach(), logits.detach(), torch.autograd.grad(loss, params, allow_unused=True)

        bounds = np.linspace(0, n, self.micro_batches + 1).round().astype(int)
        parts = run_parts(part, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
        loss = torch.stack([p[0] for p in parts]).sum()
        self._log_step(batch, "train", loss, torch.cat([p[1] for p in parts]), y)
        with torch.autocast(device, enabled=False):
            carrier = sum((w * torch.stack(g).sum(0)).sum() for w, *g in zip(params, *(p[2] for p in parts))
                          if all(t is not None for t in g)) + x.new_zeros(())
        return loss + (carrier - carrier.detach())  # the loss' value, the parts' gradients

    def _log_step(self, batch: dict, stage: str, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = logits.shape[0]
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

    def _loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Keras' sigmoid + binary_crossentropy, computed from logits for numerical safety; with the
        boundary heads the mean over all outputs (the distance's soft target too), the boundary's positives weighted by ``boundary_weight``
        and every pixel by ``weight`` (``(N, 1, H, W)``, the contact weights) when given; plus the
        foreground's soft-Dice term when ``dice_weight`` is set, and its Lovász hinge when ``lovasz_weight`` is."""
        if self.hparams.out_channels == 1:
            loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        else:
            pos_weight = torch.tensor([1.0, float(self.hparams.boundary_weight), 1.0][: y.shape[1]], device=y.device).view(-1, 1, 1)
            loss = F.binary_cross_entropy_with_logits(logits.float(), y, weight=weight, pos_weight=pos_weight)
        dice_weight = float(self.hparams.get("dice_weight", 0.0))  # checkpoints from before it: 0
        if dice_weight:
            # per image, so that the micro-batch parts' losses add up to the batch's (training_step)
            p, t = torch.sigmoid(logits[:, 0].float()).flatten(1), y[:, 0].flatten(1)
            dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
            loss = loss + dice_weight * (1 - dice).mean()
        lovasz_weight = float(self.hparams.get("lovasz_weight", 0.0))  # checkpoints from before it: 0
        if lovasz_weight:
            per_image = [lovasz_hinge(z, t) for z, t in zip(logits[:, 0].float().flatten(1), y[:, 0].flatten(1))]
            loss = loss + lovasz_weight * torch.stack(per_image).mean()
        return loss

    def _weights(self, batch: dict) -> torch.Tensor | None:
        """Per-pixel loss weights ``1 + contact_weight * contact``, or None without contact weighting."""
        w = float(self.hparams.get("contact_weight", 0.0))
        if not w:
            return None
        return 1.0 + w * self._contact(batch, "contact_weight").float()

    @staticmethod
    def _contact(batch: dict, needed_by: str) -> torch.Tensor:
        """The batch's ``contact`` map (``unet_pl.data.targets.contacts``), or ``ValueError`` naming ``needed_by``."""
        if "contact" not in batch:
            raise ValueError(f"{needed_by} needs the batch's 'contact' maps (NucleiDataModule with head='mask+boundary' makes them)")
        return batch["contact"]

    def _targets(self, batch: dict) -> torch.Tensor:
        """The loss' targets ``(N, out_channels, H, W)``: the mask, then the boundary and the distance for those heads."""
        keys = ("mask", "boundary", "distance")[: self.hparams.out_channels]
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"the {self.hparams.head!r} head trains on the batch's {missing[0]!r} maps, and this batch has "
                             f"none; build the data module with head={self.hparams.head!r}")
        maps = [batch[k] for k in keys]
        if self.hparams.get("boundary_target", "ring") == "ring+contact":  # checkpoints from before it: ring
            maps[1] = torch.maximum(maps[1], self._contact(batch, "boundary_target 'ring+contact'").to(maps[1].dtype))
        return torch.cat(maps, 1)

    def _nuclei(self, logits: torch.Tensor) -> np.ndarray:
        """Predicted nuclei (int labels (N, H, W), on the CPU) as prediction makes them at this resolution:
        ``labels_from_probabilities`` with the model's settings (sizes in pixels at the image's own
        size mean nothing on resized squares, so resized validation keeps every nucleus)."""
        s = self.settings
        if s.resolution == "resize":
            s = s.replace(min_size=0, fill_holes=False)
        if not s.watershed and s.threshold == 0.5 and not s.min_size and not s.fill_holes:
            return label_components(logits[:, 0] > 0)  # the notebook's rule, without computing the sigmoid
        prob = torch.sigmoid(logits.float()).cpu().numpy()
        return np.stack([labels_from_probabilities(p, s) for p in prob])


def lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The Lovász hinge of one image (Berman, Rannen Triki and Blaschko, "The Lovász-Softmax loss", CVPR
    2018, eq. 9): the Lovász extension of the Jaccard loss evaluated at the hinge errors ``max(0, 1 - z s)``,
    ``z`` the flat logits, ``s`` the labels as -1 / +1. On errors of 0 or 2 (logits +-1) it is twice
    1 - IoU of the prediction; it is 0 once every pixel is right by a margin of 1."""
    signs = 2 * labels - 1
    errors, order = torch.sort(1 - logits * signs, descending=True)
    truth = labels[order]
    positives = truth.sum()
    intersection = positives - truth.cumsum(0)
    union = positives + (1 - truth).cumsum(0)
    jaccard = 1 - intersection / union  # the Jaccard loss of the first k pixels mispredicted, k = 1 ... n
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(F.relu(errors), grad)
