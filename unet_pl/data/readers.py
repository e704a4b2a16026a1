"""Microscopy files in: TIFF and OME-TIFF through tifffile, PNG, JPEG and BMP through Pillow.
Axes from the file's metadata, channels picked by the user, bit depths kept until the intensity
rule turns them into the network's uint8.

    read_raw(path, channel)      -> uint8 or uint16 (H, W, C): C = 3 (RGB) or 1 (grey, or the chosen channel)
    to_rgb8(raw, intensity)      -> uint8 (H, W, 3), by one of INTENSITIES (read_levels: and whether it inverted):
        "fixed"       the notebook's rule: 8-bit as is, 16-bit keeps its high byte (v >> 8). An image
                      that uses less than 1/16 of its type's range (12-bit camera data in a 16-bit
                      file: 0-4095) is read nearly black: a warning names it and the flag.
        "percentile"  per image, the 1st and 99.8th percentiles of all its values go to 0 and 255
                      (clipped): what StarDist and Cellpose do, so that every camera, bit depth and
                      exposure looks alike to the network.
        "grey"        every kind of image made to look like fluorescence: the channels averaged
                      to grey, stretched like "percentile", and inverted when the background is
                      bright (the stretched image's median above 0.5: brightfield, H&E and other
                      stains on white), so that nuclei are always bright on dark (``background``
                      "dark" never inverts, "bright" always: BACKGROUNDS). Issue 15. The
                      default of --mode instance. ``unet_pl.model.grey_input`` is the same in torch
                      (for bioimage.io packages), to the grey level.
        "hematoxylin" as "grey", except colour images on a bright background (H&E and other stained
                      tissue): the haematoxylin stain's amount from colour deconvolution
                      (scikit-image's ``rgb2hed``) in place of the inverted grey, stretched the same
                      way, so that nuclei are bright and cytoplasm dark whatever the stain's hue.
    read_label_image(path)       -> integer labels (H, W), values as stored (no bit-depth rule)

Channels (``channel``, 1-based as Fiji counts them): a file with one channel is grey, read as it
is whatever ``channel`` says (a folder may mix grey and multi-channel files); RGB(A) is
colour (alpha dropped) unless ``channel`` picks one of R, G, B; a file with a channel axis (an
ImageJ hyperstack, an OME-TIFF; 2 or more channels, 8- or 16-bit alike) needs ``channel``, and so
does a plain multi-page TIFF of 2 to 4 pages without ImageJ/OME metadata (channels or z-planes:
the error names both ways out). Z-stacks are refused with the way out (a projection or one
plane, saved as TIFF), time series with how to save each time point as an image of its own. A TIFF of
several images of one size (positions) is read as its first, with a warning.
"""
from __future__ import annotations

import logging
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..perf import bincount

log = logging.getLogger(__name__)

INTENSITIES = ("fixed", "percentile", "grey", "hematoxylin")
#: The grey rules' background (``to_rgb8``'s ``background``): "auto" inverts an image whose stretched median is
#: above half (brightfield, H&E), "dark" never inverts (fluorescence, also crowded or overexposed fields, whose
#: bright nuclei can cover more than half of it), "bright" always does.
BACKGROUNDS = ("auto", "dark", "bright")
#: What each rule does, in the words of train.py's and predict.py's --help.
INTENSITY_HELP = ("fixed: the notebook's rule (16-bit keeps its high byte; 12-bit data reads dark, with a warning); "
                  "percentile: each image stretched between its 1st and 99.8th percentiles; grey: channels averaged, "
                  "stretched the same way, bright backgrounds (brightfield, H&E) inverted; hematoxylin: as grey, but "
                  "colour tissue on white becomes its haematoxylin stain (colour deconvolution)")
#: Mean |R-G| + |G-B| (0..255 scale) above which an image is colour (here and in ``holdout``). Grey
#: images of the competition's set score < 1, the colour ones > 15: any value in between gives the same split.
COLOUR_THRESHOLD = 5.0
PERCENTILES = (1.0, 99.8)
TIFF_SUFFIXES = (".tif", ".tiff")
PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES
#: Microscope vendors' formats we do not read: named in the error, with the way out.
VENDOR_SUFFIXES = (".czi", ".nd2", ".lif", ".lsm", ".oib", ".oif", ".vsi", ".ims", ".mrxs", ".svs", ".ndpi", ".scn",
                   ".dv", ".zvi", ".lei", ".sld", ".ics", ".ids", ".stk")
