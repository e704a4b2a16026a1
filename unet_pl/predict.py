"""Probabilities -> nuclei -> the submission CSV, label PNGs and overlays.

The notebook's last cells, as small named helpers: the model sees each image resized to the
square side it was trained at; its probabilities are resized back to the image's original
size (``skimage.transform.resize``, as the notebook does), thresholded, and split into nuclei
by connected components (8-connected, ``skimage.measure.label``). Each nucleus is one CSV row
``ImageId,EncodedPixels``; an image without nuclei gets one row with empty ``EncodedPixels``.

Beyond the notebook (each off unless asked for, or unless the checkpoint was trained so):
a checkpoint with ``hparams.resolution == "native"`` sees every image whole at its own size
(``unet_pl.tiling``); one with the ``mask+boundary`` head is split into nuclei by a watershed
(``unet_pl.postprocess``); ``tta`` averages flipped and rotated views (``unet_pl.tta``);
``holes`` fills holes and ``min_size`` drops specks.
"""
from __future__ import annotations

import csv
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .data import ImageFolderDataset
from .images import list_images, read_image
from .lit import LitUNet
from .perf import keep_freed_memory, release_freed_memory
from .postprocess import SEED_THRESHOLDS, probabilities_to_labels
from .rle import encode_labels
from .tiling import predict_whole
from .tta import tta_predict

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


def load_model(ckpt: str | Path | None = None, keras_h5: str | Path | None = None,
               img_size: int | None = None, device: torch.device | str = "cpu") -> LitUNet:
    """A ``LitUNet`` in eval mode on ``device``, from a Lightning checkpoint or a Keras ``.h5``.

    ``img_size`` overrides the checkpoint's ``hparams.img_size``; for a Keras model it defaults
    to the notebook's 128.
    """
    if (ckpt is None) == (keras_h5 is None):
        raise ValueError("give exactly one of a checkpoint (--ckpt) or a Keras .h5 (--keras-h5)")
    path = Path(ckpt if ckpt is not None else keras_h5)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a run's best.ckpt or last.ckpt" if ckpt is not None
                                else f"{path}: no such file; pass the notebook's saved model (model-dsbowl2018-1.h5)")
    if ckpt is not None:
        try:
            model = LitUNet.load_from_checkpoint(path, map_location=device)
        except (KeyError, RuntimeError, EOFError, OSError, TypeError, pickle.UnpicklingError) as e:  # torch.load's and Lightning's errors
            raise ValueError(f"{path}: not a LitUNet checkpoint ({type(e).__name__}: {e})") from e
        if img_size is not None:
            model.hparams.img_size = int(img_size)
    else:
        from .keras_import import load_keras_weights  # needs h5py; only this path does

        model = LitUNet(img_size=int(img_size or 128))
        load_keras_weights(model.unet, path)
    return model.to(device).eval()


