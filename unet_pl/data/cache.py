"""The decoded-data caches: one ``.npz`` per (file list, resolution, side, mask source, channel, intensity rule,
version), written atomically.

Two kinds, one builder (``build_cache``: a thread pool, one progress bar, one atomic write):

    resize  every image squashed to ``size`` squares as the notebook did (``unet_pl.geometry``):
            ``images`` uint8 (N, S, S, 3), ``masks`` uint8 (N, S, S) in {0, 1}, ``labels`` uint16
            (N, S, S), ``sizes`` int64 (N, 2) each original (H, W)
    native  every image at its own size, stored flat: ``images`` uint8 (P, 3) and ``labels``
            uint16 (P,), the images' pixels one after another (row-major); ``shapes`` int64
            (N, 2) each (H, W); ``offsets`` int64 (N + 1,) where image k starts
Both: ``ids`` str (N,) and ``modalities`` str (N,) (``unet_pl.data.holdout``, from the full-size
image, so the hold-out needs no second decoding).

``fingerprint`` names a cache by everything it depends on (the files' sizes and mtimes, the
resolution and side, the mask source, ``empty_masks``, the channel, the intensity rule and
``CACHE_VERSION``). The layout is in the file list: each file is keyed as ``<id>/<folder>/<name>``
(``<id>/masks/m1.png`` in the competition's layout, ``<id>/masks/<id>.tif`` for a label image).

Safety: ``building(path)`` holds a lock file beside the cache while one process decodes, so runs
started together decode once (the others wait, then reuse the file); whoever holds the lock
removes the temporary files that killed runs left (``<name>.*.tmp``: no live writer can own them
then). ``check_cache_dir`` says before any decoding when the folder cannot take the file. A new
cache removes the least recently used others beyond CACHE_LIMIT_GB (``prune``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..geometry import resize_image, resize_labels, resize_mask
from .holdout import image_modality
from .images import TrainItem, decode_masks, image_size, read_image
from .readers import read_raw, to_rgb8

log = logging.getLogger(__name__)

#: Bump when the cache's content changes meaning: every cache is rebuilt. 2: modalities stored;
#: 3: modalities from the files as stored, whatever the intensity rule (they were from the image
#: after it, so a grey model's stratified hold-out was not the one predict.py and evaluate.py use).
CACHE_VERSION = 3
KEYS = {
    "resize": ("images", "masks", "labels", "sizes", "ids", "modalities"),
    "native": ("images", "labels", "shapes", "offsets", "ids", "modalities"),
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unet_pl``, or ``~/.cache/unet_pl``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet_pl"


def fingerprint(train_dir: Path, items: Sequence[TrainItem], csv_path: Path | None, img_size: int | str, empty_masks: str,
                channel: int | None = None, intensity: str = "fixed") -> str:
    """The cache's name: a hash of its inputs (``img_size`` is "native" for the full-size cache; the
    channel and the intensity rule change the decoded pixels, the file names encode the layout)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, img_size, empty_masks, "csv" if csv_path else "masks",
                                   channel, intensity]).encode())
    lines = []
    for it in items:
        for p in (it.image, *it.masks):
            st = os.stat(p)
            lines.append(f"{it.id}/{p.parent.name}/{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    if csv_path is not None:
        st = os.stat(csv_path)
        lines.append(f"{csv_path.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
    h.update("".join(lines).encode())
    return h.hexdigest()[:20]


#: A cache folder holding more than this many GB of caches loses the least recently used ones when a new
#: cache is written there (``prune``); ``$UNET_PL_CACHE_GB`` sets another limit.
CACHE_LIMIT_GB = 5.0
CACHE_GLOB = "dsb2018-*.npz"


def cache_name(resolution: str, size: int, key: str) -> str:
    return f"dsb2018-native-{key}.npz" if resolution == "native" else f"dsb2018-{size}px-{key}.npz"


def decode_item(item: TrainItem, rles: dict | None, csv_path: Path | None, channel: int | None = None,
                intensity: str = "fixed", modality: bool = False) -> tuple:
    """One training image at full size: (uint8 (H, W, 3), uint16 labels (H, W)), masks from files or
    runs, the image read with ``channel`` and ``intensity`` (``unet_pl.data.readers``); with
    ``modality``, also the file's modality (``stored_modality``), from the same decoding."""
    raw = read_raw(item.image, channel)
    image = to_rgb8(raw, intensity, item.image)
    labels = decode_masks(image.shape[:2], None if rles is not None else list(item.masks),
                          None if rles is None else rles.get(item.id, []), csv_path)
    if not modality:
        return image, labels
    return image, labels, stored_modality(item, raw, image, channel, intensity)


def stored_modality(item: TrainItem, raw: np.ndarray, image: np.ndarray, channel: int | None, intensity: str) -> str:
    """The modality of ``item``'s file as stored (``holdout.folder_modalities``: the fixed rule, no
    channel picked), not of ``image`` (``raw`` after the intensity rule): grey makes H&E look like
    fluorescence, and the stratified hold-out must be the same images whatever a model reads."""
    if channel is None:
        return image_modality(image if intensity == "fixed" else to_rgb8(raw, "fixed", warn=False))
    try:  # the file's channels as stored, not the one picked: decoded again (channel models only)
        return image_modality(read_image(item.image))
    except ValueError:  # a file that needs its channel picked: as the model reads it, under the fixed rule
        return image_modality(to_rgb8(raw, "fixed", warn=False))


def build_cache(items: Sequence[TrainItem], resolution: str, size: int, path: Path, rles: dict | None = None,
                csv_path: Path | None = None, workers: int = 2, progress: bool = True, channel: int | None = None,
                intensity: str = "fixed") -> None:
    """Decode ``items`` in ``workers`` threads into the arrays of ``resolution`` (module docstring) and write ``path`` atomically.

    With ``rles`` (from the labels CSV) masks come from the runs, else from each item's mask files.
    The first bad file stops the build with its error; nothing is written then.
    """
    from .readers import reset_dark_warnings

    reset_dark_warnings()  # this build names its own first dark files
    n = len(items)
    ids = np.array([it.id for it in items])
    modalities = np.empty(n, dtype="<U12")
    if resolution == "native":
        shapes = np.array([image_size(it.image) for it in items], dtype=np.int64).reshape(-1, 2)
        offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])]).astype(np.int64)
        arrays = dict(images=np.zeros((offsets[-1], 3), np.uint8), labels=np.zeros(offsets[-1], np.uint16),
                      shapes=shapes, offsets=offsets)

        def store(k: int, image: np.ndarray, labels: np.ndarray) -> None:
            arrays["images"][offsets[k]:offsets[k + 1]] = image.reshape(-1, 3)
            arrays["labels"][offsets[k]:offsets[k + 1]] = labels.ravel()
        desc = f"decoding {n} images at full size"
    else:
        arrays = dict(images=np.zeros((n, size, size, 3), np.uint8), masks=np.zeros((n, size, size), np.uint8),
                      labels=np.zeros((n, size, size), np.uint16), sizes=np.zeros((n, 2), np.int64))

        def store(k: int, image: np.ndarray, labels: np.ndarray) -> None:
            arrays["images"][k] = resize_image(image, size)
            arrays["masks"][k] = resize_mask(labels > 0, size)
            arrays["labels"][k] = resize_labels(labels, size)
            arrays["sizes"][k] = image.shape[:2]
        desc = f"decoding {n} images at {size}px"

    def work(k: int) -> None:  # in a thread: decoding, inflating and resizing release the GIL
        image, labels, modalities[k] = decode_item(items[k], rles, csv_path, channel, intensity, modality=True)
        store(k, image, labels)

    _run_pool(work, n, workers, desc, progress)
    write_npz_atomically(path, {**arrays, "ids": ids, "modalities": modalities})


