"""What one run of predict.py writes, in the formats biologists' tools open, never half-written and
never over the input.

Into ``--out-dir`` (each optional one on request):

    submission.csv             the competition's ImageId,EncodedPixels rows (Kaggle)
    labels/<id>.tif            the label image: uint16 (uint32 above 65,535 nuclei), 0 background,
                               nucleus k = k; napari, Fiji and QuPath open it as labels; calibrated
                               in micrometres when the input records its pixel size
    nuclei.csv                 one row per nucleus (lengths and areas in pixels): image, label, area, centroid, bounding box,
                               intensity mean/min/max (in the file's own units, the nuclear channel),
                               perimeter, eccentricity, solidity, axis lengths, orientation, diameter,
                               the mean foreground probability (lower for small nuclei, whose edge
                               pixels weigh more; validated per image, not per nucleus)
    summary.csv                one row per image: nuclei, mean and median area, area fraction, the
                               mean foreground probability over its nuclei (the images where it is
                               lowest in a run are where the model most likely failed: look at those first),
                               the pixel size in micrometres (empty when the file records none), the
                               factor the network saw the image at (--scale: 1 as it is; auto's choice),
                               the background as the grey rule read it (bright: inverted)
    rois/<id>.zip              ImageJ ROIs, one polygon per nucleus, empty without (Fiji's ROI Manager, QuPath)   --rois
    probabilities/<id>.tif     float32 (C, H, W): foreground (and boundary, distance) probabilities --probabilities
    overlays/<id>.png          the image with each nucleus outlined, as the file looks (overlay_image) --overlays

Safety: every file is written into a hidden staging folder beside its destination and moved into
place only when the whole run has succeeded, so a failure or a kill leaves the previous results
as they were. ``check_outputs`` refuses outputs equal to or inside the input folder.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..data.readers import channel_mean, to_rgb8
from ..rle import encode_labels
from .measure import nucleus_table
from .postprocess import label_means

STAGING_PREFIX = ".unet_pl-partial-"
NUCLEUS_PROPERTIES = ("label", "area", "centroid", "bbox", "intensity_mean", "intensity_min", "intensity_max",
                      "perimeter", "eccentricity", "solidity", "axis_major_length", "axis_minor_length", "orientation",
                      "equivalent_diameter_area")
NUCLEUS_COLUMNS = ("image", "label", "area", "centroid_y", "centroid_x", "bbox_min_row", "bbox_min_col", "bbox_max_row",
                   "bbox_max_col", "intensity_mean", "intensity_min", "intensity_max", "perimeter", "eccentricity",
                   "solidity", "axis_major_length", "axis_minor_length", "orientation", "equivalent_diameter",
                   "probability_mean", "area_um2", "equivalent_diameter_um")
#: ``out_dir``'s folders of one file per image, and the suffix of the files we write there.
PER_IMAGE = {"labels": ".tif", "rois": ".zip", "probabilities": ".tif", "overlays": ".png"}
SUMMARY_COLUMNS = ("image", "height", "width", "nuclei", "mean_area", "median_area", "area_fraction", "probability_mean",
                   "pixel_size_um", "scale", "background")


def check_outputs(data_dir: str | Path, outputs: Mapping[str, str | Path | None]) -> None:
    """``ValueError`` unless the input (a folder or one file) and every output (``{flag: folder or
    file}``) are apart: an output equal to or inside the input, or an input inside an output folder,
    could replace the user's images. Also ``ValueError`` when an output cannot be written (its nearest
    existing folder is read-only, or a file stands where a folder should be): said before any
    image is predicted, not after all of them. Each message names the flag to change."""
    source = Path(data_dir).expanduser().resolve()
    for flag, out in outputs.items():
        if out is None:
            continue
        target = Path(out).expanduser().resolve()
        if target == source or source in target.parents:
            raise ValueError(f"{flag} {out} is inside the input {data_dir}: prediction never writes there (it could "
                             f"replace your images); give {flag} a place outside it, e.g. {_example(flag)}")
        if target in source.parents:
            raise ValueError(f"the input {data_dir} is inside {flag} {out}: its files could be replaced by results of "
                             f"the same name; give {flag} a place outside it, e.g. {_example(flag)}")
        existing = next(p for p in (target, *target.parents) if p.exists())
        if existing == target and existing.is_file():
            existing = target.parent  # a file output replaced in its folder (staged beside it)
        if not existing.is_dir():
            raise ValueError(f"cannot write {flag} {out}: {existing} is a file, not a folder; choose another place, "
                             f"e.g. {_example(flag)}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ValueError(f"cannot write {flag} {out}: {existing} is not writable; choose a place you can write "
                             f"to, e.g. {_example(flag, '~/')}")


def _example(flag: str, home: str = "") -> str:
    """An output flag with a sensible value, for messages."""
    return f"{flag} {home}" + ("predictions/submission.csv" if flag == "--out" else "predictions")


def submission_rows(image_id: str, labels: np.ndarray) -> list[tuple[str, str]]:
    """``(ImageId, EncodedPixels)`` per nucleus; one row with ``""`` when there is none."""
    rles = encode_labels(labels)
    return [(image_id, r) for r in rles] or [(image_id, "")]


def label_dtype(labels: np.ndarray) -> type:
    """uint16 while the nuclei fit, uint32 above 65,535 (what napari, Fiji and QuPath read)."""
    return np.uint16 if int(labels.max(initial=0)) <= np.iinfo(np.uint16).max else np.uint32


def intensity_image(raw: np.ndarray) -> np.ndarray:
    """nuclei.csv's intensities from ``read_raw``'s pixels: float32 ``(H, W)`` in the file's own units,
    the one channel as it is, the mean of RGB's three."""
    return channel_mean(raw)


