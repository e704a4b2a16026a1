"""Training and prediction folders: their layouts, the masks or label images of each image, the
labels CSV. The pixels themselves are read by ``unet_pl.data.readers`` (TIFF, PNG, JPEG, BMP;
channels, bit depths, the intensity rule). numpy, Pillow, tifffile, scikit-image.

Everything here raises ``ValueError``/``FileNotFoundError`` naming the file and the fix.

Training layouts (``scan_train_dir``), detected from the folder:

    the competition's                          images with label images (Fiji, QuPath, napari, Cellpose)
    stage1_train/                              my_data/
      <id>/images/<id>.png (or .tif, ...)        images/<name>.tif (or .png, ...)
      <id>/masks/<one file per nucleus>.png      masks/<name>.tif   (or labels/<name>.*)

and Cellpose's training folder: ``<name>.tif`` beside ``<name>_masks.tif`` (any of ``LABEL_SUFFIXES``)
in one folder, subfolders (its models/) and Cellpose's outputs (``CELLPOSE_OUTPUTS``) aside.

A masks/ file is one nucleus (the competition: any value > 0 in any channel, {0, 1}, {0, 255} or
{0, 65535}); a folder holding a single file with several values is a label image (0 background,
one integer per nucleus, 8/16/32-bit). A single binary file is split into its connected
components: touching nuclei in it stay one (``warn_if_binary`` says so, for training with the
boundary head and for scoring).

Files that are not images read here: in a training folder's images/ (and a competition masks/),
an error naming the file (save it as TIFF or PNG), since dropping it would lose an image or a
nucleus; in masks/ (labels/) of the label-image layout, one for an image is an error too, and
annotations without an image of the same name get one warning naming them (training goes on
without them). An annotation may carry one of ``LABEL_SUFFIXES`` after the image's name
(``cells_01_cp_masks.png``, ``cells_01_labels.tif``), as Cellpose and napari export them. A
prediction folder skips them with one warning listing them. A vendor format
(``.czi``, ``.nd2``, ...) is an error in training folders and as the one file to predict; in a
prediction folder beside other images it is skipped with a warning saying how to export it.

A folder holding ``stage1_train`` stands for it (``resolve_train_dir``); for prediction, a folder
holding one ``stage1_train``, ``stage1_test`` or ``stage2_test_final`` (``list_images``).
"""
from __future__ import annotations

import csv
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .readers import IMAGE_SUFFIXES, TIFF_SUFFIXES, VENDOR_SUFFIXES as _VENDOR, check_suffix, image_size, read_image, read_label_image  # noqa: F401 (image_size, read_image: re-exported)

log = logging.getLogger(__name__)

# Files that operating systems drop into folders; never images, never errors.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
LABELS_CSV = "stage1_train_labels.csv"
#: The label-image layout's folders for annotations, in the order they are looked for.
LABEL_FOLDERS = ("masks", "labels")
#: What other tools add to an image's name for its label image (Cellpose's <name>_cp_masks.png,
#: napari and Fiji exports): masks/<name><suffix>.* is <name>'s annotation when no masks/<name>.* is there
#: (the suffix in any case: _Labels, _MASKS).
LABEL_SUFFIXES = ("_cp_masks", "_masks", "_mask", "_labels", "_label", "-masks", "-mask", "-labels", "-label")


def is_ignored(path: str | Path) -> bool:
    """True for OS clutter (``.DS_Store``, ``Thumbs.db``) and hidden files like macOS' ``._x.png``."""
    name = os.path.basename(path)
    return name in IGNORED_NAMES or name.startswith(".")


def read_mask(path: str | Path) -> np.ndarray:
    """Mask file -> bool ``(H, W)``, True where any channel is > 0 in any bit depth (alpha ignored)."""
    return read_label_image(path) > 0


