"""Reading the competition's files: folder layout, PNG decoding, the notebook's resize. numpy, Pillow, scikit-image.

Everything here turns files into numpy arrays and raises ``ValueError``/``FileNotFoundError``
naming the file and the fix; ``unet_pl.data`` turns the arrays into cached tensors.

Pixel rules (the same for every file, never data-dependent):
    image: uint8 (H, W, 3). RGBA drops alpha (the notebook's ``[:, :, :3]``), grey and
        grey+alpha repeat the grey channel, palette images are expanded to RGB.
        16-bit PNGs keep their high byte (``v >> 8``, i.e. ``floor(v / 256)``), the rule Pillow
        itself applies to 16-bit colour PNGs, so 16-bit grey and colour files agree.
    mask:  bool (H, W), foreground where any colour channel is > 0 ({0, 255} and {0, 1} both work).

Resizing to the network's squares lives in ``unet_pl.geometry`` with its inverse.
"""
from __future__ import annotations

import csv
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Files that operating systems drop into folders; never images, never errors.
IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABELS_CSV = "stage1_train_labels.csv"
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def is_ignored(path: str | Path) -> bool:
    """True for OS clutter (``.DS_Store``, ``Thumbs.db``) and hidden files like macOS' ``._x.png``."""
    name = os.path.basename(path)
    return name in IGNORED_NAMES or name.startswith(".")


def _decode(path: str | Path) -> np.ndarray:
    """Decode one image file fully, turning every decoding failure into a ``ValueError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a DataLoader worker
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            mode, arr = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError:
        raise ValueError(
            f"{path}: the image has more pixels than Pillow decodes without a warning against decompression bombs "
            f"({Image.MAX_IMAGE_PIXELS:,} x 2); if it is a real image, cut it into tiles (Fiji: Image > Stacks > "
            "Tools > Montage to Stack) or save a downscaled copy"
        ) from None
    except _DECODE_ERRORS as e:
        raise ValueError(
            f"{path}: cannot decode this image ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated: download it again, or delete its image folder"
        ) from None
    if mode.startswith("I;16") or mode == "I":
        arr = (arr.astype(np.uint32) >> 8).astype(np.uint8)  # the high byte, see the module docstring
    elif mode == "F":
        raise ValueError(f"{path}: floating-point images are not supported; save it as 8- or 16-bit PNG")
    return arr


def read_image(path: str | Path) -> np.ndarray:
    """Image file -> uint8 ``(H, W, 3)`` in [0, 255] (see the module docstring for the rules)."""
    arr = _decode(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.shape[2] == 2:  # grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    else:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def read_mask(path: str | Path) -> np.ndarray:
    """Mask file -> bool ``(H, W)``, True where any colour channel is > 0 (alpha ignored)."""
    arr = _decode(path)
    if arr.ndim == 3:
        arr = arr[:, :, :1] if arr.shape[2] == 2 else arr[:, :, :3]
        arr = arr.max(axis=2)
    return arr > 0


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise
    except _DECODE_ERRORS as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or delete it") from None
    return h, w


def decode_masks(image_shape: tuple[int, int], masks: list[Path] | None = None, rles: list[tuple[int, str]] | None = None,
                 csv_path: Path | None = None) -> np.ndarray:
    """Full-resolution instance labels uint16 ``(H, W)`` from mask PNGs or ``(csv line, rle)`` pairs.

    Nucleus ``k`` (1-based) is the k-th mask file in name order, or the k-th CSV row; where masks
    overlap the later one wins. Raises ``ValueError`` for a mask whose size is not the image's and
    for a malformed run-length string (naming the CSV line).
    """
    from ..rle import decode as rle_decode

    labels = np.zeros(image_shape, dtype=np.uint16)
    items = masks if masks is not None else rles or []
    if len(items) > np.iinfo(np.uint16).max:
        raise ValueError(f"{len(items)} nuclei in one image; at most 65535 are supported")
    for k, item in enumerate(items, start=1):
        if masks is not None:
            m = read_mask(item)
            if m.shape != tuple(image_shape):
                raise ValueError(
                    f"{item}: mask is {m.shape[0]}x{m.shape[1]} (HxW) but its image is "
                    f"{image_shape[0]}x{image_shape[1]}; every mask must have its image's size"
                )
        else:
            line, rle = item
            try:
                m = rle_decode(rle, image_shape)
            except ValueError as e:
                raise ValueError(f"{csv_path}, line {line}: {e}. Fix or delete that row") from None
        labels[m] = k
    return labels


# The competition's folder layout.


@dataclass(frozen=True)
class TrainItem:
    """One image folder: its id (the folder name), image file and mask files (name order)."""

    id: str
    image: Path
    masks: tuple[Path, ...]


def resolve_train_dir(data_dir: str | Path) -> Path:
    """``data_dir`` itself, or its ``stage1_train`` subfolder when it has one."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise FileNotFoundError(f"data_dir {d} does not exist; point it at the competition's stage1_train folder (or the folder holding it)")
    return d / "stage1_train" if (d / "stage1_train").is_dir() else d


def _images_in(folder: Path) -> list[Path]:
    # os.scandir: the file type comes with the listing, no stat per file (30k masks in the full set).
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.is_file() and not is_ignored(e.name)
                           and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / n for n in names]


def scan_train_dir(train_dir: Path, with_masks: bool = True) -> list[TrainItem]:
    """Every ``<id>/images/<id>.png`` (and ``<id>/masks/*``) under ``train_dir``, sorted by id."""
    dirs = sorted(p for p in train_dir.iterdir() if p.is_dir() and not is_ignored(p))
    if not dirs:
        raise FileNotFoundError(
            f"{train_dir} holds no image folders; expected the competition's layout "
            "<id>/images/<id>.png with <id>/masks/*.png (the stage1_train folder of the download)"
        )
    items = []
    for d in dirs:
        image = d / "images" / f"{d.name}.png"
        if not image.is_file():
            raise FileNotFoundError(f"{image} not found: every image folder needs images/<folder name>.png; add it or remove {d}")
        masks = tuple(_images_in(d / "masks")) if with_masks else ()
        items.append(TrainItem(d.name, image, masks))
    return items


def list_images(folder: str | Path) -> list[tuple[str, Path]]:
    """``(id, path)`` of every image in ``folder``, sorted by id, for prediction.

    Accepts the competition's ``stage1_test`` layout (``<id>/images/<id>.png``, id = folder
    name) and plain folders of image files (id = file name without suffix), or a mix.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; pass a folder of images or the competition's stage1_test folder")
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if is_ignored(p):
            continue
        if p.is_dir():
            path = p / "images" / f"{p.name}.png"
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: in the competition's layout every folder holds images/<folder name>.png; add it or remove {p}")
            id_ = p.name
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            id_, path = p.stem, p
        else:
            continue
        if id_ in found:
            raise ValueError(f"two images with the id {id_!r} in {folder}: {found[id_]} and {path}; rename one")
        found[id_] = path
    if not found:
        raise FileNotFoundError(f"{folder} holds no images; expected <id>/images/<id>.png folders or image files ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(found.items())


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