def _run_pool(work: Callable[[int], None], n: int, workers: int, desc: str, progress: bool) -> None:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [pool.submit(work, k) for k in range(n)]
        try:
            for fut in tqdm(futures, desc=desc, unit="img", disable=not progress):
                fut.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # fail fast: the first bad file is the message
            raise


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` replacing ``path`` whole (``unet_pl.atomic``): never a half-written cache."""
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_cache(path: Path, resolution: str = "resize") -> dict[str, np.ndarray]:
    """Every array of the cache at ``path`` in memory; ``ValueError`` when it is not a cache of ``resolution``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    with contextlib.suppress(OSError):
        os.utime(path)  # used now: ``prune`` removes the least recently used first
    missing = set(KEYS[resolution]) - set(arrays)
    if missing:
        raise ValueError(f"{path} is not a unet_pl {resolution} cache (no {', '.join(sorted(missing))})")
    return arrays


def prune(cache_dir: Path, keep: Path) -> list[Path]:
    """Remove the least recently used caches of ``cache_dir`` (by modification time, which ``load_cache``
    renews) until, with ``keep``, they take at most ``$UNET_PL_CACHE_GB`` (default CACHE_LIMIT_GB); returns
    those removed. A new file list, image folder or intensity rule makes a new cache, so without this the
    folder only grows. Files that are not caches are never touched; a run that had loaded one keeps its copy,
    one that had not yet decodes it again."""
    given = os.environ.get("UNET_PL_CACHE_GB") or str(CACHE_LIMIT_GB)
    try:
        limit = float(given) * 2**30
        if not limit >= 0:  # also NaN
            raise ValueError
    except ValueError:
        log.warning("UNET_PL_CACHE_GB=%r is not a size in GB (0 or more); keeping the cache folder under %g GB",
                    given, CACHE_LIMIT_GB)
        limit = CACHE_LIMIT_GB * 2**30
    stats = []
    for p in cache_dir.glob(CACHE_GLOB):
        with contextlib.suppress(OSError):
            if p != keep:
                stats.append((p.stat().st_mtime, p.stat().st_size, p))
    total = keep.stat().st_size if keep.is_file() else 0
    removed = []
    for _, size, p in sorted(stats, reverse=True):  # the most recently used first; from the first that does not fit, all
        total += size
        if total <= limit:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    if removed:
        log.warning("removed %d cache file%s not used lately from %s (%s), keeping it under %g GB ($UNET_PL_CACHE_GB)",
                 len(removed), "s" * (len(removed) != 1), cache_dir, ", ".join(p.name for p in removed), limit / 2**30)
    return removed


def native_image(arrays: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Image ``k`` of a native cache: (uint8 (H, W, 3), uint16 labels (H, W)), views, no copies."""
    h, w = (int(v) for v in arrays["shapes"][k])
    a, b = arrays["offsets"][k], arrays["offsets"][k + 1]
    return arrays["images"][a:b].reshape(h, w, 3), arrays["labels"][a:b].reshape(h, w)


def cache_bytes(resolution: str, size: int, shapes: Sequence[tuple[int, int]]) -> int:
    """About how many bytes a cache of these images takes on disk (uncompressed ``.npz``)."""
    if resolution == "native":
        return int(sum(h * w for h, w in shapes)) * 5 + 64 * len(shapes) + (1 << 20)  # RGB + uint16 labels
    return len(shapes) * size * size * 6 + 64 * len(shapes) + (1 << 20)  # RGB + mask + uint16 labels


def check_cache_dir(cache_dir: Path, needed: int) -> None:
    """``ValueError`` naming the folder and the fix when ``cache_dir`` is not a writable folder with ``needed`` bytes free."""
    fix = "pass cache_dir (--cache-dir) a writable folder on a disk with room"
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ValueError(f"cache folder {cache_dir} is a file, not a folder; {fix}")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_probe(cache_dir)
    except OSError as e:
        raise ValueError(f"cannot write into the cache folder {cache_dir} ({e.strerror or e}); {fix}") from None
    free = shutil.disk_usage(cache_dir).free
    if free < needed:
        raise ValueError(f"the decoded cache needs about {_mb(needed)} in {cache_dir} but only {_mb(free)} are free; "
                         f"free some space or {fix}")


def _write_probe(folder: Path) -> None:
    """Create and remove a file in ``folder``: unlike ``os.access``, this sees read-only mounts and ACLs."""
    with tempfile.TemporaryFile(dir=folder):
        pass


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 10 << 20 else f"{n / 2**20:,.0f} MB"


@contextlib.contextmanager
def building(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` (an exclusive ``flock``; waits while another process holds it) and, once
    held, remove the temporary files a killed writer of ``path`` left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, one decoding per run as before
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process is decoding %s; waiting for it", path)
                fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            for stale in path.parent.glob(path.name + ".*.tmp"):
                log.info("removing %s, left by a run that was killed while writing the cache", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            # Removed so the cache folder holds caches only. A run that opened the old lock file and
            # waits on it then builds beside one that opens a new one: at worst a second decoding of
            # the same images, each written atomically, never a broken cache.
            lock_path.unlink(missing_ok=True)
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)
