"""A folder of images -> the submission CSV, label PNGs and overlays: a loop over ``predict_images``.

The folder is listed once (``list_images``: the competition's ``<id>/images/<id>.png`` layout or
plain image files), each image decoded once (a few threads ahead of the network), its
probabilities and nuclei made by ``unet_pl.inference.predict`` with the network's ``Settings``.
Each nucleus is one CSV row ``ImageId,EncodedPixels``; an image without nuclei gets one row
with empty ``EncodedPixels``.
"""
from __future__ import annotations

import csv
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.images import list_images, read_image
from ..perf import keep_freed_memory, release_freed_memory
from ..rle import encode_labels
from .predict import labels_from_probabilities, predict_images
from .settings import Settings

log = logging.getLogger(__name__)


def choose_device(gpus: int | None = None) -> torch.device:
    """``gpus=0``: the CPU; ``None``: CUDA when available; ``>= 1``: CUDA, which must exist."""
    if gpus == 0:
        return torch.device("cpu")
    if gpus is not None and gpus > 1:
        raise ValueError(f"--gpus {gpus}: prediction runs on one GPU; use --gpus 1 (or split the folder across processes)")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if gpus is None:
        return torch.device("cpu")
    raise ValueError(f"--gpus {gpus} asks for a GPU but torch sees none (torch {torch.__version__}); use --gpus 0 for the CPU")


def select_images(data_dir: str | Path, ids: Sequence[str] | None = None) -> list[tuple[str, Path]]:
    """``(id, path)`` of the folder's images (``list_images``), only ``ids`` when given (all must be there)."""
    entries = list_images(data_dir)
    if ids is None:
        return entries
    wanted = set(ids)
    entries = [(i, p) for i, p in entries if i in wanted]
    if len(entries) != len(wanted):
        missing = sorted(wanted - {i for i, _ in entries})
        raise FileNotFoundError(f"{data_dir}: {len(missing)} of the {len(wanted)} requested images are not there "
                                f"(first: {missing[0]}); pass the stage1_train folder the hold-out was drawn from")
    return entries


def read_ahead(paths: Sequence[Path], workers: int = 2, ahead: int = 16, channel: int | None = None,
               intensity: str = "fixed") -> Iterator[np.ndarray]:
    """``read_image(path, channel, intensity)`` of each path in order, decoded by ``workers`` threads
    at most ``ahead`` images in advance."""
    if workers < 1:
        yield from (read_image(p, channel, intensity) for p in paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for p in paths:
                pending.append(pool.submit(read_image, p, channel, intensity))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def submission_rows(image_id: str, labels: np.ndarray) -> list[tuple[str, str]]:
    """``(ImageId, EncodedPixels)`` per nucleus; one row with ``""`` when there is none."""
    rles = encode_labels(labels)
    return [(image_id, r) for r in rles] or [(image_id, "")]


def save_label_png(labels: np.ndarray, path: str | Path) -> None:
    """The label image as a 16-bit PNG (0 background, nucleus k = value k)."""
    from PIL import Image

    if labels.max(initial=0) > 65535:
        raise ValueError(f"{path}: {labels.max()} nuclei do not fit a 16-bit PNG")
    Image.fromarray(labels.astype(np.uint16)).save(path)


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str | Path, color=(255, 255, 0)) -> None:
    """``image`` uint8 ``(H, W, 3)`` with the outline of every predicted nucleus drawn in ``color``."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = color
    Image.fromarray(out).save(path)


def predict_folder(net: nn.Module, data_dir: str | Path, out_csv: str | Path, *, settings: Settings | None = None,
                   ids: Sequence[str] | None = None, batch_size: int = 8, num_workers: int = 2,
                   masks_dir: str | Path | None = None, overlays_dir: str | Path | None = None,
                   progress: bool = True, keep_memory: bool | None = None) -> dict:
    """Predict every image of ``data_dir`` (only ``ids`` when given) and write the submission CSV
    (and label PNGs / overlays if asked).

    ``settings``: default ``net.settings`` (see ``unet_pl.inference.predict.settings_of``).
    ``num_workers``: threads decoding images ahead of the network. ``keep_memory``: keep freed
    memory for reuse while predicting (``unet_pl.perf``; None: on the CPU), released at the end.
    Returns ``{"images": n, "nuclei": n, "empty": n}``.
    """
    from tqdm.auto import tqdm

    from .predict import settings_of

    settings = settings_of(net, settings)
    entries = select_images(data_dir, ids)
    out_csv = Path(out_csv)
    for d in (masks_dir, overlays_dir, out_csv.parent):
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
    cpu = next(net.parameters()).device.type == "cpu"
    if (cpu if keep_memory is None else keep_memory) and keep_freed_memory():
        log.info("keeping freed memory for reuse while predicting (unet_pl.perf)")
    held: deque = deque()  # the decoded images whose probabilities are still in the network

    def images() -> Iterator[np.ndarray]:
        for image in read_ahead([p for _, p in entries], num_workers, channel=settings.channel, intensity=settings.intensity):
            held.append(image)
            yield image

    stats = {"images": 0, "nuclei": 0, "empty": 0}
    results = predict_images(net, images(), settings.decoded(), batch_size)
    bar = tqdm(zip(entries, results), total=len(entries), unit="img", desc="predict", disable=not progress)
    try:
        with open(out_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "EncodedPixels"])
            for (image_id, _), prob in bar:
                image = held.popleft()
                labels = labels_from_probabilities(prob, settings)
                writer.writerows(submission_rows(image_id, labels))
                n = int(labels.max(initial=0))
                stats["images"] += 1
                stats["nuclei"] += n
                stats["empty"] += n == 0
                if masks_dir:
                    save_label_png(labels, Path(masks_dir) / f"{image_id}.png")
                if overlays_dir:
                    save_overlay(image, labels, Path(overlays_dir) / f"{image_id}.png")
    finally:
        bar.close()
        results.close()  # the generators and the read-ahead threads, also after an error
        release_freed_memory()
    log.info("wrote %s: %d images, %d nuclei", out_csv, stats["images"], stats["nuclei"])
    return stats