def decode_masks(image_shape: tuple[int, int], masks: list[Path] | None = None, rles: list[tuple[int, str]] | None = None,
                 csv_path: Path | None = None) -> np.ndarray:
    """Full-resolution instance labels uint16 ``(H, W)`` from mask files or ``(csv line, rle)`` pairs.

    Several mask files: nucleus ``k`` (1-based) is the k-th file in name order, where masks overlap
    the later one wins. One file: a label image (its values renumbered 1..k in order), or, when
    binary, its 8-connected components. Raises ``ValueError`` for a mask whose size is not the
    image's and for a malformed run-length string (naming the CSV line).
    """
    from ..rle import decode as rle_decode

    labels = np.zeros(image_shape, dtype=np.uint16)
    items = masks if masks is not None else rles or []
    if masks is not None and len(masks) == 1:
        return _label_image(masks[0], image_shape)
    if len(items) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(items)} nuclei in one image; at most 65535 are supported")
    for k, item in enumerate(items, start=1):
        if masks is not None:
            m = read_mask(item)
            _check_shape(item, m.shape, image_shape)
        else:
            line, rle = item
            try:
                m = rle_decode(rle, image_shape)
            except ValueError as e:
                raise ValueError(f"{csv_path}, line {line}: {e}. Fix or delete that row") from None
        labels[m] = k
    return labels


def _check_shape(path: Path, shape: tuple[int, ...], image_shape: tuple[int, int]) -> None:
    if tuple(shape) != tuple(image_shape):
        raise ValueError(f"{path}: mask is {shape[0]}x{shape[1]} (HxW) but its image is "
                         f"{image_shape[0]}x{image_shape[1]}; every mask must have its image's size")