def model_probabilities(model: LitUNet, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Sigmoid outputs ``(N, C, H, W)`` float32 of ``model`` for prepared images ``x``, averaged over ``tta``'s views."""
    return tta_predict(lambda v: torch.sigmoid(model(model.prepare_images(v)).float()), x, tta)


@torch.inference_mode()
def predict_probabilities(model: LitUNet, loader: DataLoader, device: torch.device, progress: bool = True,
                          tta: str = "none") -> Iterator[tuple[str, np.ndarray, tuple[int, int]]]:
    """Yields ``(id, prob float32 (C, S, S) in [0, 1], (H, W))`` per image, batch by batch."""
    from tqdm.auto import tqdm

    if torch.device(device).type == "cpu":
        keep_freed_memory()  # no page faults per batch (unet_pl.perf); released when done
    bar = tqdm(total=len(loader.dataset), unit="img", desc="predict", disable=not progress)
    try:
        for batch in loader:
            x = model.prepare_images(batch["image"].to(device, non_blocking=True))
            prob = model_probabilities(model, x, tta).cpu().numpy()
            for image_id, p, size in zip(batch["id"], prob, batch["size"].tolist(), strict=True):
                yield image_id, p, (int(size[0]), int(size[1]))
            bar.update(len(prob))
    finally:
        bar.close()
        release_freed_memory()


@torch.inference_mode()
def predict_native(model: LitUNet, paths: list[tuple[str, Path]], device: torch.device, progress: bool = True,
                   tta: str = "none", tile: int = 1024) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields ``(id, prob float32 (C, H, W) in [0, 1], image uint8 (H, W, 3))`` per image: each image
    whole at its own size (padded to a multiple of 16; tiled when a side exceeds ``tile``)."""
    from tqdm.auto import tqdm

    if torch.device(device).type == "cpu":
        keep_freed_memory()  # no page faults per image (unet_pl.perf); released when done
    try:
        for image_id, path in tqdm(paths, unit="img", desc="predict", disable=not progress):
            image = read_image(path)
            x = model.prepare_images(torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(device))
            prob = predict_whole(lambda v: model_probabilities(model, v, tta), x, tile=tile)
            yield image_id, prob[0].cpu().numpy(), image
    finally:
        release_freed_memory()


def resize_back(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probabilities ``(S, S)`` -> ``(H, W)`` (or ``(C, S, S)`` -> ``(C, H, W)``), as the notebook does it."""
    from skimage.transform import resize

    prob = np.asarray(prob)
    if prob.ndim == 3 and prob.shape[0] > 1:
        return np.stack([resize_back(p, size) for p in prob])
    # anti_aliasing=False: the 2018 skimage the notebook ran never blurred (matters below S only).
    return resize(np.squeeze(prob), size, mode="constant", preserve_range=True, anti_aliasing=False)


def to_labels(prob: np.ndarray, threshold: float = 0.5, min_size: int = 0, *, split: str | None = None,
              seed_threshold: float = 0.5, holes: bool = False) -> np.ndarray:
    """Nuclei of probabilities ``(H, W)`` or ``(C, H, W)``: int32 ``(H, W)``, 0 background, 1..k.

    One channel: 8-connected components of ``prob > threshold`` (the notebook); with a boundary
    channel a watershed splits touching nuclei (``split`` chooses, see
    ``unet_pl.postprocess.probabilities_to_labels``). Then ``holes`` fills holes and nuclei
    under ``min_size`` pixels are dropped, the rest renumbered 1..k.
    """
    return probabilities_to_labels(prob, threshold, split=split, seed_threshold=seed_threshold,
                                   min_size=min_size, holes=holes)


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


def predict_folder(model: LitUNet, data_dir: str | Path, out_csv: str | Path, *, device: torch.device,
                   threshold: float = 0.5, min_size: int = 0, batch_size: int = 8, num_workers: int = 2,
                   masks_dir: str | Path | None = None, overlays_dir: str | Path | None = None,
                   progress: bool = True, tta: str = "none", holes: bool = False, split: str | None = None,
                   seed_threshold: float | None = None, tile: int = 1024, ids: list[str] | None = None) -> dict:
    """Predict every image of ``data_dir`` (only ``ids`` when given) and write the submission CSV
    (and PNGs if asked). ``num_workers``: threads decoding the images up front (resized models).
    ``tta``, ``holes``, ``split``, ``seed_threshold`` (None: ``SEED_THRESHOLDS`` of the checkpoint's
    resolution): see the module docstring; ``tile``: the
    largest side a native-resolution model sees whole.

    Returns ``{"images": n, "nuclei": n, "empty": n}``.
    """
    resolution = model.hparams.get("resolution", "resize")
    if seed_threshold is None:
        seed_threshold = SEED_THRESHOLDS[resolution]
    entries = list_images(data_dir)
    if ids is not None:
        wanted = set(ids)
        entries = [(i, p) for i, p in entries if i in wanted]
        if len(entries) != len(wanted):
            missing = sorted(wanted - {i for i, _ in entries})
            raise FileNotFoundError(f"{data_dir}: {len(missing)} of the {len(wanted)} requested images are not there "
                                    f"(first: {missing[0]}); pass the stage1_train folder the hold-out was drawn from")
    paths = dict(entries)
    if resolution == "native":
        results = predict_native(model, entries, device, progress, tta, tile)
    else:
        dataset = ImageFolderDataset(data_dir, int(model.hparams.img_size), workers=max(1, num_workers), progress=progress, ids=ids)
        # The dataset holds decoded, resized images already: no worker processes needed.
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
        results = ((i, resize_back(p, size), None) for i, p, size in
                   predict_probabilities(model, loader, device, progress, tta))
    for d in (masks_dir, overlays_dir):
        if d:
            Path(d).mkdir(parents=True, exist_ok=True)
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    stats = {"images": 0, "nuclei": 0, "empty": 0}
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "EncodedPixels"])
        for image_id, prob, image in results:  # image: the decoded image where at hand (native), else None
            labels = to_labels(prob, threshold, min_size, split=split, seed_threshold=seed_threshold, holes=holes)
            writer.writerows(submission_rows(image_id, labels))
            n = int(labels.max())
            stats["images"] += 1
            stats["nuclei"] += n
            stats["empty"] += n == 0
            if masks_dir:
                save_label_png(labels, Path(masks_dir) / f"{image_id}.png")
            if overlays_dir:
                save_overlay(image if image is not None else read_image(paths[image_id]), labels,
                             Path(overlays_dir) / f"{image_id}.png")
    log.info("wrote %s: %d images, %d nuclei", out_csv, stats["images"], stats["nuclei"])
    return stats
