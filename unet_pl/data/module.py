"""A training folder as one LightningDataModule: decoded once into a cache, split, batched.

Layouts, detected (``unet_pl.data.images``); ``data_dir`` is the folder itself, or a folder holding
``stage1_train``:
    the competition's:
    stage1_train/<id>/images/<id>.png     one image (PNG, TIFF, JPEG or BMP; grey, RGB(A), 8- or 16-bit,
                                          multi-channel with ``channel``)
    stage1_train/<id>/masks/*.png         one file per nucleus, any value > 0 ({0, 255}, {0, 1}, ...)
    stage1_train_labels.csv               optional, beside stage1_train: the same masks as runs
    label images (Fiji, QuPath, napari, Cellpose):
    my_data/images/<name>.tif             one image (the same formats)
    my_data/masks/<name>.tif              its label image (or labels/<name>.*): 0 background, one
                                          integer per nucleus, 8/16/32-bit PNG or TIFF

How images meet the network is three constructor arguments, recorded by Lightning and checked
against the model's (``unet_pl.geometry``): ``resolution`` ("resize": squashed to ``img_size``
squares as the notebook did; "native": random ``img_size`` crops of the full-size images, centre
crops for validation), ``img_size`` and ``head``.

``prepare_data`` decodes every image and its masks once (threads: zlib inflation, most of the
work, releases the GIL) into one ``.npz`` in ``cache_dir``, atomically (``unet_pl.data.cache``;
the native cache is shared by every ``img_size``). ``setup`` loads it on every rank. Nothing
is ever written under ``data_dir``.

Split: a seeded permutation of the sorted image ids, so the same images are in validation on
every run and every rank. The notebook's Keras ``validation_split=0.1`` took the last 10% of
``os.walk`` order, which depends on the filesystem; a seeded shuffle is reproducible anywhere.
"""
from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import SAMPLE_DIR
from ..geometry import DEFAULT_SIZE, agreed_keys, check_resolution, check_side, head_channels, reconcile
from .cache import (
    build_cache, building, cache_bytes, cache_name, check_cache_dir, decode_item, default_cache_dir, fingerprint, load_cache,
    native_image, prune,
)
from .datasets import AugmentSampler, ImageFolderDataset, NucleiDataset, crop_transform
from .groups import group_holdout, image_groups
from .holdout import check_holdout, holdout_from_modalities, is_group_holdout, keep_ids
from .readers import INTENSITIES
from .images import (
    TrainItem, image_size, list_images, read_labels_csv, resolve_labels_csv, resolve_train_dir, scan_train_dir,
    warn_if_binary,
)
from .transforms import build_augment, zoom_range

log = logging.getLogger(__name__)
#: Fewer validation images than this get a warning: best.ckpt and the tuned thresholds rest on them.
FEW_VALIDATION = 3

EMPTY_MASKS = ("error", "background")