def _label_image(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """One annotation file -> uint16 labels 1..k: a label image renumbered, or a binary mask's components."""
    from skimage.measure import label
    from skimage.segmentation import relabel_sequential

    raw = read_label_image(path)
    _check_shape(path, raw.shape, image_shape)
    if is_binary(raw):
        out = label(raw > 0, connectivity=2)
    else:
        out = relabel_sequential(raw.astype(np.int64, copy=False))[0]
    if out.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(f"{path}: {out.max()} nuclei in one image; at most 65535 are supported")
    return out.astype(np.uint16)


def is_binary(labels: np.ndarray) -> bool:
    """True when an annotation holds one foreground value ({0, 1}, {0, 255}, {0, 65535}, ...): a mask, not labels."""
    values = np.unique(labels)
    return len(values[values != 0]) <= 1


def warn_if_binary(items, effect: str = "the boundary head cannot learn to separate them") -> list[Path]:
    """Warn, once, naming them, when single-file annotations of the label-image layout are binary
    masks: touching nuclei in them are one blob (``effect`` says what that costs: training,
    scoring). Every annotation is looked at, not the first alone. Returns the binary ones."""
    # label-image layout (images/ + masks/<id>.png) only: in the competition's <id>/masks/ one
    # file is one nucleus, binary by design
    single = [it.masks[0] for it in items if len(it.masks) == 1 and it.masks[0].parent.parent.name != it.id]
    binary = [m for m in single if _merges(read_label_image(m))]
    if binary:
        shown = ", ".join(str(m) for m in binary[:BINARY_NAMED]) + (f" and {len(binary) - BINARY_NAMED} more"
                                                                   if len(binary) > BINARY_NAMED else "")
        what = ("is a binary mask, not a label image", "it") if len(binary) == 1 else (
            "are binary masks, not label images", "them")
        log.warning("%d of %d annotations %s (%s): touching nuclei in %s are one blob, and %s; export label images "
                    "(one integer per nucleus) instead", len(binary), len(single), what[0], shown, what[1], effect)
    return binary


def _merges(labels: np.ndarray) -> bool:
    """A binary annotation with two or more separate blobs: a mask, whose touching nuclei would be
    one. (One blob of one value is one nucleus as well as a mask: nothing to warn about.)"""
    from scipy import ndimage as ndi

    return is_binary(labels) and ndi.label(labels > 0)[1] > 1


#: ``warn_if_binary`` names this many files, then counts the rest.
BINARY_NAMED = 3


# The competition's folder layout.


@dataclass(frozen=True)
class TrainItem:
    """One image folder: its id (the folder name), image file and mask files (name order)."""

    id: str
    image: Path
    masks: tuple[Path, ...]


#: The training layouts in one line, for the messages that must name both.
TRAIN_LAYOUTS = ("the competition's stage1_train (<id>/images/<id>.png with <id>/masks/, one file per nucleus), a "
                 "folder of images/ with masks/ (or labels/) label images of the same names, or Cellpose's folder of "
                 "<name>.tif beside <name>_masks.tif")
#: The competition's folders that a folder holding one of them stands for: training takes stage1_train,
#: prediction any of them.
COMPETITION_FOLDERS = ("stage1_train", "stage1_test", "stage2_test_final")


def step_into(d: Path, names: tuple[str, ...]) -> Path:
    """``d`` itself, or its one subfolder named in ``names`` (the download's folder holding ``stage1_train``
    stands for it). Two of them is a ``ValueError``: which one is meant cannot be guessed."""
    found = [d / n for n in names if (d / n).is_dir()]
    if len(found) > 1:
        raise ValueError(f"{d} holds {' and '.join(f.name for f in found)}; pass the one you mean: "
                         f"{' or '.join(str(f) for f in found)}")
    return found[0] if found else d


def resolve_train_dir(data_dir: str | Path) -> Path:
    """``data_dir`` itself, or its ``stage1_train`` subfolder when it has one."""
    d = Path(data_dir).expanduser()
    if d.is_file():
        raise ValueError(f"data_dir {d} is a file; training takes a folder: {TRAIN_LAYOUTS}")
    if not d.is_dir():
        raise FileNotFoundError(f"data_dir {d} does not exist; point it at {TRAIN_LAYOUTS} (or the folder holding stage1_train)")
    return step_into(d, COMPETITION_FOLDERS[:1])


def _listing(folder: Path, vendor_ok: bool = False) -> tuple[list[Path], list[Path]]:
    """``(image files, other files)`` directly in ``folder``, name order; hidden files and OS clutter
    in neither, a missing folder empty. A vendor format is an error naming it and the way out, or
    with ``vendor_ok`` one of the other files."""
    # os.scandir: the file type comes with the listing, no stat per file (30k masks in the full set).
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.is_file() and not is_ignored(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    images, others = [], []
    for n in names:
        suffix = os.path.splitext(n)[1].lower()
        if suffix in _VENDOR and not vendor_ok:
            check_suffix(folder / n)  # raises, with the way out
        (images if suffix in IMAGE_SUFFIXES else others).append(folder / n)
    return images, others


#: Files that are never images (notes, tables, scripts, Cellpose's _seg.npy, ROI sets): skipped in a
#: training folder with one warning naming them, where any other file not read is an error.
NOT_IMAGES = (".txt", ".md", ".csv", ".tsv", ".json", ".xml", ".yaml", ".yml", ".log", ".py", ".ijm", ".npy", ".zip",
              ".roi", ".pdf", ".doc", ".docx", ".xls", ".xlsx", ".html", ".htm")


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (name order). Notes and tables (``NOT_IMAGES``) are
    skipped with one warning naming them; any other file is an error naming it and the way out
    (save it as TIFF or PNG): dropped silently, it would be an image or a nucleus missing."""
    images, others = _listing(folder)
    notes = [p for p in others if p.suffix.lower() in NOT_IMAGES]
    others = [p for p in others if p not in notes]
    if others:
        check_suffix(others[0])  # raises
    if notes:
        log.warning("%s: skipped %s (%s)", folder, "1 file that is not an image" if len(notes) == 1 else
                    f"{len(notes)} files that are not images", _names([p.name for p in notes]))
    return images


def image_id(path: Path) -> str:
    """A file's image id: its name without the suffix, and without the ``.ome`` of an OME-TIFF
    (``cells.ome.tif`` -> ``cells``, so its results are ``labels/cells.tif``)."""
    stem = path.stem
    if path.suffix.lower() in TIFF_SUFFIXES and stem.lower().endswith(".ome") and len(stem) > 4:
        stem = stem[:-4]
    return stem


def _image_of(d: Path) -> Path:
    """The image of a competition-layout folder: ``<id>/images/<id>.<any image suffix>``."""
    found = [p for p in _listing(d / "images")[0] if image_id(p) == d.name]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise ValueError(f"{d / 'images'} holds {len(found)} images named {d.name}.*; keep one")
    others = sorted((d / "images").glob(f"{d.name}.*")) if (d / "images").is_dir() else []
    if others:
        check_suffix(others[0])  # a format we do not read: the error says what to do
    raise FileNotFoundError(f"{d / 'images' / d.name}.png not found (nor .tif, .jpg, ...): {d.parent} was read in the "
                            f"competition's layout, where each subfolder is one image, <id>/images/<id>.<image suffix> "
                            f"(named like its folder) with <id>/masks/; {d.name}/ is not such a folder")


def _flat_layout(train_dir: Path) -> bool:
    """The label-image layout: files directly in ``train_dir/images`` (unsupported ones are then named by the scan)."""
    return any(_listing(train_dir / "images"))


#: What Cellpose writes beside an image besides its masks: <name>_flows.tif, the figure <name>_cp_output.png.
CELLPOSE_OUTPUTS = ("_flows", "_cp_output", "_cp_outlines", "_outlines")


def _suffix_stem(key: str, suffixes: tuple[str, ...] = LABEL_SUFFIXES) -> str | None:
    """``key`` without the one of ``suffixes`` it ends with (in any case: Fiji users write _Labels), and
    without an ``.ome`` before it (Cellpose names ``a.ome.tif``'s masks ``a.ome_masks.tif``); else None."""
    low = key.lower()
    stem = next((key[:-len(x)] for x in suffixes if low.endswith(x) and len(key) > len(x)), None)
    return stem[:-4] if stem is not None and stem.lower().endswith(".ome") and len(stem) > 4 else stem


def _suffixed(key: str, keys: set[str]) -> str | None:
    """The image that label image ``key`` belongs to (``_suffix_stem``), when that image is among ``keys``; else None."""
    stem = _suffix_stem(key)
    return stem if stem in keys else None


def _side_by_side(train_dir: Path) -> list[Path]:
    """Cellpose's training folder: the images and their label images in one folder, ``<name>_masks.tif``
    (or another of ``LABEL_SUFFIXES``) beside ``<name>.tif``; subfolders (Cellpose's models/) aside, but
    not a folder of the competition's ``<id>/images/`` folders (a stray pair beside them is theirs).
    The folder's image files when it holds such a pair, else none."""
    files = _listing(train_dir, vendor_ok=True)[0]
    keys = {image_id(p) for p in files}
    if not any(_suffixed(k, keys) is not None for k in keys):
        return []
    if any((p / "images").is_dir() for p in train_dir.iterdir() if p.is_dir() and not is_ignored(p)):
        return []
    return files


def scan_train_dir(train_dir: Path, with_masks: bool = True) -> list[TrainItem]:
    """Every image of ``train_dir`` with its mask files, in any of the layouts (module docstring), sorted by id."""
    if _flat_layout(train_dir):
        return _scan_flat(train_dir, with_masks)
    beside = _side_by_side(train_dir)
    if beside:
        # every file named as a label image is one, its image there or not (an orphan is said, not trained on)
        labels = [p for p in beside if _suffix_stem(image_id(p)) is not None]
        outputs = [p for p in beside if _suffix_stem(image_id(p), CELLPOSE_OUTPUTS) is not None]
        if outputs:
            log.warning("%s: skipped %d of Cellpose's outputs (not images to train on): %s", train_dir, len(outputs),
                        _names([p.name for p in outputs]))
        # notes and _seg.npy skipped, other formats refused
        images = [p for p in _images_in(train_dir) if p not in labels and p not in outputs]
        return _pair(train_dir, images, train_dir, labels, [], with_masks)
    dirs = sorted(p for p in train_dir.iterdir() if p.is_dir() and not is_ignored(p))
    if not dirs:
        raise FileNotFoundError(
            f"{train_dir} holds no image folders; expected the competition's layout "
            "<id>/images/<id>.png with <id>/masks/*.png (the stage1_train folder of the download), "
            "images/<name>.tif with masks/<name>.tif label images, or <name>.tif beside <name>_masks.tif (Cellpose's)"
        )
    return [TrainItem(d.name, _image_of(d), tuple(_images_in(d / "masks")) if with_masks else ()) for d in dirs]


def _scan_flat(train_dir: Path, with_masks: bool) -> list[TrainItem]:
    images = _images_in(train_dir / "images")
    label_dir = next((train_dir / n for n in LABEL_FOLDERS if (train_dir / n).is_dir()), None)
    if with_masks and label_dir is None:
        raise FileNotFoundError(f"{train_dir / 'images'} holds images but {train_dir} has no masks/ (or labels/) folder "
                                "beside it: add one label image per image, with the same name")
    labels, others = _listing(label_dir) if label_dir is not None else ([], [])
    return _pair(train_dir, images, label_dir, labels, others, with_masks)


def _pair(train_dir: Path, images: list[Path], label_dir: Path | None, labels: list[Path], others: list[Path],
          with_masks: bool) -> list[TrainItem]:
    """Each image with its label image among ``labels`` (of ``label_dir``; ``others``: its files of
    formats not read): the same name, or the name and one of ``LABEL_SUFFIXES``."""
    annotations: dict[str, Path] = {}
    for p in labels:
        key = image_id(p)
        if key in annotations:
            raise ValueError(f"two label images named {key}.* in {label_dir}: {annotations[key].name} and {p.name}; keep one")
        annotations[key] = p
    image_keys = {image_id(image) for image in images}
    for key, p in list(annotations.items()):  # <name>_masks.tif and the like: <name>'s, unless <name>.* is there
        stem = _suffixed(key, image_keys)
        if stem is None or key in image_keys or stem in annotations:
            continue
        twin = next((q for k, q in annotations.items() if k != key and _suffix_stem(k) == stem), None)
        if twin is not None:
            raise ValueError(f"two label images for {stem} in {label_dir}: {twin.name} and {p.name}; keep one")
        annotations[stem] = annotations.pop(key)
    items, seen = [], {}
    for image in images:
        key = image_id(image)
        if key in seen:
            raise ValueError(f"two images named {key}.* in {image.parent}: {seen[key].name} and {image.name}; keep one")
        seen[key] = image
        mask = annotations.get(key)
        if with_masks and mask is None:
            unreadable = next((p for p in others if image_id(p) == key), None)
            if unreadable is not None:
                check_suffix(unreadable)  # the image's annotation in a format we do not read: raises
        items.append(TrainItem(key, image, (mask,) if with_masks and mask is not None else ()))
    # Annotations of no image: a renamed or deleted image, usually. Training goes on without them, said.
    used = {it.masks[0] for it in items if it.masks}
    orphans = [p.name for p in labels if p not in used] + [p.name for p in others if image_id(p) not in seen]
    if with_masks and orphans:
        log.warning("%s: %d file%s without an image of the same name in %s, not used: %s", label_dir, len(orphans),
                    "s" * (len(orphans) != 1), images[0].parent if images else train_dir, _names(orphans))
    return items


def _names(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def list_images(folder: str | Path) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image to predict, sorted by id.

    ``folder`` is one image file, or a folder in the competition's ``stage1_test`` layout
    (``<id>/images/<id>.png``, id = folder name), of plain image files (id = file name without
    suffix), or a mix, or a label-image training folder (its ``images/``), or the folder holding one
    ``stage1_train``, ``stage1_test`` or ``stage2_test_final``. Files of other formats (a microscope
    vendor's raw files beside their TIFF exports, notes), and subfolders without an ``images/``
    folder, are skipped with a warning naming them (a vendor's with the way to export it); a folder
    holding nothing else is an error that says how to export them.
    """
    folder = Path(folder).expanduser()
    if folder.is_file():
        check_suffix(folder)
        return [(image_id(folder), folder)]
    if not folder.is_dir():
        wildcard = " (a wildcard such as *.tif is not expanded here: pass the folder)" if set("*?[") & set(str(folder)) else ""
        raise FileNotFoundError(f"{folder} does not exist{wildcard}; pass an image, a folder of images or the competition's "
                                "stage1_test folder")
    folder = step_into(folder, COMPETITION_FOLDERS)  # the training side's rule (resolve_train_dir)
    if _flat_layout(folder):
        folder = folder / "images"
    images, skipped = _listing(folder, vendor_ok=True)
    vendor = [p for p in skipped if p.suffix.lower() in _VENDOR]
    skipped = [p for p in skipped if p not in vendor]
    found: dict[str, Path] = {}
    entries = [(image_id(p), p) for p in images]
    # label images and Cellpose's outputs beside their images (Cellpose's folders): not images to segment
    stems = {p: _suffix_stem(k, LABEL_SUFFIXES + CELLPOSE_OUTPUTS) for k, p in entries}
    named = {p: stem for p, stem in stems.items() if stem is not None}
    # in a folder where some image has its label image beside it, every file named as one is one
    beside = list(named) if {k for k, _ in entries} & set(named.values()) else []
    if beside:
        log.warning("%s: skipped %d file%s named as another image's label image or Cellpose output (<name>_masks, "
                    "_cp_masks, _flows and the like): %s", folder, len(beside), "s" * (len(beside) != 1),
                    _names([p.name for p in beside]))
        entries = [(k, p) for k, p in entries if p not in beside]
    subfolders = [p for p in sorted(folder.iterdir()) if p.is_dir() and not is_ignored(p)]
    # <id>/images/ folders are the competition's layout; any other folder (results/, an empty one) is not an image
    entries += [(p.name, _image_of(p)) for p in subfolders if (p / "images").is_dir()]
    others = [p.name + "/" for p in subfolders if not (p / "images").is_dir()]
    holding = [p for p in subfolders if not (p / "images").is_dir() and _holds_images(p)]
    if holding and not entries:  # a folder of experiments: its subfolders hold the images
        raise FileNotFoundError(f"{folder} holds no images itself, and its subfolders are not searched: "
                                f"{_names([p.name + '/' for p in holding])} hold image files; predict one of them "
                                f"(e.g. {shlex.quote(str(holding[0]))}), one run per folder")
    if others:
        log.warning("%s: skipped %d folder%s without an images/ folder inside (the competition's <id>/images/<id>.png "
                    "layout): %s", folder, len(others), "s" * (len(others) != 1), _names(others))
    for id_, path in sorted(entries):
        if id_ in found:
            raise ValueError(f"two images with the id {id_!r} in {folder}: {found[id_]} and {path}; rename one")
        found[id_] = path
    if skipped:
        log.warning("%s: skipped %d file%s that %s not an image format read here (%s): %s", folder, len(skipped),
                    "s" * (len(skipped) != 1), "are" if len(skipped) != 1 else "is", ", ".join(IMAGE_SUFFIXES),
                    _names([p.name for p in skipped]))
    if vendor and found:
        log.warning("%s: skipped %d file%s of a microscope vendor's format (%s): open %s in Fiji (Bio-Formats) and "
                    "save the nuclear channel as TIFF to predict %s", folder, len(vendor), "s" * (len(vendor) != 1),
                    _names([p.name for p in vendor]), "them" if len(vendor) != 1 else "it", "them" if len(vendor) != 1 else "it")
    elif vendor:
        check_suffix(vendor[0])  # nothing else to predict: the error, with the way out
    if not found:
        inside = f" (its folders {_names(others)} have no images/ folder inside)" if others else ""
        raise FileNotFoundError(f"{folder} holds no images{inside}; expected <id>/images/<id>.png folders or image "
                                f"files ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(found.items())


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` holds image files itself (an unreadable folder: no)."""
    try:
        return any(f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in folder.iterdir())
    except OSError:
        return False


def read_labels_csv(path: Path) -> dict[str, list[tuple[int, str]]]:
    """``stage1_train_labels.csv`` -> ``{image id: [(line number, run-length string), ...]}``, empty runs dropped."""
    out: dict[str, list[tuple[int, str]]] = {}
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["ImageId", "EncodedPixels"]:
            raise ValueError(f"{path}: expected the header 'ImageId,EncodedPixels', got {','.join(header)!r}; is this stage1_train_labels.csv?")
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(row) < 2 or not row[0].strip():
                raise ValueError(f"{path}, line {reader.line_num}: expected 'ImageId,EncodedPixels', got {','.join(row)!r}; fix or delete that row")
            runs = out.setdefault(row[0].strip(), [])
            if row[1].strip():
                runs.append((reader.line_num, row[1].strip()))
    return out


def resolve_labels_csv(labels_csv: str | Path | bool | None, train_dir: Path) -> Path | None:
    """None/False: no CSV (masks/ folders); True: ``stage1_train_labels.csv`` beside ``train_dir``; else that path."""
    if labels_csv is None or labels_csv is False:
        return None
    path = train_dir.parent / LABELS_CSV if labels_csv is True else Path(labels_csv).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} not found; pass its path (--labels-csv PATH, labels_csv= in Python), "
                                "or leave it out to read the masks/ folders")
    return path
