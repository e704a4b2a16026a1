"""Native resolution: the training images at their own size, trained on random crops.

The notebook squashes every image (256x256 to 1388x1040) to 128x128: a 1024x1024 brightfield
image shrinks eightfold and its small nuclei vanish or merge. Here ``prepare_data`` decodes
every image and its per-nucleus labels once at full size into one ``.npz`` (the 670-image set:
104 M pixels, 0.5 GB as uint8 RGB + uint16 labels, stored flat with per-image offsets), and
training draws one random ``crop_size`` square of each image per epoch (mirror-padded where
the image is smaller), then the usual flips, rotations and jitter, with image, mask and labels
moved together by albumentations. Validation uses the centre crop of each image, so its loss
is comparable from epoch to epoch. Prediction runs on whole images (``unet_pl.tiling``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from .cache import fingerprint, load_npz, write_npz_atomically
from .data import CachedDataset, NucleiDataModule
from .images import TrainItem, decode_masks, image_size, read_image
from .targets import head_channels, make_targets

log = logging.getLogger(__name__)

NATIVE_KEYS = ("images", "labels", "shapes", "offsets", "ids")


def crop_transform(crop_size: int, augment: A.BaseCompose | None, train: bool) -> A.Compose:
    """Train: pad to ``crop_size`` (mirrored), a random ``crop_size`` crop, then ``augment``.
    Eval: the same padding and the centre crop. Called as ``t(image=, mask=, masks=[labels])``."""
    pad = A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    if not train:
        return A.Compose([pad, A.CenterCrop(crop_size, crop_size, p=1.0)])
    steps: list = [pad, A.RandomCrop(crop_size, crop_size, p=1.0)]
    if augment is not None:
        steps.append(augment)
    return A.Compose(steps)


def _decode_native(item: TrainItem, rles, csv_path) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(item.image)
    labels = decode_masks(image.shape[:2], None if rles is not None else list(item.masks),
                          None if rles is None else rles.get(item.id, []), csv_path)
    return image, labels


def build_native_cache(items: Sequence[TrainItem], path: Path, rles: dict | None = None, csv_path: Path | None = None,
                       workers: int = 2, progress: bool = True) -> None:
    """Decode ``items`` at full size and write ``path`` (.npz) atomically.

    Arrays: ``images`` uint8 (P, 3) and ``labels`` uint16 (P,), every image's pixels one after
    another (row-major); ``shapes`` int64 (N, 2) each (H, W); ``offsets`` int64 (N + 1,) where
    image k starts in the flat arrays; ``ids`` str (N,).
    """
    shapes = np.array([image_size(it.image) for it in items], dtype=np.int64).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)
    images = np.zeros((offsets[-1], 3), np.uint8)
    labels = np.zeros(offsets[-1], np.uint16)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(_decode_native, it, rles, csv_path) for it in items]
        try:
            for k, fut in enumerate(tqdm(futures, desc=f"decoding {len(items)} images at full size", unit="img",
                                         disable=not progress)):
                im, lab = fut.result()
                images[offsets[k]:offsets[k + 1]] = im.reshape(-1, 3)
                labels[offsets[k]:offsets[k + 1]] = lab.ravel()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    write_npz_atomically(path, dict(images=images, labels=labels, shapes=shapes, offsets=offsets,
                                    ids=np.array([it.id for it in items])))


def load_native_cache(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``build_native_cache`` wrote. ``ValueError`` if the file is not such a cache."""
    return load_npz(path, NATIVE_KEYS, "unet_pl native-resolution cache")


def native_image(arrays: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``k`` of a native cache: (uint8 (H, W, 3), uint16 labels (H, W)), views, no copies."""
    h, w = (int(v) for v in arrays["shapes"][k])
    a, b = arrays["offsets"][k], arrays["offsets"][k + 1]
    return arrays["images"][a:b].reshape(h, w, 3), arrays["labels"][a:b].reshape(h, w)


class NativeCropDataset(CachedDataset):
    """Crops of full-resolution images (a ``load_native_cache`` dict) at ``indices``.

    Item (docs/design.md's batch): ``image`` uint8 (3, S, S), ``mask`` uint8 (1, S, S) in {0, 1},
    ``labels`` int32 (S, S) (with ``with_labels``), ``boundary`` uint8 (1, S, S) for the
    ``mask+boundary`` head, ``id`` str, ``size`` int64 (2,) the image's (H, W). S = ``crop_size``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], indices: Sequence[int] | None, crop_size: int,
                 augment: A.BaseCompose | None = None, train: bool = True, head: str = "mask",
                 with_labels: bool = False) -> None:
        super().__init__(arrays, indices)
        self.transform: Callable = crop_transform(crop_size, augment, train)
        self.head = head
        head_channels(head)
        self.with_labels = with_labels

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        i, seed = i if isinstance(i, tuple) else (i, None)  # (index, augmentation seed) from AugmentSampler
        j = int(self.indices[i])
        image, labels = native_image(self.arrays, j)
        self.seed_transform(seed)
        out = self.transform(image=image, mask=(labels > 0).astype(np.uint8), masks=[labels])
        image, mask, labels = out["image"], out["mask"], out["masks"][0]
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None],
            "id": self.ids[j],
            "size": torch.from_numpy(self.arrays["shapes"][j].copy()),
        }
        if head_channels(self.head) > 1:
            item["boundary"] = torch.from_numpy(make_targets(labels, self.head)[1:])
        if self.with_labels:
            item["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int32))
        return item


class NativeNucleiDataModule(NucleiDataModule):
    """``NucleiDataModule`` at native resolution: the same folders, split, hold-out and errors, but
    a full-size cache and random ``crop_size`` crops for training (centre crops for validation).

    Args: as ``NucleiDataModule``, with ``crop_size`` (a multiple of 16) in place of ``img_size``;
    ``augment`` runs after the crop. Batches follow docs/design.md at ``crop_size``; "size" is
    each image's full (H, W). Whole-image prediction is ``unet_pl.predict``'s job.
    """

    def __init__(self, data_dir: str | Path | None = None, crop_size: int = 128, **kwargs) -> None:
        if "img_size" in kwargs:
            raise TypeError("NativeNucleiDataModule takes crop_size, not img_size: images keep their own size")
        super().__init__(data_dir, img_size=crop_size, **kwargs)
        self.hparams["resolution"] = "native"

    @property
    def crop_size(self) -> int:
        return int(self.hparams.img_size)

    def _cache_job(self, train_dir, items, rles, csv_path) -> tuple[Path, Callable[[], None]]:
        h = self.hparams
        key = fingerprint(train_dir, items, csv_path, "native", h.empty_masks)  # no size: one cache for every crop_size
        path = self.cache_dir / f"dsb2018-native-{key}.npz"

        def job() -> None:
            log.info("decoding %d images from %s at full size into %s", len(items), train_dir, path)
            build_native_cache(items, path, rles, csv_path, h.decode_workers, h.progress)

        return path, job

    def _load_arrays(self, path: Path) -> dict[str, np.ndarray]:
        return load_native_cache(path)

    def _make_datasets(self, train: np.ndarray, val: np.ndarray) -> None:
        h = self.hparams
        self.train_set = NativeCropDataset(self.arrays, train, self.crop_size, self.transform, train=True, head=h.head)
        self.val_set = NativeCropDataset(self.arrays, val, self.crop_size, None, train=False, head=h.head, with_labels=True)