def split_indices(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` -> ``(train, val)`` sorted index arrays; ``round(n * val_split)`` in val, at least 1 if > 0."""
    n_val = 0 if val_split <= 0 else min(max(1, round(n * val_split)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


#: ``NucleiDataModule(balance=...)``: how an epoch draws its training images.
BALANCES = ("none", "modality")


def modality_weights(modalities: np.ndarray) -> np.ndarray | None:
    """One sampling weight per image: ``1 / sqrt(images of its modality)``, so that each modality is
    drawn in proportion to the square root of its count (grouped fold 2's training images,
    fluorescence 373, histology 42 and brightfield 16: 65%, 22% and 13% of the draws instead of
    87%, 10% and 4%). None for images of one modality: nothing to balance."""
    _, index, counts = np.unique(np.asarray(modalities).astype(str), return_inverse=True, return_counts=True)
    return 1.0 / np.sqrt(counts[index]) if len(counts) > 1 else None


def default_workers(gpus: int) -> int:
    """Loader processes when none are asked for (`--num-workers`, `num_workers=None`).

    CPU training uses every core for the step and the loader needs ~5% of one (5,000 images/s
    per worker against ~250 trained): workers only compete with the training threads (2-core
    EPYC, full set: 257 images/s with 0 workers against 233 with 2 in --mode notebook, 214-244
    against 204 in --mode instance, whose crops cost more to load). A GPU step is ~50x
    faster, so there the loader needs processes of its own: up to 8, one core left per GPU.
    """
    if gpus == 0:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)  # a job's share
    return max(1, min(8, cores // gpus - 1))


class NucleiDataModule(pl.LightningDataModule):
    """The competition's training folder, cached, split and batched for one resolution mode.

    Args:
        data_dir: ``stage1_train`` or the folder holding it; None: the bundled sample (``SAMPLE_DIR``).
        resolution: "resize" (images and masks squashed to ``img_size`` squares, the notebook) or
            "native" (random ``img_size`` crops of the full-size images; centre crops for validation).
        img_size: the side of the squares the network trains on (a multiple of 16).
        head: "mask" (batches carry the mask, the notebook), "mask+boundary" (also each nucleus'
            boundary, ``unet_pl.data.targets``, computed after augmentation) or "mask+boundary+distance"
            (also each pixel's depth in its nucleus, float ``distance``).
        val_split: fraction of images held out (seeded, see the module docstring); 0: none.
        batch_size: images per batch.
        num_workers: loader processes (augmentation runs in them); None: ``default_workers`` for
            the device the Trainer trains on (0 on the CPU, up to 8 per GPU).
        seed: the split's seed (augmentation follows Lightning's ``seed_everything``).
        augment: a preset of ``unet_pl.data.transforms`` ("default", "none" (the notebook), "colour",
            "scale" (native only), "colour+scale", "stain") or an albumentations transform; train only
            (native: after the crop).
        cache_dir: where the decoded cache goes; None: ``$XDG_CACHE_HOME/unet_pl`` or ``~/.cache/unet_pl``.
        labels_csv: None: masks from ``masks/`` folders; a path, or True for the
            ``stage1_train_labels.csv`` beside ``stage1_train``: masks from its runs.
        empty_masks: "error" (an image without masks is a mistake) or "background" (train it as all background).
        holdout: "none", "stratified" or "group:k/K" (fold k of the grouped cross-validation,
            ``unet_pl.data.groups``: the images are decoded once more in ``setup`` for their
            acquisition groups): the images ``unet_pl.data.holdout`` holds out are in neither
            split (the split is drawn from the rest). Their ids are in ``holdout_ids`` after
            ``setup`` and travel in the checkpoint (``state_dict``).
        predict_dir: images to predict (``list_images`` layouts), whole, one a batch; None: the
            validation images, whole.
        decode_workers: threads decoding in ``prepare_data``; progress: show the decoding bar.
        channel: the nuclear channel of multi-channel files (1-based), None: grey or RGB as stored.
        intensity: "fixed" (the notebook: 16-bit keeps its high byte), "percentile" (each image
            stretched between its 1st and 99.8th percentiles), "grey" (grey, stretched, bright
            backgrounds inverted) or "hematoxylin" (as grey, stained tissue as its haematoxylin);
            ``unet_pl.data.readers``.
        balance: "none" (every training image once an epoch, the notebook) or "modality" (an epoch
            draws as many images, with replacement, each kind of image (``unet_pl.data.holdout``'s
            modality) in proportion to the square root of its count: rare kinds seen more often,
            ``modality_weights``; a training set of one kind keeps "none").

    Stages: fit (train + val), validate and test (the validation split, with ``labels``),
    predict (``predict_dir``). Batches follow docs/design.md.
    """

    def __init__(self, data_dir: str | Path | None = None, img_size: int = DEFAULT_SIZE, val_split: float = 0.1,
                 batch_size: int = 16, num_workers: int | None = None, seed: int = 42, augment="default",
                 cache_dir: str | Path | None = None, labels_csv: str | Path | bool | None = None, empty_masks: str = "error",
                 predict_dir: str | Path | None = None, decode_workers: int = 2, progress: bool = True, head: str = "mask",
                 holdout: str = "none", resolution: str = "resize", channel: int | None = None,
                 intensity: str = "fixed", balance: str = "none") -> None:
        super().__init__()
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        check_resolution(resolution)
        if intensity not in INTENSITIES:
            raise ValueError(f"intensity must be one of {', '.join(INTENSITIES)}, got {intensity!r}")
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int) or channel < 1):
            raise ValueError(f"channel counts from 1 (as Fiji does), got {channel!r}")
        head_channels(head)  # a bad head name fails here
        img_size = check_side(img_size)  # a plain int in hparams and checkpoints, whatever integer type came in
        check_holdout(holdout)
        if not 0 <= val_split < 1:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if empty_masks not in EMPTY_MASKS:
            raise ValueError(f"empty_masks must be one of {', '.join(EMPTY_MASKS)}, got {empty_masks!r}")
        self.transform = build_augment(augment)  # a bad preset name fails here, not in a worker
        if zoom_range(augment) is not None and resolution != "native":
            raise ValueError(f"augment={augment!r} changes the crop's magnification, which needs resolution='native' "
                             "(a resized square has no size to keep); use 'default' or 'colour'")
        self.save_hyperparameters(ignore=["augment"])
        self.hparams["augment"] = augment if isinstance(augment, str) or augment is None else type(augment).__name__
        for key, value in self.hparams.items():  # checkpoints hold these: plain types load with weights_only
            if isinstance(value, os.PathLike):
                self.hparams[key] = os.fspath(value)
        self._hparams_initial = self.hparams.copy()
        self.data_dir = SAMPLE_DIR if data_dir is None else Path(data_dir)
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        self.arrays: dict[str, np.ndarray] | None = None
        self.holdout_ids: list[str] = []
        self._located: tuple[Path, Callable[[], None], list[TrainItem], dict | None, Path | None] | None = None
        self.train_set = self.val_set = self.predict_set = None

    def prepare_data(self) -> None:
        """Decode and cache once (rank 0 of each node under DDP). Raises on bad input, before training,
        and on a model that disagrees with this data module (``geometry.reconcile``) before decoding."""
        model = self.trainer.lightning_module if self.trainer is not None else None
        predicting = self.trainer is not None and self.trainer.predicting
        if model is not None and hasattr(model, "take_from_datamodule"):
            reconcile(model.hparams, {k: self.hparams[k] for k in agreed_keys(predicting) if k in self.hparams})
        if predicting and self.hparams.predict_dir is not None:
            return  # whole images of predict_dir, read as they are needed: nothing to decode ahead
        path, job = self._locate()[:2]
        if path.is_file():
            log.info("using cached %s", path)
            return
        job()

    def setup(self, stage: str | None = None) -> None:
        # Predicting, the model's geometry rules (whole images at its resolution): this module's
        # resolution, img_size and head are not logged beside the model's, where Lightning's merge
        # of the two would stop a native model predicting with a default (resize) module.
        self._log_hyperparams = stage != "predict"
        if stage in (None, "fit", "validate", "test") and self.arrays is None:
            path, job = self._locate()[:2]
            try:
                self.arrays = load_cache(path, self.hparams.resolution)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                # No prepare_data (a plain script), or another node's cache_dir: build it here.
                if path.is_file():
                    log.warning("cache %s is unreadable (%s); rebuilding it", path, e)
                    path.unlink(missing_ok=True)
                job()
                self.arrays = load_cache(path, self.hparams.resolution)
            self._make_datasets(*self._split())
            if stage in (None, "fit"):
                self._say_split()
        if stage in (None, "predict") and self.predict_set is None:
            if self.hparams.predict_dir is None:
                self.setup("validate")
                by_id = {it.id: it.image for it in self._locate()[2]}
                entries = [(i, by_id[i]) for i in (str(self.arrays["ids"][j]) for j in self.val_set.indices)]
            else:
                entries = list_images(self.hparams.predict_dir)
            self.predict_set = ImageFolderDataset(entries, self.hparams.channel, self.hparams.intensity)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the held-out ids (so prediction need not recompute them)."""
        return {"holdout": self.hparams.holdout, "holdout_ids": list(self.holdout_ids)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("holdout") == self.hparams.holdout and self.holdout_ids and \
                sorted(state_dict.get("holdout_ids", [])) != sorted(self.holdout_ids):
            log.warning("the checkpoint held out other images than this data module does; this run holds out %d "
                        "images as computed now", len(self.holdout_ids))

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices into the cache: the seeded split of every image not held out."""
        ids = self.arrays["ids"]
        keep = np.arange(len(ids))
        if self.hparams.holdout != "none":
            self.holdout_ids = self._held_out(ids)
            keep = keep_ids(ids, self.holdout_ids)
        if len(keep) < 2:
            after = " not held out" if self.hparams.holdout != "none" else ""
            raise ValueError(f"{resolve_train_dir(self.data_dir)} has {len(keep)} image{'s' * (len(keep) != 1)}{after}: "
                             "training needs at least 2 (one of them to validate on, for early stopping and best.ckpt); "
                             "add images")
        train, val = split_indices(len(keep), self.hparams.val_split, self.hparams.seed)
        return keep[train], keep[val]

    def _say_split(self) -> None:
        """How many images train and validate (and are held out): one line; a warning when the
        validation images are too few to choose ``best.ckpt`` and the post-processing on."""
        from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

        n_train, n_val = len(self.train_set), len(self.val_set)
        held = f", {len(self.holdout_ids)} held out (--holdout {self.hparams.holdout})" if self.holdout_ids else ""
        rank_zero_info(f"unet_pl: {n_train} image{'s' * (n_train != 1)} to train on, {n_val} to validate on{held}")
        if 0 < n_val < FEW_VALIDATION:
            n = n_train + n_val
            # the smallest split that gives FEW_VALIDATION images (split_indices rounds n * val_split), keeping two to train on
            more = (f"give validation {FEW_VALIDATION} (--val-split {math.ceil(100 * FEW_VALIDATION / n) / 100:g})"
                    if n >= FEW_VALIDATION + 2 else "annotate a few more images")
            rank_zero_only(log.warning)(
                f"only {n_val} validation image{'s' * (n_val != 1)}: best.ckpt and the post-processing thresholds are chosen "
                f"on {'it' if n_val == 1 else 'them'} alone; {more}, and check the result on images you kept out")

    def _held_out(self, ids: np.ndarray) -> list[str]:
        """The ids ``holdout`` names: by the cached modalities, or by acquisition group (decoded here,
        from the files as stored, so that predict.py and evaluate.py compute the same groups)."""
        h = self.hparams
        if not is_group_holdout(h.holdout):
            return holdout_from_modalities(ids, self.arrays["modalities"], h.holdout)
        paths = {it.id: it.image for it in self._locate()[2]}
        groups = image_groups({str(i): paths[str(i)] for i in ids}, h.decode_workers)
        return group_holdout(list(groups), list(groups.values()), h.holdout)

    def _make_datasets(self, train: np.ndarray, val: np.ndarray) -> None:
        h = self.hparams
        common = dict(head=h.head, resolution=h.resolution)
        if h.resolution == "native":
            self.train_set = NucleiDataset(self.arrays, train, crop_transform(h.img_size, self.transform, train=True,
                                                                                  zoom=zoom_range(h.augment)), **common)
            self.val_set = NucleiDataset(self.arrays, val, crop_transform(h.img_size, None, train=False), with_labels=True, **common)
        else:
            self.train_set = NucleiDataset(self.arrays, train, self.transform, **common)
            self.val_set = NucleiDataset(self.arrays, val, with_labels=True, **common)

    def validation_images(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
        """``(id, image uint8 (H, W, 3), labels uint16 (H, W))`` of each validation image at its own
        size, for scoring as prediction sees them (the native cache holds them; resized ones are read again)."""
        if self.val_set is None:
            self.setup("validate")
        _, _, items, rles, csv_path = self._locate()
        by_id = {it.id: it for it in items}
        for j in self.val_set.indices:
            image_id = str(self.arrays["ids"][j])
            if self.hparams.resolution == "native":
                yield (image_id, *native_image(self.arrays, int(j)))
            else:
                yield (image_id, *decode_item(by_id[image_id], rles, csv_path, self.hparams.channel, self.hparams.intensity))

    @property
    def cache_path(self) -> Path:
        """The cache file for the current data, settings and format version."""
        return self._locate()[0]

    def train_dataloader(self) -> DataLoader:
        # A loader with workers draws its first indices when it is made, before Lightning's
        # set_epoch: start at the epoch Lightning will pass (the epochs processed so far, which a
        # resumed run restores before asking for the loader), so a resumed first epoch matches.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        weights = None
        if self.hparams.balance == "modality":
            weights = modality_weights(self.arrays["modalities"][self.train_set.indices])
        return self._loader(self.train_set, sampler=AugmentSampler(len(self.train_set), self.hparams.seed, epoch, weights))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        if self.val_set is not None and not len(self.val_set):
            raise ValueError("test runs on the validation split, and val_split=0 leaves it empty; pass val_split > 0")
        return self._loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        """Whole images, one a batch (their sizes differ): ``LitUNet.predict_step`` segments each."""
        if self.predict_set is None:
            raise RuntimeError("call setup('predict') (or let the Trainer call it) before asking for a DataLoader")
        return DataLoader(self.predict_set, batch_size=1)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() (or let the Trainer call it) before asking for a DataLoader")
        gpus = self._gpus()
        w = self.hparams.num_workers
        w = default_workers(gpus) if w is None else w
        return DataLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler, num_workers=w,
                          persistent_workers=w > 0, pin_memory=gpus > 0)

    def _gpus(self) -> int:
        """GPUs per node the attached Trainer trains on (without a Trainer: 1 if CUDA is there, else 0)."""
        if self.trainer is None:
            return int(torch.cuda.is_available())
        return self.trainer.num_devices if self.trainer.strategy.root_device.type == "cuda" else 0

    def _locate(self) -> tuple[Path, Callable[[], None], list[TrainItem], dict | None, Path | None]:
        """Scan the folders once (raising on bad layout) -> the cache path, the function that builds
        it, the items, and the labels CSV's runs and path when masks come from it."""
        if self._located is not None:
            return self._located
        h = self.hparams
        train_dir = resolve_train_dir(self.data_dir)
        csv_path = resolve_labels_csv(h.labels_csv, train_dir)
        items = scan_train_dir(train_dir, with_masks=csv_path is None)
        rles = None
        if csv_path is not None:
            rles = read_labels_csv(csv_path)
            unknown = set(rles) - {it.id for it in items}
            if unknown:
                log.warning("%s: %d image ids have no folder in %s and are ignored", csv_path, len(unknown), train_dir)
        if h.empty_masks == "error":
            for it in items:
                if not (rles.get(it.id) if rles is not None else it.masks):
                    competition = it.image.parent.parent.name == it.id
                    where = (f"{csv_path} has no runs for {it.id}" if rles is not None
                             else f"{it.image.parent.parent / 'masks'} has no mask images" if competition
                             else f"{it.image} has no {it.id}_masks{it.image.suffix} (or _cp_masks, _labels and the like) beside it"
                             if it.image.parent == train_dir
                             else f"{it.image} has no label image of the same name in masks/ (or labels/; <name>_masks, _cp_masks, _labels and the like count too)")
                    raise ValueError(f"{where}: add its masks, remove the image, or pass "
                                     "--empty-masks background (empty_masks='background' in Python) to train on it "
                                     "as all background")
        if len(items) < 2:  # said before decoding; with a hold-out, _split says it after
            raise ValueError(f"{train_dir} has {len(items)} image{'s' * (len(items) != 1)}: training needs at least 2 "
                             "(one of them to validate on, for early stopping and best.ckpt); add images")
        key = fingerprint(train_dir, items, csv_path, "native" if h.resolution == "native" else h.img_size, h.empty_masks,
                          h.channel, h.intensity)
        path = self.cache_dir / cache_name(h.resolution, h.img_size, key)

        def job() -> None:
            shapes = [image_size(it.image) for it in items] if h.resolution == "native" else [(0, 0)] * len(items)
            check_cache_dir(self.cache_dir, cache_bytes(h.resolution, h.img_size, shapes))
            with building(path):
                if path.is_file():  # another run decoded it while this one waited
                    log.info("using %s, decoded by another run meanwhile", path)
                    return
                log.info("decoding %d images from %s into %s", len(items), train_dir, path)
                if h.head != "mask" and csv_path is None:
                    warn_if_binary(items)  # said as the annotations are decoded (each file read once more)
                build_cache(items, h.resolution, h.img_size, path, rles, csv_path, h.decode_workers, h.progress,
                            h.channel, h.intensity)
            prune(self.cache_dir, keep=path)

        self._located = (path, job, items, rles, csv_path)
        return self._located
