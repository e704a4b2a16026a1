"""Datasets over the decoded caches (``unet_pl.data.cache``) and over folders of images, and the
sampler that seeds each item's augmentation.

Items follow docs/design.md's batch: ``image`` uint8 (3, S, S), ``mask`` uint8 (1, S, S) in
{0, 1}, ``id`` str, ``size`` int64 (2,) the image's own (H, W); ``labels`` int32 (S, S) with
``with_labels``; ``boundary`` uint8 (1, S, S) for the ``mask+boundary`` head, made after
augmentation from the moved labels (``unet_pl.data.targets``), and with it ``contact`` uint8
(1, S, S), where two nuclei touch (``LitUNet(contact_weight=...)`` weighs the loss there);
``distance`` float32 (1, S, S) in [0, 1] for the ``mask+boundary+distance`` head, each pixel's
depth in its nucleus (``unet_pl.data.targets.distances``).
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from ..geometry import check_resolution, head_channels
from .cache import native_image
from .images import image_size, read_image
from .targets import boundaries, contacts, distances


def crop_transform(crop_size: int, augment: A.BaseCompose | None, train: bool,
                   zoom: tuple[float, float] | None = None) -> A.Compose:
    """Native resolution. Train: pad to ``crop_size`` (mirrored), a random ``crop_size`` crop, then
    ``augment``. Eval: the same padding and one fixed crop per image (``ValidationCrop``), so the
    validation loss is comparable from epoch to epoch. Called as ``t(image=, mask=, masks=[labels])``.

    ``zoom=(lo, hi)`` (train only, the "scale" presets): the crop is a random square of side
    ``crop_size / hi`` to ``crop_size / lo`` resized to ``crop_size`` (labels by nearest neighbour),
    so nuclei appear between ``lo`` and ``hi`` times their size."""
    zoom = zoom if train else None
    big = crop_size if zoom is None else round(crop_size / zoom[0])  # the largest square cut
    pad = A.PadIfNeeded(min_height=big, min_width=big, border_mode=cv2.BORDER_REFLECT_101, p=1.0)
    if not train:
        return ValidationCrop(A.Compose([pad]), crop_size)
    if zoom is None:
        steps: list = [pad, A.RandomCrop(crop_size, crop_size, p=1.0)]
    else:
        small = max(1, round(crop_size / zoom[1]))
        steps = [pad, A.RandomSizedCrop(min_max_height=(small, big), size=(crop_size, crop_size), w2h_ratio=1.0, p=1.0)]
    if augment is not None:
        steps.append(augment)
    return A.Compose(steps)


class ValidationCrop:
    """The validation crop of a native-resolution image, the same every epoch: the centre
    ``crop_size`` square of the padded image, unless it holds no nucleus pixel while the image
    holds some; then the square holding the most nucleus pixels (the first in row order of those
    tied). A centre crop of background scores a perfect 1.0 and a loss near 0 for any model: on a
    user's few validation images it chose ``best.ckpt`` and stopped runs early on nothing (6% of
    stage1_train's images have nuclei but none in their centre 128 px)."""

    def __init__(self, pad: A.Compose, crop_size: int) -> None:
        self.pad, self.size = pad, crop_size

    def __call__(self, image: np.ndarray, mask: np.ndarray, masks: list[np.ndarray] | None = None) -> dict:
        out = self.pad(image=image, mask=mask, **({"masks": masks} if masks is not None else {}))
        mask, s = out["mask"], self.size
        h, w = mask.shape[:2]
        y0, x0 = (h - s) // 2, (w - s) // 2  # albumentations' CenterCrop
        if not mask[y0:y0 + s, x0:x0 + s].any() and mask.any():
            c = np.pad((mask > 0).astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
            inside = c[s:, s:] - c[:-s, s:] - c[s:, :-s] + c[:-s, :-s]  # nucleus pixels of the square at (y, x)
            y0, x0 = (int(v) for v in np.unravel_index(np.argmax(inside), inside.shape))
        crop = (slice(y0, y0 + s), slice(x0, x0 + s))
        result = {"image": out["image"][crop], "mask": mask[crop]}
        if masks is not None:
            result["masks"] = [m[crop] for m in out["masks"]]
        return result


def seed_augmentation(transform, seed: int) -> None:
    """Seed an albumentations pipeline with ONE generator that all its transforms draw from in turn.

    ``Compose.set_random_seed(seed)`` gives every transform a generator of its own started from
    the same seed, so every transform draws the same first number: the flips and the brightness
    jitter fired together (a horizontal and a vertical flip together are a rotation: no crop was
    ever mirrored), and the crop's position went with them. One shared generator draws
    independent numbers for each.
    """
    if hasattr(transform, "set_random_state"):
        transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    else:
        transform.set_random_seed(seed)


class NucleiDataset(Dataset):
    """Items ``indices`` of a decoded cache (``arrays`` of ``resolution``), through ``transform``.

    resize: the cached squares, ``transform`` the augmentation (train) or None. native: the
    full-size images, ``transform`` a ``crop_transform`` (random crop + augmentation, or the
    centre crop). The transform is called as ``transform(image=(H, W, 3), mask=(H, W))``, with
    ``masks=[labels]`` too when labels or boundaries are wanted, so they move with the image.
    ``__getitem__`` takes an index, or ``(index, seed)`` from ``AugmentSampler``.
    """

    def __init__(self, arrays: dict[str, np.ndarray], indices: Sequence[int] | None = None, transform: Callable | None = None,
                 with_labels: bool = False, head: str = "mask", resolution: str = "resize") -> None:
        self.resolution = check_resolution(resolution)
        self.head = head
        self.boundary = head_channels(head) > 1
        self.with_labels = with_labels
        self.arrays = arrays
        self.indices = np.arange(len(arrays["ids"])) if indices is None else np.asarray(indices, dtype=np.int64)
        self.ids = [str(i) for i in arrays["ids"]]
        self.transform = transform
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def seed_transform(self, seed: int | None) -> None:
        """The sampler's seed for this item; without one, a seed per worker process (once)."""
        if not hasattr(self.transform, "set_random_seed"):
            return
        if seed is None:
            if self._seeded_pid == os.getpid():
                return
            # albumentations keeps its own generator, copied into every forked worker: without a
            # reseed all workers would draw the same augmentations. torch's seed (per worker in a
            # worker) is distinct per worker and reproducible under seed_everything.
            info = get_worker_info()
            seed = (info.seed if info is not None else torch.initial_seed()) % 2**32
            self._seeded_pid = os.getpid()
        seed_augmentation(self.transform, seed)

    def _raw(self, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Cached image j: (image (H, W, 3), mask (H, W) {0, 1}, labels (H, W), its original (H, W))."""
        if self.resolution == "native":
            image, labels = native_image(self.arrays, j)
            return image, (labels > 0).astype(np.uint8), labels, self.arrays["shapes"][j]
        a = self.arrays
        return a["images"][j], a["masks"][j], a["labels"][j], a["sizes"][j]

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        i, seed = i if isinstance(i, tuple) else (i, None)  # (index, augmentation seed) from AugmentSampler
        j = int(self.indices[i])
        image, mask, labels, size = self._raw(j)
        if self.transform is not None:
            self.seed_transform(seed)
            moved = self.boundary or self.with_labels  # labels travel with the image only when used
            out = self.transform(image=image, mask=mask, **({"masks": [labels]} if moved else {}))
            image, mask = out["image"], out["mask"]
            labels = out["masks"][0] if moved else labels
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None],
            "id": self.ids[j],
            "size": torch.from_numpy(np.array(size, dtype=np.int64)),
        }
        if self.boundary:
            item["boundary"] = torch.from_numpy(boundaries(labels))[None]
            if head_channels(self.head) > 2:
                item["distance"] = torch.from_numpy(distances(labels))[None]
            item["contact"] = torch.from_numpy(contacts(labels))[None]
        if self.with_labels:
            item["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int32))
        return item


class AugmentSampler(Sampler):
    """Shuffles like ``RandomSampler`` and hands each index its own augmentation seed.

    Order and seeds both come from ``(seed, epoch)``, so an epoch's batches and their
    augmentations are the same whichever worker draws them, and a run resumed at epoch ``e``
    draws exactly what the uninterrupted run drew. Lightning calls ``set_epoch`` before every
    epoch; where a wrapper hides it (DDP's sampler wrapper), the epoch counts up by itself.

    ``weights`` (one per index, any positive scale): an epoch is ``n`` draws with replacement,
    index ``i`` with probability ``weights[i] / sum(weights)``, instead of a permutation.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, epoch
        self.p = None
        if weights is not None:
            weights = np.asarray(weights, np.float64)
            if weights.shape != (n,) or not np.all(weights > 0):
                raise ValueError(f"weights must be {n} positive numbers, one per image")
            self.p = weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.p is None else rng.choice(self.n, self.n, p=self.p)
        seeds = rng.integers(0, 2**32, self.n)
        self.epoch += 1
        return iter(zip(order.tolist(), seeds.tolist()))


class ImageFolderDataset(Dataset):
    """Whole images for the data module's predict stage: ``(id, path)`` entries (``list_images``),
    each read at its own size when asked for (``LitUNet.predict_step`` runs the inference path on
    it). Every file's header is read up front, so an unreadable file fails in ``setup``.

    Item: ``image`` uint8 (H, W, 3) read with ``channel`` and ``intensity`` (``unet_pl.data.readers``),
    ``id`` str, ``size`` int64 (2,) (H, W). Batch size 1: sizes differ.
    """

    def __init__(self, entries: Sequence[tuple[str, Path]], channel: int | None = None, intensity: str = "fixed") -> None:
        self.entries = list(entries)
        self.channel, self.intensity = channel, intensity
        self.sizes = [image_size(p) for _, p in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        image_id, path = self.entries[i]
        image = read_image(path, self.channel, self.intensity)
        return {"image": torch.from_numpy(image), "id": image_id, "size": torch.tensor(self.sizes[i])}
