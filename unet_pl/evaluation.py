"""Scoring a submission against the truth with the 2018 Data Science Bowl's metric.

The truth (``TRUTH_LAYOUTS``) is a solution CSV (``ImageId,EncodedPixels,Height,Width[,Usage]``),
a ``stage1_train_labels.csv`` (``ImageId,EncodedPixels``) with the image folders
(``<id>/images/<id>.png``) beside it, or a training folder read as training reads it
(``unet_pl.data.images``): the competition's ``stage1_train`` layout (``<id>/masks/``, one file per
nucleus; or the folder holding ``stage1_train``), or ``images/`` with ``masks/`` (or ``labels/``)
label images of the same names. A binary mask where a label image is expected gets a warning:
touching nuclei in it are scored as one. ``scripts/evaluate.py`` prints what ``evaluate`` returns.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .data.images import decode_masks, image_size, resolve_train_dir, scan_train_dir, warn_if_binary
from .data.readers import IMAGE_SUFFIXES, VENDOR_SUFFIXES
from .metrics import THRESHOLDS, dsb_image_score
from .rle import decode_labels

#: A way to build one image's true label image: called only when that image is scored.
TruthLoader = Callable[[], np.ndarray]
#: What the truth can be, for the messages.
TRUTH_LAYOUTS = ("a run-length CSV (a solution CSV with Height,Width, or stage1_train_labels.csv beside its image "
                 "folders) or a folder of annotations: the competition's stage1_train (<id>/masks/, one file per "
                 "nucleus), or images/ with masks/ (or labels/) label images of the same names")


def read_rle_csv(path: Path) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]], list[str]]:
    """``({id: [rle, ...]}, {id: (H, W)} where the CSV says, column names)``; 'Ignored' rows dropped."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = reader.fieldnames or []
            if "ImageId" not in cols or "EncodedPixels" not in cols:
                raise ValueError(f"{path}: expected columns ImageId,EncodedPixels, found {','.join(cols) or 'none'}")
            sized = "Height" in cols and "Width" in cols
            rles: dict[str, list[str]] = {}
            sizes: dict[str, tuple[int, int]] = {}
            for row in reader:
                if row.get("Usage") == "Ignored":  # the stage-2 solution's unscored images
                    continue
                rles.setdefault(row["ImageId"], []).append(row["EncodedPixels"] or "")
                if sized:
                    sizes[row["ImageId"]] = (int(row["Height"]), int(row["Width"]))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text CSV (undecodable bytes); expected ImageId,EncodedPixels rows") from None
    return rles, sizes, cols


def _image_folder_for(csv_path: Path, ids: list[str]) -> Path:
    """The folder beside a labels CSV that holds ``<id>/images/<id>.png`` for its images."""
    stem = csv_path.stem.removesuffix("_labels")
    candidates = [csv_path.parent / stem, csv_path.parent] + sorted(p for p in csv_path.parent.iterdir() if p.is_dir())
    probe = ids[0]
    for c in candidates:
        if (c / probe / "images" / f"{probe}.png").is_file():
            return c
    raise FileNotFoundError(
        f"{csv_path}: the CSV has no Height,Width columns and no image folders (<id>/images/<id>.png) beside it "
        f"to read sizes from (looked in {', '.join(str(c) for c in candidates[:3])}...)"
    )


def _truth_csv(truth: Path) -> Path:
    """``truth`` when it may be a CSV; an image, a vendor file or nothing there is an error saying what the truth takes."""
    if not truth.exists():
        raise FileNotFoundError(f"{truth}: no such file or folder; --truth (truth= in Python) takes {TRUTH_LAYOUTS}")
    if truth.suffix.lower() in IMAGE_SUFFIXES + VENDOR_SUFFIXES:
        raise ValueError(f"{truth}: an image, not a truth; --truth (truth= in Python) takes {TRUTH_LAYOUTS}")
    return truth


def load_truth(truth: str | Path) -> dict[str, tuple[TruthLoader, tuple[int, int] | None]]:
    """``{id: (loader of the int32 label image, (H, W) if known without loading)}``."""
    truth = Path(truth)
    if truth.is_dir():
        # the data module's own reading: a parent of stage1_train, RGBA or {0,1} masks and stray
        # files (._x.png, .DS_Store) are handled as in training
        items = scan_train_dir(resolve_train_dir(truth))
        warn_if_binary(items, "they are scored as one nucleus")
        return {it.id: (lambda it=it: decode_masks(image_size(it.image), list(it.masks)).astype(np.int32), None)
                for it in items}
    rles, sizes, _ = read_rle_csv(_truth_csv(truth))
    if not rles:
        raise ValueError(f"{truth}: no rows")
    if not sizes:
        folder = _image_folder_for(truth, list(rles))
        sizes = {i: image_size(folder / i / "images" / f"{i}.png") for i in rles}
    out = {}
    for image_id, rows in rles.items():
        shape = sizes[image_id]
        # Truth nuclei may touch or, in a few hand-drawn masks, overlap: later rows win there.
        out[image_id] = (lambda rows=rows, shape=shape: decode_labels(rows, shape, allow_overlap=True), shape)
    return out


def holdout_truth_ids(truth: str | Path, holdout: str) -> list[str]:
    """The hold-out ids (``unet_pl.data.holdout``) of the images a truth folder or labels CSV describes."""
    from .data.holdout import holdout_ids

    truth = Path(truth)
    if truth.is_dir():
        return holdout_ids(truth, holdout)
    rles, _, _ = read_rle_csv(_truth_csv(truth))
    return holdout_ids(_image_folder_for(truth, list(rles)), holdout)


def evaluate(pred_csv: str | Path, truth: str | Path, ids: list[str] | None = None, only_present: bool = False
             ) -> tuple[list[dict], list[str], list[str], list[str]]:
    """Scores every truth image (only ``ids`` when given): ``(per-image rows, missing ids, extra ids,
    outside ids)``: truth images without prediction rows (scored as empty predictions), predicted
    images not in the truth, and predicted images of the truth that are not among ``ids``. ``ids``
    the truth lacks are an error, or with ``only_present`` left out (a subset of the folder)."""
    preds, _, _ = read_rle_csv(Path(pred_csv))
    truths = load_truth(truth)
    every = set(truths)
    if ids is not None:
        unknown = sorted(set(ids) - set(truths))
        if only_present:
            ids = [i for i in ids if i in every]
        elif unknown:
            raise ValueError(f"{truth}: {len(unknown)} hold-out images are not in the truth (first: {unknown[0]})")
        truths = {i: truths[i] for i in sorted(ids)}
    missing = [i for i in truths if i not in preds]
    extra = sorted(i for i in preds if i not in every)
    outside = sorted(i for i in preds if i in every and i not in truths)
    rows = []
    for image_id, (load, _) in truths.items():
        true = load()
        try:
            pred = decode_labels(preds.get(image_id, []), true.shape)
        except ValueError as e:
            raise ValueError(f"{pred_csv}: image {image_id} ({true.shape[0]}x{true.shape[1]}): {e}") from None
        s = dsb_image_score(true, pred)
        row = {"ImageId": image_id, "score": s.score, "n_true": s.n_true, "n_pred": s.n_pred,
               "missing": int(image_id not in preds)}
        row.update({f"score@{t:.2f}": v for t, v in zip(THRESHOLDS, s.per_threshold)})
        rows.append(row)
    return rows, missing, extra, outside