#: Whole-slide scanners' formats among them (stained tissue: no nuclear channel to pick; a region is exported).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vsi")
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)


def check_suffix(path: Path) -> None:
    """``ValueError`` naming the file and the way out for formats we do not read."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return
    if suffix in SLIDE_SUFFIXES:
        raise ValueError(f"{path}: {suffix} whole-slide files are not read here; export a region at full resolution as "
                         "TIFF (QuPath: select a region, File > Export images... > Original pixels, TIFF) and predict that")
    if suffix in VENDOR_SUFFIXES:
        raise ValueError(f"{path}: {suffix} files are not read here; open it in Fiji (Bio-Formats) and save the "
                         "nuclear channel as TIFF (File > Save As > Tiff...)")
    raise ValueError(f"{path}: not an image format read here ({', '.join(IMAGE_SUFFIXES)}); save it as TIFF or PNG")


def read_raw(path: str | Path, channel: int | None = None) -> np.ndarray:
    """An image file -> uint8 or uint16 ``(H, W, C)``, C = 3 (RGB) or 1; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file: give one image's path, or for a folder of images "
                         "unet_pl.predict_folder(net, folder, csv, out_dir=...) (scripts/predict.py --data-dir FOLDER)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    check_suffix(path)
    arr, axes = _read_tiff(path) if path.suffix.lower() in TIFF_SUFFIXES else _read_pillow(path)
    arr = _integer(arr, path)
    return _pick_channel(arr, axes, channel, path)


def read_label_image(path: str | Path) -> np.ndarray:
    """An annotation file -> integer labels ``(H, W)`` exactly as stored (0 background). RGB files:
    each colour is one label, black the background (a label image saved in colour, one colour per
    nucleus, as Fiji's glasbey LUT or napari export it; a mask drawn in one colour is then binary).
    A JPEG's colours are not exact: foreground wherever a channel is above 0, as a binary mask."""
    raw = read_raw(path)
    if raw.shape[2] == 1:
        return raw[..., 0]
    if Path(path).suffix.lower() in (".jpg", ".jpeg"):  # lossy: no exact colours, so foreground where not black
        return (raw > 0).any(axis=2).astype(np.uint8)
    flat = raw.reshape(-1, raw.shape[2]).astype(np.int64)
    key = (flat[:, 0] << 32) | (flat[:, 1] << 16) | flat[:, 2]  # 16 bits a channel: one integer per colour
    colours, labels = np.unique(key, return_inverse=True)
    if colours[0] != 0:  # no black pixel: every colour is a nucleus
        labels = labels + 1
    out = labels.reshape(raw.shape[:2])
    return out.astype(np.uint16 if out.max(initial=0) <= 65535 else np.int64)


