"""A folder of images -> predict.py's outputs (``unet_pl.inference.outputs``): a loop over ``predict_images``.

The folder is listed once (``list_images``: one file, the competition's ``<id>/images/<id>.png``
layout or plain image files), each image decoded once (a few threads ahead of the network), its
probabilities and nuclei made by ``unet_pl.inference.predict`` with the network's ``Settings``.
Each nucleus is one CSV row ``ImageId,EncodedPixels``; an image without nuclei gets one row
with empty ``EncodedPixels``. Nothing is written until every image is done (``Outputs``).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..data.images import list_images
from ..data.readers import DamagedFile, is_colour, pixel_size, read_levels, read_raw, reset_dark_warnings
from ..perf import is_compiled, keep_freed_memory, release_freed_memory
from .outputs import Outputs, intensity_image, overlay_image
from .predict import labels_from_probabilities, predict_scaled
from .scale import largest_factor
from .settings import Settings

log = logging.getLogger(__name__)


class Done(NamedTuple):
    """One image predicted and written: what the closing lines count."""
    image_id: str
    nuclei: int
    squashed: bool  # shrunk more than SQUASH_WARNING-fold into a resize-mode model's square
    scale: float | None  # the factor the network saw it at (native models)
    inverted: bool | None  # the grey rule inverted it (None: a rule that never inverts)
    colour: bool  # an inverted colour image (stained tissue, where inverting is the point)


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


#: A resized model squashing an image by more than this in a side loses its small nuclei.
SQUASH_WARNING = 4.0
#: How many of the images the model is least sure of the closing line names (predict.py). On the grouped
#: validation the lowest quarter by summary.csv's probability_mean scored 0.19 against 0.59 for the rest.
LEAST_SURE = 3
#: When this many images in a row from the first cannot be read, the run stops (see predict_folder).
UNREADABLE_FIRST = 3


def least_sure(sureness: dict[str, float | None], most: int = LEAST_SURE) -> list[tuple[str, float | None]]:
    """The lowest quarter (rounded down) of the images by ``sureness`` (image -> probability_mean;
    None: no nucleus found, the least sure of all, named even beyond the lowest quarter), at most
    ``most``, least sure first, as ``(image, probability_mean)``; ties keep the images' order."""
    ranked = sorted(sureness.items(), key=lambda kv: -1.0 if kv[1] is None else kv[1])
    empty = sum(p is None for _, p in ranked)
    return ranked[:min(most, max(empty, len(ranked) // 4))]


def read_pair(path: Path, settings: Settings) -> tuple[np.ndarray, np.ndarray, bool | None]:
    """(the file's pixels ``read_raw``, the network's uint8 RGB ``to_rgb8``, whether the grey rule inverted it)
    of one image, read with ``settings``' channel, intensity rule and background."""
    raw = read_raw(path, settings.channel)
    return raw, *read_levels(raw, settings.intensity, path, background=settings.background)


def read_pair_or_error(path: Path, settings: Settings) -> tuple[np.ndarray, np.ndarray, bool | None] | ValueError:
    """``read_pair``, or the ValueError that names the file and why it cannot be read."""
    try:
        return read_pair(path, settings)
    except ValueError as e:
        return e


def read_ahead(paths: Sequence[Path], settings: Settings, workers: int = 2,
               ahead: int = 16) -> Iterator[tuple[np.ndarray, np.ndarray, bool | None] | ValueError]:
    """``read_pair_or_error`` of each path in order, decoded by ``workers`` threads at most ``ahead``
    images in advance."""
    if workers < 1:
        yield from (read_pair_or_error(p, settings) for p in paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for p in paths:
                pending.append(pool.submit(read_pair_or_error, p, settings))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def predict_folder(net: nn.Module, data_dir: str | Path, out_csv: str | Path, *, settings: Settings | None = None,
                   ids: Sequence[str] | None = None, batch_size: int = 8, num_workers: int = 2,
                   out_dir: str | Path | None = None, rois: bool = False, probabilities: bool = False,
                   overlays: bool = False, masks_dir: str | Path | None = None, overlays_dir: str | Path | None = None,
                   progress: bool = True, keep_memory: bool | None = None, at_once: int | None = None) -> dict:
    """Predict every image of ``data_dir`` (an image file or a folder; only ``ids`` when given) and
    write the submission CSV ``out_csv`` and, with ``out_dir``, the label TIFFs, tables and the
    optional ROIs, probability maps and overlays (``unet_pl.inference.outputs``); ``masks_dir`` and
    ``overlays_dir``: the older 16-bit label PNGs and overlays. Written only once every image is done.

    ``settings``: default ``net.settings`` (see ``unet_pl.inference.predict.settings_of``).
    ``num_workers``: threads decoding images ahead of the network. ``keep_memory``: keep freed
    memory for reuse while predicting (``unet_pl.perf``; None: on the CPU), released at the end.
    ``at_once``: images in progress at once, each on its own thread from the network to its written
    outputs, torch's threads shared out among them (None: 2 on a CPU where torch has 2 threads or
    more and the network is not ``torch.compile``'d, else 1; 1 keeps the peak memory of one image).
    Two images on one thread each keep both cores busy while one of them is post-processed and
    written, where one image on two threads leaves a core idle then. Labels and tables are the same
    either way, probabilities the same to rounding (one thread sums in another order than two).
    An image tiled for its size (a side above ``settings.tile`` once scaled), or the only image,
    runs alone on all threads.
    An image that cannot be read is skipped with a warning (the run goes on and writes the others'
    results); when the first UNREADABLE_FIRST images (or all of them, if fewer) cannot be read, the
    first one's ValueError ends the run: a setting (``channel``) that fits none of them, most likely.
    Returns ``{"images", "nuclei", "empty", "squashed": [ids shrunk more than SQUASH_WARNING-fold], "written": [paths],
    "scales": {id: the factor the network saw it at (``settings.scale``'s choice; native models only)},
    "inverted": {id: whether the grey rule inverted it (its background read as bright), of the images that are not
    colour (grey or one channel: where a crowded fluorescence field can be misread; grey rules only)},
    "unreadable": {id: why, of the images skipped},
    "earlier": files in out_dir's per-image folders from earlier runs, for images not in this one,
    "sureness": {id: summary.csv's probability_mean, None without nuclei} (with out_dir only, else empty),
    "least_sure": ``least_sure(sureness)``}``.
    """
    from tqdm.auto import tqdm

    from .predict import settings_of

    settings = settings_of(net, settings)
    entries = select_images(data_dir, ids)
    paths = dict(entries)
    reset_dark_warnings()  # this run names its own first dark files
    outputs = Outputs(out_csv, out_dir, rois=rois, probabilities=probabilities, overlays=overlays,
                      masks_dir=masks_dir, overlays_dir=overlays_dir)
    cpu = next(net.parameters()).device.type == "cpu"
    if (cpu if keep_memory is None else keep_memory) and keep_freed_memory():
        log.info("keeping freed memory for reuse while predicting (unet_pl.perf)")
    threads = torch.get_num_threads()
    if at_once is None:  # a GPU runs one forward pass at a time anyway; compiled code is not run from two threads
        at_once = 2 if cpu and threads >= 2 and not is_compiled(net) else 1
    workers = max(1, at_once)
    # resize mode: the network takes batches of small squares; native: one image at a time
    chunk = batch_size if settings.resolution == "resize" else 1

    def predict_chunk(items: list[tuple[str, np.ndarray, np.ndarray, bool | None]], n_threads: int) -> list[Done]:
        """Nuclei and outputs of a few images ``(id, pixels, network's image, inverted)`` on this thread with
        ``n_threads`` torch threads."""
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        done = []
        probs = predict_scaled(net, (image for _, _, image, _ in items), settings.decoded(), batch_size)
        for (image_id, raw, image, inverted), (prob, factor) in zip(items, probs, strict=True):
            labels = labels_from_probabilities(prob, settings)
            shown = overlay_image(raw, image) if outputs.draws_overlays else image  # the file as it looks, not as the network reads it
            outputs.add(image_id, shown, intensity_image(raw), labels, prob,
                        pixel_size=pixel_size(paths[image_id]) if outputs.out_dir is not None else None, scale=factor,
                        inverted=inverted)
            squashed = settings.resolution == "resize" and max(image.shape[:2]) > SQUASH_WARNING * settings.img_size
            colour = bool(inverted) and raw.shape[2] == 3 and is_colour(raw[::4, ::4])  # asked of inverted images only
            done.append(Done(image_id, int(labels.max(initial=0)), squashed, factor, inverted, colour))
        return done

    def chunks() -> Iterator[list[tuple[str, np.ndarray, np.ndarray, bool | None]]]:
        items: list = []
        read_any = False
        held: list[str] = []  # skips before the first image read: said once one is read (else the error says it)
        # decoded a little ahead of the network, not far: each one waiting is memory (20 MB at 2048 x 2048)
        pairs = read_ahead([p for _, p in entries], settings, num_workers, ahead=chunk + 2)
        try:
            for (image_id, _), pair in zip(entries, pairs):
                if isinstance(pair, ValueError):
                    # a damaged file is skipped wherever it is; a setting that fits none of the first
                    # images (--channel, most likely) stops the run at the third
                    blocked = not read_any and not isinstance(pair, DamagedFile)
                    if blocked and len(stats["unreadable"]) + 1 >= min(UNREADABLE_FIRST, len(entries)):
                        if stats["unreadable"]:  # the images before it failed too: a setting that fits none of them?
                            raise ValueError(f"{next(iter(stats['unreadable'].values()))} (and the next "
                                             f"{len(stats['unreadable'])} images could not be read either)") from None
                        raise pair
                    (log.warning if read_any else held.append)(f"{pair}; skipped: it gets no results in this run")
                    stats["unreadable"][image_id] = str(pair)
                    bar.update(1)
                    continue
                for message in held:
                    log.warning("%s", message)
                held.clear()
                read_any = True
                raw, image, inverted = pair
                items.append((image_id, raw, image, inverted))
                if len(items) == chunk:
                    yield items
                    items = []
            if items:
                yield items
            if not read_any and stats["unreadable"]:  # every image was damaged: nothing to write
                raise ValueError(f"{next(iter(stats['unreadable'].values()))}" + (
                    f" (and the other {len(stats['unreadable']) - 1} images could not be read either)"
                    if len(stats["unreadable"]) > 1 else ""))
        finally:
            pairs.close()

    stats = {"images": 0, "nuclei": 0, "empty": 0, "squashed": [], "outputs": outputs.folders(), "unreadable": {},
             "scales": {}, "inverted": {}}
    bar = tqdm(total=len(entries), unit="img", desc="predict", disable=not progress)

    def collect(done: list[Done]) -> None:
        for image_id, n, squashed, factor, inverted, colour in done:
            stats["images"] += 1
            if factor is not None:
                stats["scales"][image_id] = factor
            if inverted is not None and not colour:
                stats["inverted"][image_id] = inverted
            stats["nuclei"] += n
            stats["empty"] += n == 0
            if squashed:
                stats["squashed"].append(image_id)
        bar.update(len(done))

    pending: deque = deque()  # chunks in progress, in order
    pool = ThreadPoolExecutor(workers, thread_name_prefix="unet_pl-predict")
    factor = largest_factor(settings.scale)  # the largest the network may see them
    try:
        for items in chunks():
            image = items[0][2]
            # A tiled image needs its memory to itself (at the size the network sees it); the only
            # image (or batch) gets every thread.
            alone = len(entries) <= chunk or (settings.resolution == "native" and max(image.shape[:2]) * factor > settings.tile)
            failed = next((f for f in pending if f.done() and f.exception() is not None), None)
            if failed is not None:  # a later image failed while an earlier one runs: stop now
                failed.result()
            if alone:
                while pending:
                    collect(pending.popleft().result())
            pending.append(pool.submit(predict_chunk, items, threads if alone else max(1, threads // workers)))
            while len(pending) > (0 if alone else workers) or (pending and pending[0].done()):
                collect(pending.popleft().result())
        while pending:
            collect(pending.popleft().result())
        stats["written"] = outputs.commit(order=[i for i, _ in entries])
        stats["earlier"] = outputs.earlier
        stats["sureness"] = {i: outputs.sureness[i] for i, _ in entries if i in outputs.sureness}  # the folder's order
        stats["least_sure"] = least_sure(stats["sureness"])
    except BaseException:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)  # the chunks running finish: nothing writes while outputs are removed
        outputs.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        torch.set_num_threads(threads)  # also the count that threads started later begin with
        release_freed_memory()
    log.info("wrote %s: %d images, %d nuclei", out_csv, stats["images"], stats["nuclei"])
    return stats