def overlay_image(raw: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """What an overlay is drawn on, from ``read_raw``'s pixels: the file as a person sees it, not as
    the network reads it (grey, inverted for stained tissue): 8-bit grey or RGB as stored, 16-bit
    stretched between its 1st and 99.8th percentiles; ``fallback`` (the network's uint8 RGB) for
    anything else."""
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.shape[:2] != fallback.shape[:2] or not (raw.ndim == 2 or raw.shape[2] == 3):
        return fallback
    if raw.dtype == np.uint8:
        return np.ascontiguousarray(raw) if raw.ndim == 3 else np.repeat(raw[:, :, None], 3, axis=2)
    return to_rgb8(raw, "percentile") if raw.dtype == np.uint16 else fallback


def nucleus_rows(image_id: str, table: dict[str, np.ndarray], probability: np.ndarray | None = None,
                 pixel_size: float | None = None) -> list[tuple]:
    """One tuple per nucleus, in ``NUCLEUS_COLUMNS`` order, from ``measure.nucleus_table``'s columns
    (scikit-image's ``regionprops_table`` columns for ``NUCLEUS_PROPERTIES``) and ``probability``, each
    nucleus' mean foreground probability in the table's order (None: the column left empty).
    ``pixel_size`` (micrometres): the area and equivalent diameter in um2 and um as well (None: empty)."""
    n = len(table["label"])
    empty = np.full(n, "", object)
    table = {**table, "probability_mean": empty if probability is None else np.asarray(probability, np.float64),
             "area_um2": empty if pixel_size is None else np.asarray(table["area"], np.float64) * pixel_size ** 2,
             "equivalent_diameter_um": empty if pixel_size is None else
             np.asarray(table["equivalent_diameter_area"], np.float64) * pixel_size}
    names = {"centroid-0": "centroid_y", "centroid-1": "centroid_x", "bbox-0": "bbox_min_row", "bbox-1": "bbox_min_col",
             "bbox-2": "bbox_max_row", "bbox-3": "bbox_max_col", "equivalent_diameter_area": "equivalent_diameter"}
    cols = {names.get(k, k): np.asarray(v) for k, v in table.items()}
    # column by column (tolist: Python numbers at C speed), floats to 4 decimals as _plain rounds them
    values = [[round(v, 4) for v in cols[c].tolist()] if cols[c].dtype.kind == "f" else cols[c].tolist()
              for c in NUCLEUS_COLUMNS[1:]]
    return list(zip([image_id] * len(values[0]), *values))


def summary_row(image_id: str, shape: tuple[int, int], areas: np.ndarray, probability: np.ndarray | None = None,
                pixel_size: float | None = None, scale: float | None = None, inverted: bool | None = None) -> dict:
    """``summary.csv``'s row of an image of ``shape`` whose nuclei have ``areas`` (pixels, one per nucleus)
    and mean foreground probabilities ``probability`` (one per nucleus; None: the column left empty).
    The image's ``probability_mean`` is the mean over all its nuclei's pixels (empty without nuclei, as are
    ``mean_area`` and ``median_area``);
    ``pixel_size_um``: the file's pixel width in micrometres (``readers.pixel_size``; empty: not recorded);
    ``scale``: the factor the image was resized by before the network (``--scale``; empty: a resize-mode model);
    ``background``: "bright" where the grey rule inverted the image (``inverted``), "dark" where it did not, empty
    for rules that never invert."""
    areas = np.asarray(areas)
    sure = "" if probability is None or not len(areas) else _plain(float(np.dot(areas, probability) / areas.sum()))
    return {"image": image_id, "height": shape[0], "width": shape[1], "nuclei": len(areas),
            # without nuclei the areas' mean and median are empty, not 0: a spreadsheet's AVERAGE then skips them
            "mean_area": _plain(areas.mean()) if len(areas) else "", "median_area": _plain(np.median(areas)) if len(areas) else "",
            "area_fraction": _plain(float(areas.sum()) / (shape[0] * shape[1])), "probability_mean": sure,
            "pixel_size_um": "" if pixel_size is None else float(f"{pixel_size:.6g}"),
            "scale": "" if scale is None else _plain(float(scale)),
            "background": "" if inverted is None else "bright" if inverted else "dark"}


def calibration(pixel_size: float | None, dtype, axes: str = "YX") -> dict:
    """tifffile.imwrite's arguments that record ``pixel_size`` (micrometres): ImageJ's ``unit`` (what
    Fiji and QuPath read) for the types ImageJ takes, else the resolution tags in pixels per centimetre.
    ``axes``: the array's, for ImageJ (``"CYX"``: channels)."""
    from ..data.readers import PIXEL_SIZES

    if pixel_size is None or not PIXEL_SIZES[0] <= pixel_size <= PIXEL_SIZES[1]:
        return {}
    if np.dtype(dtype) in (np.uint8, np.uint16, np.float32):
        return {"imagej": True, "resolution": (1 / pixel_size, 1 / pixel_size), "metadata": {"unit": "um", "axes": axes}}
    return {"resolution": (1e4 / pixel_size, 1e4 / pixel_size), "resolutionunit": "CENTIMETER"}


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return round(v, 4) if isinstance(v, float) else v


def roi_polygons(labels: np.ndarray) -> list:
    """One ImageJ polygon ROI per nucleus (its outer contour, pixel-corner coordinates), named by its label."""
    import roifile
    from scipy import ndimage as ndi
    from skimage.measure import find_contours

    rois = []
    for k, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = np.pad(labels[sl] == k, 1)
        # (row, col) around the nucleus; "high": pieces touching at a corner (8-connected, one nucleus) in one outline
        contour = max(find_contours(mask.astype(np.uint8), 0.5, fully_connected="high"), key=len)
        xy = np.stack([contour[:, 1] + sl[1].start - 1 + 0.5, contour[:, 0] + sl[0].start - 1 + 0.5], axis=1)
        roi = roifile.ImagejRoi.frompoints(xy)
        roi.roitype = roifile.ROI_TYPE.POLYGON
        roi.name = f"nucleus-{k}"
        rois.append(roi)
    return rois


class Outputs:
    """Stages a predict run's files and moves them into place on ``commit`` (see the module docstring).

    ``csv_path``: the submission CSV; ``out_dir``: the folder of labels/, nuclei.csv, summary.csv and
    the optional outputs (None: the CSV and the legacy folders only); ``masks_dir`` / ``overlays_dir``:
    the older flags' 16-bit label PNGs and overlays.
    """

    def __init__(self, csv_path: str | Path, out_dir: str | Path | None = None, *, rois: bool = False,
                 probabilities: bool = False, overlays: bool = False, masks_dir: str | Path | None = None,
                 overlays_dir: str | Path | None = None) -> None:
        self.csv_path = Path(csv_path)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.dirs: dict[str, Path] = {}
        if self.out_dir is not None:
            self.dirs["labels"] = self.out_dir / "labels"
            if rois:
                self.dirs["rois"] = self.out_dir / "rois"
            if probabilities:
                self.dirs["probabilities"] = self.out_dir / "probabilities"
            if overlays:
                self.dirs["overlays"] = self.out_dir / "overlays"
        if masks_dir:
            self.dirs["masks"] = Path(masks_dir)
        if overlays_dir:
            self.dirs["overlays_png"] = Path(overlays_dir)
        #: per image: its rows of the submission, nuclei.csv and summary.csv as CSV text (made on the thread
        #: that adds the image, so that ``commit`` only concatenates)
        self._tables: dict[str, tuple[str, str, str]] = {}
        self._staged: list[tuple[Path, Path]] = []  # (staged file, destination)
        self._staging: dict[Path, Path] = {}
        self._made: list[Path] = []  # folders this run made, removed again (when empty) by ``abort``
        self._lock = threading.Lock()  # images may be added from several threads at once
        #: after ``commit``: files in the per-image folders left by earlier runs for images not in this one
        self.earlier = 0
        #: per image (``out_dir`` given, probabilities passed): summary.csv's probability_mean, None without nuclei
        self.sureness: dict[str, float | None] = {}

    def _stage(self, dest: Path) -> Path:
        folder = dest.parent
        with self._lock:
            if folder not in self._staging:
                self._made += [p for p in (folder, *folder.parents) if not p.exists()]
                folder.mkdir(parents=True, exist_ok=True)
                _remove_dead_staging(folder)
                self._staging[folder] = folder / f"{STAGING_PREFIX}{os.getpid()}"
                self._staging[folder].mkdir(exist_ok=True)
            staged = self._staging[folder] / dest.name
            self._staged.append((staged, dest))
        return staged

    @property
    def draws_overlays(self) -> bool:
        """Whether ``add`` draws an overlay (its ``image`` is only used for that)."""
        return "overlays" in self.dirs or "overlays_png" in self.dirs

    def add(self, image_id: str, image: np.ndarray, intensity: np.ndarray, labels: np.ndarray,
            prob: np.ndarray | None = None, pixel_size: float | None = None, scale: float | None = None,
            inverted: bool | None = None) -> None:
        """One image's results: ``image`` uint8 RGB (overlays), ``intensity`` float (H, W) in the file's
        units (the table), ``labels`` int (H, W), ``prob`` float (C, H, W) (probability maps),
        ``pixel_size`` the input's pixel width in micrometres (None: not recorded), written into the
        label TIFF (Fiji, QuPath: calibrated) and summary.csv, ``scale`` the factor the network saw
        the image at and ``inverted`` whether the grey rule inverted it (summary.csv; None: empty). Safe to call from several threads at
        once, one image each."""
        import tifffile

        rows, nuclei, summary = _csv_text(submission_rows(image_id, labels)), "", ""
        if self.out_dir is not None:
            table = nucleus_table(labels, intensity)  # measured once: nuclei.csv's rows and summary.csv's areas
            sure = None if prob is None else label_means(labels, prob[0])[table["label"]]
            nuclei = _csv_text(nucleus_rows(image_id, table, sure, pixel_size))
            row = summary_row(image_id, labels.shape, table["area"], sure, pixel_size, scale, inverted)
            summary = _csv_text([tuple(row.values())])
            if prob is not None:
                with self._lock:
                    self.sureness[image_id] = row["probability_mean"] if len(table["area"]) else None
            tifffile.imwrite(self._stage(self.dirs["labels"] / f"{image_id}.tif"), labels.astype(label_dtype(labels)),
                             compression="zlib", compressionargs={"level": 1},  # 4x faster than 6, files ~2x larger
                             **calibration(pixel_size, label_dtype(labels)))
        if "rois" in self.dirs:
            import roifile

            # every image gets its set, an empty zip without nuclei: a macro looping over the images finds each one
            roifile.roiwrite(self._stage(self.dirs["rois"] / f"{image_id}.zip"), roi_polygons(labels))
        if "probabilities" in self.dirs and prob is not None:
            tifffile.imwrite(self._stage(self.dirs["probabilities"] / f"{image_id}.tif"), prob.astype(np.float32),
                             compression="zlib", compressionargs={"level": 1},  # 4x faster than 6, files ~2x larger
                             **calibration(pixel_size, np.float32, "CYX"))
        for key in ("overlays", "overlays_png"):
            if key in self.dirs:
                save_overlay(image, labels, self._stage(self.dirs[key] / f"{image_id}.png"))
        if "masks" in self.dirs:
            save_label_png(labels, self._stage(self.dirs["masks"] / f"{image_id}.png"))
        with self._lock:
            self._tables[image_id] = (rows, nuclei, summary)

    def folders(self) -> list[str]:
        """What this run writes, for the closing line: ``labels/``, ``nuclei.csv``, ..."""
        names = {"labels": "labels/", "rois": "rois/", "probabilities": "probabilities/", "overlays": "overlays/"}
        out = [names[k] for k in names if k in self.dirs]
        return out + (["nuclei.csv", "summary.csv"] if self.out_dir is not None else []) + [self.csv_path.name]

    def commit(self, order: Sequence[str] | None = None) -> list[Path]:
        """Write the tables (images in ``order``, default the order they were added), move every
        staged file into place; returns the destinations written. Every output folder exists
        afterwards, also one no image wrote into (``rois/`` when no image has a nucleus)."""
        for folder in self.dirs.values():
            folder.mkdir(parents=True, exist_ok=True)
        tables = [self._tables[i] for i in (self._tables if order is None else order) if i in self._tables]
        _write_csv(self._stage(self.csv_path), ("ImageId", "EncodedPixels"), [t[0] for t in tables])
        if self.out_dir is not None:
            _write_csv(self._stage(self.out_dir / "nuclei.csv"), NUCLEUS_COLUMNS, [t[1] for t in tables])
            _write_csv(self._stage(self.out_dir / "summary.csv"), SUMMARY_COLUMNS, [t[2] for t in tables])
        for staged, dest in self._staged:
            os.replace(staged, dest)
        # An image of this run keeps no earlier result this run did not write again (an ROI set of an
        # image that now has no nucleus, the overlay of a run that asked for overlays): it would
        # contradict its new labels. Other images' results stay, counted in ``earlier``.
        written = {dest for _, dest in self._staged}
        per_image = [(self.out_dir / k, suffix) for k, suffix in PER_IMAGE.items()] if self.out_dir is not None else []
        old = [f for folder, suffix in per_image if folder.is_dir() for f in folder.iterdir()
               if f.is_file() and f.suffix == suffix and not f.name.startswith(".") and f not in written]
        for f in old:
            if f.stem in self._tables:
                f.unlink(missing_ok=True)
        self._made.clear()  # the output folders stay, empty or not
        self.abort()
        for folder in {self.csv_path.parent, *(f for f, _ in per_image if f.is_dir())}:
            _remove_dead_staging(folder)  # a killed run's, also in folders this run did not write (rois/ without --rois)
        self.earlier = sum(f.stem not in self._tables for f in old)
        return [dest for _, dest in self._staged]

    def abort(self) -> None:
        """Drop whatever was staged: the destinations keep their previous contents (and folders made
        for them are removed again, unless something else was put there meanwhile)."""
        for folder in self._staging.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._staging.clear()
        for folder in sorted(set(self._made), key=lambda p: len(p.parts), reverse=True):  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty, or gone
                pass
        self._made.clear()


def _remove_dead_staging(folder: Path) -> None:
    """Staging folders of runs that no longer exist (killed): their files were never results."""
    for d in folder.glob(STAGING_PREFIX + "*"):
        try:
            pid = int(d.name.removeprefix(STAGING_PREFIX))
            os.kill(pid, 0)
            alive = pid != os.getpid()  # our own pid: left by an earlier run in this process
        except (ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True  # another user's live process
        if not alive:
            shutil.rmtree(d, ignore_errors=True)


def _csv_text(rows: list[tuple]) -> str:
    """``rows`` as the CSV lines ``csv.writer`` writes for them."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def _write_csv(path: Path, header: tuple[str, ...], texts: list[str]) -> None:
    """The header, then the images' rows (``_csv_text``) one after another."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerow(header)
        f.writelines(texts)


def save_label_png(labels: np.ndarray, path: str | Path) -> None:
    """The label image as a 16-bit PNG (0 background, nucleus k = value k)."""
    from PIL import Image

    if labels.max(initial=0) > 65535:
        raise ValueError(f"{path}: {labels.max()} nuclei do not fit a 16-bit PNG; use --out-dir, whose label TIFFs take uint32")
    Image.fromarray(labels.astype(np.uint16)).save(path, format="PNG")


def save_overlay(image: np.ndarray, labels: np.ndarray, path: str | Path, color=(255, 255, 0)) -> None:
    """``image`` uint8 ``(H, W, 3)`` with the outline of every predicted nucleus drawn in ``color``."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(labels, mode="inner")] = color
    Image.fromarray(out).save(path, format="PNG")
