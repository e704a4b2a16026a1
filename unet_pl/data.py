"""The competition's folders as datasets and a LightningDataModule, decoded once into a cache.

Layout (``data_dir`` is ``stage1_train`` itself, or a folder holding one):
    stage1_train/<id>/images/<id>.png     one image (RGBA, RGB, grey or 16-bit)
    stage1_train/<id>/masks/*.png         one mask per nucleus, {0, 255} or {0, 1}
    stage1_train_labels.csv               optional, beside stage1_train: the same masks as runs

``prepare_data`` decodes every image and its masks once (threads: zlib inflation, most of
the work, releases the GIL), resizes them as the notebook did (``unet_pl.images``) and writes
one ``.npz`` in ``cache_dir``, atomically. Its name is a hash of everything it depends on: the
file list with sizes and mtimes, ``img_size``, the mask source, ``empty_masks`` and
``unet_pl.cache.CACHE_VERSION``; changing any of them makes a new cache. ``setup`` loads it on every rank.
Nothing is ever written under ``data_dir``.

Split: a seeded permutation of the sorted image ids, so the same images are in validation
on every run and every rank. The notebook's Keras ``validation_split=0.1`` took the last 10%
of ``os.walk`` order, which depends on the filesystem; a seeded shuffle is reproducible anywhere.
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm.auto import tqdm

from .cache import build_cache, default_cache_dir, fingerprint, load_cache
from .images import (  # noqa: F401  (list_images, read_labels_csv: re-exported for the CLIs)
    TrainItem, list_images, read_image, read_labels_csv, resize_image, resolve_labels_csv,
    resolve_train_dir, scan_train_dir,
)
from .holdout import HOLDOUTS, holdout_ids, keep_ids
from .model import DIVISOR, nearest_valid_size
from .targets import head_channels, make_targets
from .transforms import build_augment

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parent / "sample" / "stage1_train"
EMPTY_MASKS = ("error", "background")


def split_indices(n: int, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` -> ``(train, val)`` sorted index arrays; ``round(n * val_split)`` in val, at least 1 if > 0."""
    n_val = 0 if val_split <= 0 else min(max(1, round(n * val_split)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class CachedDataset(Dataset):
    """Items ``indices`` of a decoded cache (``arrays``), augmented by ``self.transform``.

    ``__getitem__`` takes an index, or ``(index, seed)`` from ``AugmentSampler``; subclasses call
    ``seed_transform(seed)`` before augmenting.
    """

    def __init__(self, arrays: dict[str, np.ndarray], indices: Sequence[int] | None) -> None:
        self.arrays = arrays
        self.indices = np.arange(len(arrays["ids"])) if indices is None else np.asarray(indices, dtype=np.int64)
        self.ids = [str(i) for i in arrays["ids"]]
        self.transform: Callable | None = None
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def seed_transform(self, seed: int | None) -> None:
        """The sampler's seed for this item; without one, a seed per worker process (once)."""
        if not hasattr(self.transform, "set_random_seed"):
            return
        if seed is not None:
            self.transform.set_random_seed(seed)
        elif self._seeded_pid != os.getpid():
            # albumentations keeps its own generator, copied into every forked worker: without a
            # reseed all workers would draw the same augmentations. torch's seed (per worker in a
            # worker) is distinct per worker and reproducible under seed_everything.
            info = get_worker_info()
            self.transform.set_random_seed((info.seed if info is not None else torch.initial_seed()) % 2**32)
            self._seeded_pid = os.getpid()


class NucleiDataset(CachedDataset):
    """Decoded images (a ``load_cache`` dict) at ``indices``, as the batch contract's dicts.

    Item: ``image`` uint8 (3, S, S), ``mask`` uint8 (1, S, S) in {0, 1}, ``id`` str, ``size`` int64
    (2,) original (H, W), and with ``with_labels`` ``labels`` int32 (S, S). ``transform`` (train
    only) is called as ``transform(image=(S, S, 3), mask=(S, S))`` in the DataLoader worker; for
    the ``mask+boundary`` head also with ``masks=[labels (S, S)]``, moved with the image, and
    the item gets ``boundary`` uint8 (1, S, S) from the moved labels (``unet_pl.targets``).
    """

    def __init__(self, arrays: dict[str, np.ndarray], indices: Sequence[int] | None = None,
                 transform: Callable | None = None, with_labels: bool = False, head: str = "mask") -> None:
        super().__init__(arrays, indices)
        self.transform = transform
        self.with_labels = with_labels
        self.boundary = head_channels(head) > 1

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        i, seed = i if isinstance(i, tuple) else (i, None)  # (index, augmentation seed) from AugmentSampler
        j = int(self.indices[i])
        image, mask = self.arrays["images"][j], self.arrays["masks"][j]
        labels = self.arrays["labels"][j]
        if self.transform is not None:
            self.seed_transform(seed)
            # The labels move with the image only when a target is made from them.
            out = self.transform(image=image, mask=mask, **({"masks": [labels]} if self.boundary else {}))
            image, mask = out["image"], out["mask"]
            labels = out["masks"][0] if self.boundary else labels
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "id": self.ids[j],
            "size": torch.from_numpy(self.arrays["sizes"][j].copy()),
        }
        if self.boundary:
            item["boundary"] = torch.from_numpy(make_targets(labels, "mask+boundary")[1:])
        if self.with_labels:
            item["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int32))
        return item


class AugmentSampler(Sampler):
    """Shuffles like ``RandomSampler`` and hands each index its own augmentation seed.

    Order and seeds both come from ``(seed, epoch)``, so an epoch's batches and their
    augmentations are the same whichever worker draws them, and a run resumed at epoch ``e``
    draws exactly what the uninterrupted run drew. Lightning calls ``set_epoch`` before every
    epoch; where a wrapper hides it (DDP's sampler wrapper), the epoch counts up by itself.
    """

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order, seeds = rng.permutation(self.n), rng.integers(0, 2**32, self.n)
        self.epoch += 1
        return iter(zip(order.tolist(), seeds.tolist()))


class ImageFolderDataset(Dataset):
    """Images without masks (``list_images`` layouts), decoded and resized up front so a bad file fails here.

    Item: ``image`` uint8 (3, S, S) resized as in training, ``id`` str, ``size`` int64 (2,) original (H, W).
    ``ids``: only these images of the folder (in its id order).
    """

    def __init__(self, folder: str | Path, img_size: int, workers: int = 2, progress: bool = True,
                 ids: Sequence[str] | None = None) -> None:
        self.entries = list_images(folder)
        if ids is not None:
            wanted = set(ids)
            self.entries = [(i, p) for i, p in self.entries if i in wanted]
        def decode(path: Path) -> tuple[tuple[int, int], np.ndarray]:
            # resized as soon as decoded: a folder of large images never sits in memory at full size
            image = read_image(path)
            return image.shape[:2], resize_image(image, img_size)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = list(tqdm(pool.map(decode, [p for _, p in self.entries]), total=len(self.entries),
                                desc=f"decoding {len(self.entries)} images", unit="img", disable=not progress))
        self.sizes = np.array([size for size, _ in decoded], dtype=np.int64).reshape(-1, 2)
        self.images = np.stack([im for _, im in decoded])

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1))),
            "id": self.entries[i][0],
            "size": torch.from_numpy(self.sizes[i].copy()),
        }


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
    """The competition's training folder, resized to ``img_size`` squares, split, batched.

    Args:
        data_dir: ``stage1_train`` or the folder holding it; None: the bundled sample (``SAMPLE_DIR``).
        img_size: square side images and masks are resized to (a multiple of 16).
        val_split: fraction of images held out (seeded, see the module docstring); 0: none.
        batch_size: images per batch.
        num_workers: loader processes (augmentation runs in them); None: ``default_workers`` for
            the device the Trainer trains on (0 on the CPU, up to 8 per GPU).
        seed: the split's seed (augmentation follows Lightning's ``seed_everything``).
        augment: "default", "none" (the notebook) or an albumentations transform; train only.
        cache_dir: where the decoded cache goes; None: ``$XDG_CACHE_HOME/unet_pl`` or ``~/.cache/unet_pl``.
        labels_csv: None: masks from ``masks/`` folders; a path, or True for the
            ``stage1_train_labels.csv`` beside ``stage1_train``: masks from its runs.
        empty_masks: "error" (an image without masks is a mistake) or "background" (train it as all background).
        head: "mask" (batches carry the mask, the notebook) or "mask+boundary" (also each nucleus'
            boundary, ``unet_pl.targets``, computed after augmentation).
        holdout: "none" or "stratified": the images ``unet_pl.holdout`` holds out are in neither
            split (the split is drawn from the rest).
        predict_dir: images to predict (``list_images`` layouts); None: the validation images.
        decode_workers: threads decoding in ``prepare_data``; progress: show the decoding bar.

    Stages: fit (train + val), validate and test (the validation split, with ``labels``),
    predict (``predict_dir``). Batches follow docs/design.md.
    """

    def __init__(self, data_dir: str | Path | None = None, img_size: int = 128, val_split: float = 0.1, batch_size: int = 16,
                 num_workers: int | None = None, seed: int = 42, augment="default", cache_dir: str | Path | None = None,
                 labels_csv: str | Path | bool | None = None, empty_masks: str = "error", predict_dir: str | Path | None = None,
                 decode_workers: int = 2, progress: bool = True, head: str = "mask", holdout: str = "none") -> None:
        super().__init__()
        head_channels(head)  # a bad head name fails here
        if holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {', '.join(HOLDOUTS)}, got {holdout!r}")
        if not isinstance(img_size, int) or img_size < DIVISOR or img_size % DIVISOR:
            raise ValueError(f"img_size must be a positive multiple of {DIVISOR} (the U-Net pools four times), got {img_size}; "
                             f"try {nearest_valid_size(max(int(img_size), 1))}")
        if not 0 <= val_split < 1:
            raise ValueError(f"val_split must be in [0, 1), got {val_split}")
        if empty_masks not in EMPTY_MASKS:
            raise ValueError(f"empty_masks must be one of {', '.join(EMPTY_MASKS)}, got {empty_masks!r}")
        self.transform = build_augment(augment)  # a bad preset name fails here, not in a worker
        self.save_hyperparameters(ignore=["augment"])
        self.hparams["augment"] = augment if isinstance(augment, str) or augment is None else type(augment).__name__
        for key, value in self.hparams.items():  # checkpoints hold these: plain types load with weights_only
            if isinstance(value, os.PathLike):
                self.hparams[key] = os.fspath(value)
        self.data_dir = SAMPLE_DIR if data_dir is None else Path(data_dir)
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
        self.arrays: dict[str, np.ndarray] | None = None
        self._located: tuple[Path, Callable[[], None]] | None = None
        self.train_set = self.val_set = self.predict_set = None

    def prepare_data(self) -> None:
        """Decode and cache once (rank 0 of each node under DDP). Raises on bad input, before training."""
        # The CLI calls this before the Trainer does: scan (stat ~30k mask files) once per instance.
        if self._located is None:
            self._located = self._locate()
        path, job = self._located
        if path.is_file():
            log.info("using cached %s", path)
            return
        job()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate", "test") and self.arrays is None:
            # Reuse prepare_data's scan of the folders in this process; other ranks scan here.
            path, job = self._located or self._locate()
            try:
                self.arrays = self._load_arrays(path)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                # No prepare_data (a plain script), or another node's cache_dir: build it here.
                if path.is_file():
                    log.warning("cache %s is unreadable (%s); rebuilding it", path, e)
                job()
                self.arrays = self._load_arrays(path)
            self._make_datasets(*self._split())
        if stage in (None, "predict") and self.predict_set is None:
            if self.hparams.predict_dir is None:
                self.setup("validate")
                self.predict_set = self.val_set
            else:
                self.predict_set = ImageFolderDataset(self.hparams.predict_dir, self.hparams.img_size,
                                                      self.hparams.decode_workers, self.hparams.progress)

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices into the cache: the seeded split of every image not held out."""
        ids = self.arrays["ids"]
        keep = np.arange(len(ids))
        if self.hparams.holdout != "none":
            keep = keep_ids(ids, holdout_ids(resolve_train_dir(self.data_dir), self.hparams.holdout))
        train, val = split_indices(len(keep), self.hparams.val_split, self.hparams.seed)
        return keep[train], keep[val]

    def _load_arrays(self, path: Path) -> dict[str, np.ndarray]:
        return load_cache(path)

    def _make_datasets(self, train: np.ndarray, val: np.ndarray) -> None:
        head = self.hparams.head
        self.train_set = NucleiDataset(self.arrays, train, self.transform, head=head)
        self.val_set = NucleiDataset(self.arrays, val, with_labels=True, head=head)

    @property
    def cache_path(self) -> Path:
        """The cache file for the current data, settings and format version."""
        return self._locate()[0]

    def train_dataloader(self) -> DataLoader:
        # A loader with workers draws its first indices when it is made, before Lightning's
        # set_epoch: start at the epoch Lightning will pass (the epochs processed so far, which a
        # resumed run restores before asking for the loader), so a resumed first epoch matches.
        epoch = self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0
        return self._loader(self.train_set, sampler=AugmentSampler(len(self.train_set), self.hparams.seed, epoch))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        if self.val_set is not None and not len(self.val_set):
            raise ValueError("test runs on the validation split, and val_split=0 leaves it empty; pass val_split > 0")
        return self._loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

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

    def _locate(self) -> tuple[Path, Callable[[], None]]:
        """Scan the folders (raising on bad layout) -> the cache path and a function that builds it."""
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
                    where = f"{csv_path} has no runs for {it.id}" if rles is not None else f"{it.image.parent.parent / 'masks'} has no mask images"
                    raise ValueError(f"{where}: add its masks, remove {it.image.parent.parent}, or pass "
                                     "empty_masks='background' to train on it as all background")
        return self._cache_job(train_dir, items, rles, csv_path)

    def _cache_job(self, train_dir: Path, items: Sequence[TrainItem], rles: dict | None,
                   csv_path: Path | None) -> tuple[Path, Callable[[], None]]:
        """The cache file for these images and settings, and the function that writes it."""
        h = self.hparams
        key = fingerprint(train_dir, items, csv_path, h.img_size, h.empty_masks)
        path = self.cache_dir / f"dsb2018-{h.img_size}px-{key}.npz"

        def job() -> None:
            log.info("decoding %d images from %s into %s", len(items), train_dir, path)
            build_cache(items, h.img_size, path, rles, csv_path, h.decode_workers, h.progress)

        return path, job

