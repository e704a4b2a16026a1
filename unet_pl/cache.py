"""The decoded-data caches: one ``.npz`` per (file list, size, mask source, version), written atomically.

``fingerprint`` names a cache by everything it depends on (the files' sizes and mtimes,
``img_size``, the mask source, ``empty_masks`` and ``CACHE_VERSION``); ``build_cache`` decodes
the competition's folders into one; ``write_npz_atomically`` / ``load_npz`` are shared with the
native-resolution cache (``unet_pl.native_data``).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .images import TrainItem, decode_sample

#: Bump when the cache's content changes meaning: every cache is rebuilt.
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/unet_pl``, or ``~/.cache/unet_pl``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet_pl"


def fingerprint(train_dir: Path, items: Sequence[TrainItem], csv_path: Path | None, img_size: int | str, empty_masks: str) -> str:
    """The cache's name: a hash of its inputs (``img_size`` is "native" for the full-size cache)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, img_size, empty_masks, "csv" if csv_path else "masks"]).encode())
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


def build_cache(items: Sequence[TrainItem], img_size: int, path: Path, rles: dict | None = None, csv_path: Path | None = None,
                workers: int = 2, progress: bool = True) -> None:
    """Decode ``items`` in ``workers`` threads and write ``path`` (.npz) atomically (temp file + ``os.replace``).

    Arrays: ``images`` uint8 (N, S, S, 3), ``masks`` uint8 (N, S, S) in {0, 1}, ``labels`` uint16
    (N, S, S), ``sizes`` int64 (N, 2) original (H, W), ``ids`` str (N,). With ``rles`` (from the
    labels CSV) masks come from the runs, else from each item's mask files.
    """
    n, s = len(items), img_size
    arrays = {
        "images": np.zeros((n, s, s, 3), np.uint8), "masks": np.zeros((n, s, s), np.uint8),
        "labels": np.zeros((n, s, s), np.uint16), "sizes": np.zeros((n, 2), np.int64),
        "ids": np.array([it.id for it in items]),
    }
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = [
            pool.submit(decode_sample, it.image, None if rles is not None else list(it.masks),
                        None if rles is None else rles.get(it.id, []), s, csv_path)
            for it in items
        ]
        try:
            for k, fut in enumerate(tqdm(futures, desc=f"decoding {n} images at {s}px", unit="img", disable=not progress)):
                out = fut.result()
                for key, dst in (("image", "images"), ("mask", "masks"), ("labels", "labels"), ("size", "sizes")):
                    arrays[dst][k] = out[key]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # fail fast: the first bad file is the message
            raise
    write_npz_atomically(path, arrays)


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to a temp file beside ``path``, then ``os.replace``: never a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache_dir from other users
        os.replace(tmp, path)  # atomic: readers see the old state or the whole new file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path, keys: Sequence[str], what: str = "unet_pl cache") -> dict[str, np.ndarray]:
    """Every array of ``path`` in memory; ``ValueError`` when one of ``keys`` is missing."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = set(keys) - set(arrays)
    if missing:
        raise ValueError(f"{path} is not a {what} (no {', '.join(sorted(missing))})")
    return arrays


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """The arrays ``build_cache`` wrote, in memory. ``ValueError`` if the file is not such a cache."""
    return load_npz(path, ("images", "masks", "labels", "sizes", "ids"))