def percentiles(values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(values, qs)`` (its default linear interpolation, the same numbers) of uint8 or
    uint16 pixels, from their histogram: one counting pass instead of a partial sort of every pixel."""
    counts = np.cumsum(bincount(values, minlength=256))
    return ranked_percentiles(counts, np.arange(len(counts), dtype=np.float64), qs)


def ranked_percentiles(counts: np.ndarray, values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile`` of the pixels whose cumulative histogram is ``counts``, bin ``i`` holding
    the value ``values[i]`` (in the dtype numpy would see them in): numpy's ``_lerp`` step for step,
    the neighbours' difference in that dtype, the interpolation in float64."""
    n = int(counts[-1])

    def at(rank: int):  # the rank-th smallest value, counted from 0
        return values[int(np.searchsorted(counts, rank, side="right"))]

    out = []
    for q in qs:
        pos = (n - 1) * (q / 100.0)
        k = int(np.floor(pos))
        t = pos - k
        a, b = at(k), at(min(k + 1, n - 1))
        diff = float(b - a)
        out.append(float(b) - diff * (1 - t) if t >= 0.5 else float(a) + diff * t)
    return tuple(out)


def channel_mean(raw: np.ndarray) -> np.ndarray:
    """float32 ``(H, W)``: the mean of a uint8 or uint16 ``(H, W, C)`` image's channels,
    ``raw.astype(np.float32).mean(axis=2)`` bit for bit (fewer than 8 channels: their sums are whole
    numbers below 2**24, exact in float32 in any order, and one division rounds as numpy's does),
    without the float copy of every channel and numpy's slow reduction along the last axis: 10x
    faster on RGB."""
    raw = np.asarray(raw)
    if raw.ndim == 2:
        return raw.astype(np.float32)
    if raw.shape[2] >= 8:  # numpy sums 8 or more values pairwise
        return raw.astype(np.float32).mean(axis=2)
    out = raw[..., 0].astype(np.float32)
    for c in range(1, raw.shape[2]):
        np.add(out, raw[..., c], out=out, dtype=np.float32)
    out /= np.float32(raw.shape[2])
    return out


def to_rgb8(raw: np.ndarray, intensity: str = "fixed", name: str | Path = "image", warn: bool = True,
            background: str = "auto") -> np.ndarray:
    """``read_raw``'s array (or any uint8/uint16 ``(H, W)`` / ``(H, W, 1|3)``) -> uint8 ``(H, W, 3)``.
    ``warn``: the fixed rule's warning on dark 12-bit data (off where the fixed reading is only
    looked at, not trained on: the modality of a file that a model reads with another rule).
    ``background``: the grey rules' inversion, one of BACKGROUNDS."""
    return read_levels(raw, intensity, name, warn, background)[0]


def read_levels(raw: np.ndarray, intensity: str = "fixed", name: str | Path = "image", warn: bool = True,
                background: str = "auto") -> tuple[np.ndarray, bool | None]:
    """``to_rgb8``'s image and whether it was inverted (a bright background made dark; None for the
    rules that never invert: fixed, percentile)."""
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    if intensity not in INTENSITIES:
        raise ValueError(f"unknown intensity rule {intensity!r}; choose one of {', '.join(INTENSITIES)}")
    raw = np.asarray(raw)
    if raw.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{name}: {raw.dtype} pixels are not an image the network reads; save it as 8- or 16-bit")
    if raw.ndim == 2:
        raw = raw[:, :, None]
    inverted = None
    if intensity == "percentile":
        lo, hi = percentiles(raw, PERCENTILES)
        gain = 255.0 / max(float(hi - lo), 1e-6)
        # every possible value through the formula once, then one lookup per pixel (same numbers)
        lut = np.clip(np.rint((np.arange(np.iinfo(raw.dtype).max + 1, dtype=np.float64) - lo) * gain), 0, 255)
        out = lut.astype(np.uint8)[raw]
    elif intensity in ("grey", "hematoxylin"):
        levels = _grey_levels(raw, background) if raw.shape[2] < 8 else None
        if levels is not None and not (levels[1] and intensity == "hematoxylin" and is_colour(raw)):
            out, inverted = levels[0][:, :, None], levels[1]
            if warn and background == "auto" and not levels[1] and raw.shape[2] == 3 and _is_merge(raw[::4, ::4]):
                _warn_merge(name)  # (a background given is the user's reading of the image already)
        else:
            grey = channel_mean(raw)
            scaled = _stretch(grey)
            inverted = _inverts(float(np.median(scaled)), background)
            if inverted:  # bright background: dark nuclei become bright ones
                if intensity == "hematoxylin" and is_colour(raw):
                    from skimage.color import rgb2hed

                    scaled = _stretch(rgb2hed(raw)[..., 0].astype(np.float32))
                else:
                    scaled = 255.0 - scaled
            out = np.rint(scaled).astype(np.uint8)[:, :, None]
    else:
        top = np.iinfo(raw.dtype).max
        if warn and raw.size and int(raw.max()) < (top + 1) // 16:
            _warn_dark(name, int(raw.max()), 8 * raw.dtype.itemsize)
        out = (raw >> 8).astype(np.uint8) if raw.dtype == np.uint16 else raw.astype(np.uint8)
    return np.ascontiguousarray(np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out), inverted


#: Files named one by one in the fixed rule's dark-data warning before the rest are only counted.
DARK_NAMED = 3
_dark = {"said": 0}
_merge = {"said": 0}  # colour images on a dark background (``_warn_merge``)
_series: dict = {"said": 0, "paths": set()}  # TIFFs of several images (``_warn_series``)
_dark_lock = threading.Lock()


def reset_dark_warnings() -> None:
    """Start naming dark files and colour merges again (each prediction or cache build names its own first few)."""
    with _dark_lock:
        _dark["said"] = 0
        _merge["said"] = 0
        _series["said"] = 0
        _series["paths"].clear()


def _count(said: dict) -> int:
    """One more file of a kind that is named in a warning (``_dark``, ``_merge``): how many so far this run."""
    with _dark_lock:
        said["said"] += 1
        return said["said"]


def _warn_merge(name) -> None:
    """A colour image on a dark background is a fluorescence merge: the grey rule averages its stains."""
    said = _count(_merge)
    if said <= DARK_NAMED:
        log.warning("%s is a colour image on a dark background (a fluorescence merge?): its channels are averaged, so "
                    "every stain in it reads as nuclei; pass --channel N (channel=N) for the nuclear stain alone "
                    "(DAPI or Hoechst, usually blue: --channel 3). If it is stained tissue crowded with nuclei (H&E), it "
                    "was read as fluorescence: predict it with --background bright", name)
    if said == DARK_NAMED + 1:
        log.warning("further colour images on a dark background are not named one by one: --channel N picks the nuclear stain in all")


def _warn_series(path: Path, n: int) -> None:
    """A TIFF of several images of one size: only the first is read (named once per file, the first few files)."""
    with _dark_lock:
        if path in _series["paths"]:
            return
        _series["paths"].add(path)
    said = _count(_series)
    if said <= DARK_NAMED:
        log.warning("%s holds %d images of this size (series: the positions of a multi-position acquisition?); only "
                    "the first is read: save each as its own TIFF (Fiji: File > Import > Bio-Formats, 'Open all series', "
                    "then save each) to segment them all", path, n)
    if said == DARK_NAMED + 1:
        log.warning("further TIFFs holding several images are not named one by one: only the first image of each is read")


def _warn_dark(name, top: int, bits: int) -> None:
    said = _count(_dark)
    if said <= DARK_NAMED:
        log.warning("%s uses values up to %d of its %d-bit range: under the fixed rule it reads nearly black; "
                    "pass --intensity percentile (intensity='percentile') to stretch each image", name, top, bits)
    if said == DARK_NAMED + 1:
        log.warning("further files that read nearly black under the fixed rule are not named one by one "
                    "(12-bit camera data in 16-bit files, most likely): --intensity percentile reads them all")


def _grey_levels(raw: np.ndarray, background: str = "auto") -> tuple[np.ndarray, bool]:
    """The "grey" rule's uint8 ``(H, W)`` and whether it inverted, for fewer than 8 channels: the
    numbers of ``channel_mean``, ``_stretch``, ``np.median`` and ``np.rint`` below, from a histogram
    of the channels' whole-number sums and one lookup per pixel instead of float passes and partial
    sorts over every pixel (6x faster on a 2048 x 2048 image). Exact because the mean is a function
    of the sum, and the stretch a non-decreasing function of the mean."""
    c = raw.shape[2]
    sums = raw[..., 0].astype(np.uint16 if raw.dtype == np.uint8 else np.uint32)
    for k in range(1, c):
        np.add(sums, raw[..., k], out=sums)
    top = c * int(np.iinfo(raw.dtype).max)
    counts = np.cumsum(bincount(sums, minlength=top + 1))
    n = int(counts[-1])
    means = np.arange(top + 1, dtype=np.float32) / np.float32(c)  # channel_mean's float32 value of each sum
    lo, hi = ranked_percentiles(counts, means, PERCENTILES)
    scaled = np.clip((means.astype(np.float64) - lo) * (255.0 / max(float(hi - lo), 1e-6)), 0, 255)
    # np.median: the middle value, or the mean of the two middle ones (sorted by the sum, as the stretch keeps order)
    middle = [int(np.searchsorted(counts, r, side="right")) for r in sorted({(n - 1) // 2, n // 2})]
    median = scaled[middle[0]] if len(middle) == 1 else (scaled[middle[0]] + scaled[middle[1]]) / 2.0
    inverted = _inverts(median, background)
    lut = np.rint(255.0 - scaled if inverted else scaled).astype(np.uint8)
    return lut[sums], inverted


def _inverts(median: float, background: str) -> bool:
    """The grey rules' inversion: "auto" where the stretched image's median is above half (a bright background),
    "dark" never, "bright" always."""
    return bool(median > 127.5) if background == "auto" else background == "bright"


def _stretch(values: np.ndarray) -> np.ndarray:
    """Float ``(H, W)`` -> float in [0, 255]: the 1st and 99.8th percentiles to 0 and 255, clipped."""
    lo, hi = np.percentile(values, PERCENTILES)
    return np.clip((values - lo) * (255.0 / max(float(hi - lo), 1e-6)), 0, 255)


def _is_merge(raw: np.ndarray) -> bool:
    """A colour image whose signal is in two or more of its channels (each channel's 99.8th percentile above
    its 1st by at least a quarter of the strongest channel's span): stains merged, not one stain shown in a colour
    (a DAPI image exported as blue RGB, which the grey rule reads as well as --channel 3 would)."""
    if not is_colour(raw):
        return False
    lo, hi = np.percentile(raw.reshape(-1, raw.shape[2]).astype(np.float32), PERCENTILES, axis=0)
    span = hi - lo
    return int((span >= 0.25 * max(float(span.max()), 1e-6)).sum()) >= 2


def is_colour(raw: np.ndarray) -> bool:
    """Three channels that differ: mean |R - G| + |G - B| above ``COLOUR_THRESHOLD`` on a 0-255
    scale of the image's own brightest value (12-bit colour in a 16-bit file reads as 8-bit does)."""
    if raw.shape[2] != 3:
        return False
    f = raw.astype(np.float32) * (255.0 / max(int(raw.max()), 1))
    return float(np.abs(f[..., 0] - f[..., 1]).mean() + np.abs(f[..., 1] - f[..., 2]).mean()) > COLOUR_THRESHOLD


def read_image(path: str | Path, channel: int | None = None, intensity: str = "fixed") -> np.ndarray:
    """Image file -> uint8 ``(H, W, 3)`` in [0, 255]: ``to_rgb8(read_raw(path, channel), intensity)``."""
    return to_rgb8(read_raw(path, channel), intensity, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header, without decoding the pixels."""
    path = Path(path)
    check_suffix(path)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = dict(zip(series.axes, series.shape))
        except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, struct.error) as e:
            raise ValueError(f"{path}: not a readable TIFF ({type(e).__name__}: {e}); replace or delete it") from None
        return int(shape.get("Y", 0)), int(shape.get("X", 0))
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(path) from None
    except _PILLOW_ERRORS as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}); replace or delete it") from None
    return h, w


#: Length units of microscopy metadata, in micrometres.
_MICRONS = {"um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
            "micrometre": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def pixel_size(path: str | Path) -> float | None:
    """The pixel's width in micrometres from a TIFF's metadata: OME's ``PhysicalSizeX``, ImageJ's
    ``unit`` with the XResolution tag, or XResolution in pixels per centimetre; None without any
    (PNG, JPEG, a TIFF in inches: that is a screen's or scanner's dpi, not a microscope's), and None
    for metadata it cannot make sense of (best effort: the pixels are read elsewhere, with their errors)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        size, height = _pixel_size(path)
    except Exception:  # noqa: BLE001 -- broken XML, odd tags: no calibration, not a failed run
        return None
    if size is not None and height is not None and abs(height - size) > 0.01 * size:
        log.warning("%s: its pixels are not square (%.4g um wide, %.4g um high); unet_pl's outputs carry one pixel "
                    "size, so they carry none for this image (areas in pixels): resample it to square pixels in Fiji "
                    "(Image > Scale...) for calibrated results", path, size, height)
        return None
    return size if size is not None and PIXEL_SIZES[0] <= size <= PIXEL_SIZES[1] else None


#: Pixel widths (micrometres) taken as real: 0.1 nm to 1 cm.
PIXEL_SIZES = (1e-4, 1e4)


def _pixel_size(path: Path) -> tuple[float | None, float | None]:
    """The pixel's width and height in micrometres (None where not recorded in a unit we know)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            image = tifffile.xml2dict(tif.ome_metadata).get("OME", {}).get("Image", {})
            pixels = (image[0] if isinstance(image, list) else image).get("Pixels", {})

            def physical(axis: str) -> float | None:
                size, unit = pixels.get(f"PhysicalSize{axis}"), str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
                return float(size) * _MICRONS[unit.lower()] if size and unit.lower() in _MICRONS else None

            if physical("X") is not None:
                return physical("X"), physical("Y")
        page = tif.pages.first
        unit_tag = page.tags.get("ResolutionUnit")
        unit = str((tif.imagej_metadata or {}).get("unit", "")).lower()

        def width(name: str) -> float | None:
            tag = page.tags.get(name)
            if tag is None:
                return None
            num, den = tag.value
            per_unit = num / den if den else 0.0  # pixels per unit
            if not per_unit > 0:
                return None
            if unit in _MICRONS:
                return _MICRONS[unit] / per_unit
            if unit_tag is not None and int(unit_tag.value) == 3:  # RESUNIT.CENTIMETER
                return 1e4 / per_unit
            return None

        return width("XResolution"), width("YResolution")


def _too_many_pixels(path: Path) -> ValueError:
    """Pillow's decompression-bomb refusal, said as what it is for a real image: too large, not corrupt."""
    return ValueError(
        f"{path}: the image has more pixels than Pillow decodes without a warning against decompression bombs "
        f"({Image.MAX_IMAGE_PIXELS:,} x 2); if it is a real image, cut it into tiles (Fiji: Image > Stacks > "
        "Tools > Montage to Stack) or save a downscaled copy")


def _read_pillow(path: Path) -> tuple[np.ndarray, str]:
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a DataLoader worker
            if im.mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif im.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("L" if im.mode == "1" else "RGB")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(path) from None
    except _PILLOW_ERRORS as e:
        raise DamagedFile(f"{path}: cannot decode this image ({type(e).__name__}: {e}); the file is corrupt or "
                          "truncated: copy or export it again, or move it out of the folder") from None
    if arr.ndim == 2:
        return arr, "YX"
    if arr.shape[2] == 2:  # grey + alpha
        return arr[:, :, 0], "YX"
    return arr, "YXS"


class DamagedFile(ValueError):
    """A file that cannot be read because it is corrupt or cut off (not because of a setting):
    ``predict.py`` skips it whatever its place in the folder."""


#: What tifffile logs (instead of raising) when a file's structure points past its end or into
#: garbage: a cut-off copy or a damaged file. tifffile then reads what it can, e.g. the first page
#: of a three-channel hyperstack as a grey image; these files are refused instead.
DAMAGED_TIFF = ("invalid page offset", "invalid offset to page", "invalid next page", "invalid value offset",
                "corrupted tag list", "metadata invalid or corrupted", "suspicious number of tags")
_COMPLAINTS: dict[int, list[str]] = {}  # thread -> what tifffile logged while it read a file there


class _TiffComplaints(logging.Filter):
    """On tifffile's logger: records logged while this module reads a file on the same thread are
    kept for ``_read_tiff`` (and not printed: its one-line error says it); others pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        kept = _COMPLAINTS.get(record.thread)
        if kept is None:
            return True
        kept.append(record.getMessage())
        return False


_TIFF_FILTER = _TiffComplaints()


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    logger = logging.getLogger("tifffile")
    if _TIFF_FILTER not in logger.filters:
        logger.addFilter(_TIFF_FILTER)
    complaints = _COMPLAINTS[threading.get_ident()] = []
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, arr = series.axes, series.asarray()
            # more images of the first one's size (positions of a multi-position acquisition; not a slide's
            # thumbnail, label or pyramid levels, which are smaller)
            alike = sum(_plane(s) == _plane(series) for s in tif.series[1:])
            page = series.keyframe
            grey_samples = page.photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE)
            alpha = [x in (tifffile.EXTRASAMPLE.ASSOCALPHA, tifffile.EXTRASAMPLE.UNASSALPHA) for x in page.extrasamples]
            size = tif.filehandle.size
            short = any(o + n > size for p in series.pages if p is not None
                        for o, n in zip(getattr(p, "dataoffsets", ()), getattr(p, "databytecounts", ())))
    except MemoryError:
        raise ValueError(f"{path}: too large to read into memory; cut it into tiles and save them as TIFF") from None
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, KeyError, TypeError, RuntimeError,
            zlib.error, struct.error, ImportError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        if "imagecodecs" in first or isinstance(e, ImportError):  # tifffile decodes LZW, JPEG, zstd... through it
            import importlib.util

            how = ("which is missing here: pip install imagecodecs (unet_pl depends on it: pip install -e . installs "
                   "it)") if importlib.util.find_spec("imagecodecs") is None else (
                   "and the imagecodecs installed here lacks that codec: pip install --upgrade imagecodecs")
            raise ValueError(f"{path}: its compression needs the imagecodecs package ({first}), {how}, or save the "
                             "image again from Fiji as uncompressed TIFF") from None
        raise DamagedFile(f"{path}: this TIFF is cut off or damaged, or in a layout tifffile does not know "
                          f"({type(e).__name__}: {first}); copy it again from the original, or save it again from "
                          "Fiji as TIFF") from None
    finally:
        _COMPLAINTS.pop(threading.get_ident(), None)
    damage = next((m for m in complaints if any(k in m for k in DAMAGED_TIFF)), None)
    if damage is not None or short:
        said = damage.split("> ", 1)[-1][:120] if damage else "its pixel data run past the end of the file"
        said = said.removeprefix("raised ")
        raise DamagedFile(f"{path}: this TIFF is cut off or damaged ({said}), so only part of it could be read; copy "
                          "it again from the original, or save it again from Fiji as TIFF")
    if alike:
        _warn_series(path, alike + 1)
    if grey_samples and "S" in axes:
        # Samples of a grey pixel are not R, G and B: grey + alpha is the grey, anything else is channels
        if len(alpha) == 1 and alpha[0] and arr.shape[axes.index("S")] == 2:
            arr, axes = np.take(arr, 0, axis=axes.index("S")), axes.replace("S", "")
        else:
            axes = axes.replace("S", "C")
    # Drop axes of length 1; what is left must be Y, X and at most one channel axis (C or S), or,
    # in a file without ImageJ/OME metadata, a few planes of unknown meaning (Q/I: channels or z?).
    keep = [i for i, n in enumerate(arr.shape) if n > 1 or axes[i] in "YX"]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    unnamed = len(axes) == 3 and axes[0] in "QI" and axes[1:] == "YX" and arr.shape[0] <= MAX_UNNAMED_CHANNELS
    if unnamed:
        axes = "Q" + axes[1:]  # _pick_channel asks which plane holds the nuclei
    extra = [a for a in axes if a not in "YXCS" and not (unnamed and a == "Q")]
    if extra:
        sizes = ", ".join(f"{arr.shape[axes.index(a)]} along {_AXIS_NAMES.get(a, a)}" for a in extra)
        if "T" in extra:  # a projection over time merges nuclei that moved: each time point is an image
            first = [step for step, there in (
                ("keep the nuclear channel (Image > Duplicate..., that channel, all frames)", any(a in "CSQ" for a in axes)),
                ("project each time point's planes (Image > Stacks > Z Project..., Max Intensity, All time frames)",
                 "Z" in extra)) if there]
            raise ValueError(f"{path}: a time series ({sizes}; axes {axes}), not one 2-D image; segment each time point "
                             "as an image of its own: in Fiji, " + "".join(f"first {f}, then " for f in first) +
                             "File > Save As > Image Sequence... (TIFF) into one folder, and predict that folder")
        raise ValueError(f"{path}: a stack ({sizes}; axes {axes}), not one 2-D image; make a projection or pick one "
                         "plane in Fiji (Image > Stacks > Z Project... with Max Intensity, or Image > Duplicate... one "
                         "slice) and save it as TIFF")
    if sum(a in "CSQ" for a in axes) > 1:
        raise ValueError(f"{path}: both channel and sample axes ({axes}); save the nuclear channel alone as TIFF")
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path}: no image plane in its axes ({axes}); save it again from Fiji as TIFF")
    order = [axes.index("Y"), axes.index("X")] + [i for i, a in enumerate(axes) if a in "CSQ"]
    arr = np.transpose(arr, order)
    return arr, "YX" + "".join(a for a in axes if a in "CSQ")


def _plane(series) -> tuple[int, ...]:
    """A tifffile series' (height, width), from its axes (its shape's last two where it names no Y and X)."""
    axes = series.axes
    if "Y" in axes and "X" in axes:
        return series.shape[axes.index("Y")], series.shape[axes.index("X")]
    return tuple(series.shape[-2:])


#: Planes of a TIFF without axes metadata that ``channel`` may pick from (more: a stack).
MAX_UNNAMED_CHANNELS = 4

_AXIS_NAMES = {"Z": "z (planes)", "T": "t (time points)", "Q": "an unnamed axis", "I": "an image sequence"}


def _integer(arr: np.ndarray, path: Path) -> np.ndarray:
    """uint8/uint16 kept; other integer types converted when their values fit; floats holding whole
    numbers only (a label image or a camera's counts saved as 32-bit float by Fiji or QuPath) taken
    as those integers; other floats refused."""
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if np.issubdtype(arr.dtype, np.floating) and arr.size and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return _integer(arr.astype(np.int64), path)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.uint16 if hi > 255 or arr.dtype.itemsize > 1 else np.uint8)
        if lo >= 0 and arr.ndim == 2:
            return arr  # a label image with more than 65,535 nuclei: kept for read_label_image
        raise ValueError(f"{path}: {arr.dtype} values from {lo} to {hi} do not fit 16 bits; save it as 8- or 16-bit TIFF")
    raise ValueError(f"{path}: {arr.dtype} pixels with fractions (deconvolved or processed data, or an Average Intensity "
                     "projection: Max Intensity keeps whole numbers) are not read; save "
                     "it as an 8- or 16-bit TIFF (Fiji: Image > Type > 16-bit; for a label image first turn off "
                     "Edit > Options > Conversions > Scale when converting, which would renumber its nuclei)")


def _pick_channel(arr: np.ndarray, axes: str, channel: int | None, path: Path) -> np.ndarray:
    if arr.ndim == 2:  # grey: its one channel is the nuclear one, whatever --channel a mixed folder needs
        return arr[:, :, None]
    n = arr.shape[2]
    # Colour is what a file stores as samples of one pixel (S: RGB, RGBA). Channels (C, an ImageJ
    # hyperstack or OME) are separate stains in any bit depth: three of them are not R, G and B.
    colour = axes.endswith("S") and n in (3, 4)
    if channel is None:
        if colour:
            return arr[:, :, :3]
        if axes.endswith("Q"):
            raise ValueError(f"{path}: {n} planes of unknown meaning (no ImageJ or OME metadata): if they are channels, "
                             f"pass --channel N (1 to {n}) for the nuclear one; if they are z-planes, make a projection "
                             "in Fiji (Image > Stacks > Z Project...) and save it as TIFF")
        also = (" (if they are the red, green and blue of one colour image, save it as RGB: Fiji's Image > Type > "
                "RGB Color)") if n == 3 else ""
        raise ValueError(f"{path}: has {n} channels; pass --channel N (1 to {n}, as Fiji numbers them) to pick the "
                         f"nuclear stain (channel= in Python){also}")
    if not 1 <= channel <= n:
        raise ValueError(f"{path}: has {n} channels; --channel must be 1 to {n}, got {channel}")
    return arr[:, :, channel - 1:channel]


