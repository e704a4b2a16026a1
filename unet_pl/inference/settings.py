"""Everything inference needs to know besides the weights, in one value that travels with the model.

A checkpoint's ``hyper_parameters`` hold how the network was trained (resolution, side, head)
and, since the end of its training, the post-processing chosen on its validation split
(``unet_pl.inference.tune``). ``Settings.from_hparams`` reads them; flags override them with
``Settings.replace``. Checkpoints written before a setting existed get the value they were
always predicted with, so they predict as before.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..geometry import DEFAULT_RESOLUTION, DEFAULT_SIZE, HEADS, check_resolution, check_side
from ..data.readers import BACKGROUNDS, INTENSITIES
from ..precision import check_precision
from .postprocess import SPLITS
from .scale import AUTO_BAND, check_scale
from .tiling import check_tile
from .tta import TTAS

#: The watershed seed threshold of checkpoints that saved none (trained before tuning existed),
#: by resolution, each chosen on the training images' validation split at the time: native
#: 0.1 to 0.3 scored within 0.003 of each other; resized boundaries drawn at 128 px and scaled
#: up are thick, and only 0.5 left cores.
LEGACY_SEED_THRESHOLDS = {"native": 0.15, "resize": 0.5}
#: The keys of ``LitUNet(postprocess=...)``, the tuned part of the settings.
TUNED_KEYS = ("threshold", "seed_threshold", "min_size")
#: ``postprocess`` may also hold, under this key, the ``TUNED_KEYS`` chosen with ``split_concave`` on
#: (``unet_pl.inference.tune``): ``Settings.replace(split_concave=True)`` takes them.
CUT_KEY = "split_concave"


#: Below this mean validation score of the chosen post-processing the model finds almost no nuclei
#: on its own validation images: training, tuning and prediction say so.
UNTRAINED_SCORE = 0.05


def untrained_warning(score: float) -> str:
    """What to say about a model whose tuned post-processing scored ``score`` (< UNTRAINED_SCORE)."""
    return (f"the best post-processing scores only {score:.3f} on the run's validation images: the model finds almost "
            "no nuclei there, and what it finds is mostly noise. Train longer (more epochs), on more images, or check "
            "that the masks mark the nuclei of these images")


@dataclass(frozen=True)
class Settings:
    """How an image becomes nuclei with one network.

    Geometry (how the network was trained): ``resolution`` "resize" | "native"; ``img_size`` the
    training side (resize: the square every image is squashed to); ``out_channels`` 1 (mask), 2
    (mask + boundary) or 3 (mask + boundary + distance).
    Post-processing: ``threshold`` foreground probability; ``split`` "components" (8-connected
    blobs, the notebook) or "watershed" (needs the boundary channel), None: watershed when there
    is a boundary; ``seed_threshold`` watershed seeds are foreground pixels whose boundary
    probability is below it (with a distance output, also whose depth is above 1 - 2 x it:
    ``postprocess.ridge``); ``min_size`` drop nuclei under this many pixels (at the image's own
    size); ``fill_holes`` fill holes inside nuclei; ``min_relative_size`` drop nuclei under this
    fraction of the image's median nucleus area; ``min_probability`` drop nuclei whose mean
    foreground probability is under it (both 0: off); ``split_concave`` cut nuclei shaped like
    touching ones (solidity under 0.92, ``postprocess.split_concave``).
    Tuned values (from the checkpoint; None: not chosen): ``tuned`` the threshold, seed threshold
    and minimum size chosen on validation without the cut, ``tuned_for_cut`` the same chosen with
    it. ``replace`` switching ``split_concave`` moves each of the three that still holds the model's
    value for the old state to its value for the new one; a value of one's own stays. The
    constructor takes every value as given.
    Run time: ``tta`` "none" | "flips" | "d4"; ``tile`` native images with a side above this go
    through in overlapping tiles; ``scale`` (native) each image resized by this factor before the
    network, or "auto" or "certainty": a factor chosen per image (``unet_pl.inference.scale``);
    ``precision`` the network's arithmetic: "32" float32, "bf16" bfloat16 autocast, "auto" (default)
    bfloat16 where the device computes it natively, else float32 (``unet_pl.precision``; on the
    grouped validation the two score the same, docs/accuracy.md).
    Reading (``unet_pl.data.readers``): ``channel`` the nuclear channel of multi-channel images
    (1-based), None: grey or RGB as stored; ``intensity`` "fixed", "percentile", "grey" or "hematoxylin", applied to
    uint8/uint16 arrays and files the same way as in training; ``background`` the grey rules' inversion: "auto"
    (as in training: an image whose stretched median is above half is inverted), "dark" (never: fluorescence,
    also crowded or overexposed fields), "bright" (always); not saved with the model.
    """

    resolution: str = DEFAULT_RESOLUTION
    img_size: int = DEFAULT_SIZE
    out_channels: int = 1
    threshold: float = 0.5
    split: str | None = None
    seed_threshold: float = 0.5
    min_size: int = 0
    fill_holes: bool = False
    min_relative_size: float = 0.0
    min_probability: float = 0.0
    split_concave: bool = False
    tta: str = "none"
    tile: int = 2048
    channel: int | None = None
    intensity: str = "fixed"
    scale: float | str = 1.0
    tuned: tuple[float, float, int] | None = None
    tuned_for_cut: tuple[float, float, int] | None = None
    precision: str = "auto"
    background: str = "auto"

    def __post_init__(self) -> None:
        check_resolution(self.resolution)
        check_side(self.img_size)
        if self.out_channels not in HEADS.values():
            raise ValueError(f"out_channels must be one of {sorted(set(HEADS.values()))}, got {self.out_channels}")
        for name in ("threshold", "seed_threshold", "min_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        for name in ("fill_holes", "split_concave"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} is True or False, got {getattr(self, name)!r}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")
        if not 0.0 <= self.min_relative_size < 1.0:
            raise ValueError(f"min_relative_size {self.min_relative_size} must lie in [0, 1): a fraction of the image's "
                             "median nucleus area")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.split == "watershed" and self.out_channels < 2:
            raise ValueError("the watershed split needs a boundary output: a model trained with head 'mask+boundary'")
        if self.tta not in TTAS:
            raise ValueError(f"unknown TTA {self.tta!r}; choose one of {', '.join(TTAS)}")
        check_tile(self.tile)
        if self.intensity not in INTENSITIES:
            raise ValueError(f"unknown intensity rule {self.intensity!r}; choose one of {', '.join(INTENSITIES)}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; choose one of {', '.join(BACKGROUNDS)}")
        if self.background != "auto" and self.intensity not in ("grey", "hematoxylin"):
            raise ValueError(f"background {self.background} chooses the grey rule's inversion, and the images are read "
                             f"with the {self.intensity} rule, which never inverts; leave background out (or read them "
                             "with the grey rule the model was trained with)")
        if self.channel is not None and self.channel < 1:
            raise ValueError(f"channel counts from 1 (as Fiji does), got {self.channel}")
        check_precision(self.precision)
        object.__setattr__(self, "scale", check_scale(self.scale))
        if self.scale != 1.0 and self.resolution != "native":
            raise ValueError("scale resizes images for a native-resolution model; a resize-mode model squashes every "
                             "image to its square anyway")
        # Last: the user's own fields are checked above, so an error here is the checkpoint's stored choice.
        for name in ("tuned", "tuned_for_cut"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != len(TUNED_KEYS) or int(values[2]) != values[2]:
                raise ValueError(f"{name} is (threshold, seed_threshold, min_size), got {values!r}")
            try:
                dataclasses.replace(self, **dict(zip(TUNED_KEYS, values)), tuned=None, tuned_for_cut=None)  # the same checks
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            object.__setattr__(self, name, (float(values[0]), float(values[1]), int(values[2])))

    @property
    def watershed(self) -> bool:
        return (self.split or ("watershed" if self.out_channels > 1 else "components")) == "watershed"

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> Settings:
        """A LitUNet's (or its checkpoint's) hyperparameters -> its settings (see the module docstring)."""
        resolution = hparams.get("resolution") or DEFAULT_RESOLUTION
        tuned = dict(hparams.get("postprocess") or {})
        cut = tuned.pop(CUT_KEY, None)
        if cut is not None and not isinstance(cut, Mapping):
            raise ValueError(f"postprocess' {CUT_KEY} holds {', '.join(TUNED_KEYS)} chosen with the cut, got {cut!r}")
        for keys in (tuned, cut or {}):
            unknown = set(keys) - set(TUNED_KEYS)
            if unknown:
                raise ValueError(f"postprocess has unknown keys {sorted(unknown)}; known: {', '.join(TUNED_KEYS)}, {CUT_KEY}")
        tuned.setdefault("seed_threshold", LEGACY_SEED_THRESHOLDS[resolution])
        if cut is not None:
            if set(cut) != set(TUNED_KEYS):
                raise ValueError(f"postprocess' {CUT_KEY} needs {', '.join(TUNED_KEYS)}, got {sorted(cut)}")
            tuned["tuned_for_cut"] = tuple(cut[k] for k in TUNED_KEYS)
            tuned["tuned"] = tuple(tuned.get(k, default) for k, default in zip(TUNED_KEYS, (0.5, None, 0)))
        return cls(resolution=resolution, img_size=int(hparams.get("img_size") or DEFAULT_SIZE),
                   out_channels=int(hparams.get("out_channels") or 1), channel=hparams.get("channel"),
                   intensity=hparams.get("intensity") or "fixed", **tuned)

    def decoded(self) -> Settings:
        """These settings for images that were read with them already (uint8 RGB from ``read_image``
        with this channel and intensity): nothing is applied twice."""
        return dataclasses.replace(self, channel=None, intensity="fixed", background="auto")

    def replace(self, **overrides: Any) -> Settings:
        """A copy with every override that is not None applied (flags left unset keep the model's value).

        Switching ``split_concave`` on (off) with a model that has ``tuned_for_cut``: the threshold,
        seed threshold and minimum size that this call leaves unset and that hold the model's value
        without (with) the cut take its value with (without) it; values of one's own stay."""
        given = {k: v for k, v in overrides.items() if v is not None}
        cut = bool(given.get("split_concave", self.split_concave))
        if cut != self.split_concave and self.tuned is not None and self.tuned_for_cut is not None:
            before, after = (self.tuned, self.tuned_for_cut) if cut else (self.tuned_for_cut, self.tuned)
            for key, old, new in zip(TUNED_KEYS, before, after):
                if key not in given and getattr(self, key) == old:
                    given[key] = new
        return dataclasses.replace(self, **given)

    @property
    def cut_tuned(self) -> bool:
        """Whether the cut is on with a model whose tuner chose values for it (flags may replace some)."""
        return self.split_concave and self.tuned_for_cut is not None

    def describe(self) -> str:
        """One line for the user: what prediction will do."""
        how = (f"watershed (seed threshold {self.seed_threshold:g})" if self.watershed else "connected components")
        geo = (f"images resized to {self.img_size} px squares" if self.resolution == "resize" else
               "images at their own size" if self.scale in (1.0, "auto", "certainty") else f"images resized by {self.scale:g}")
        geo += f" in tiles of at most {self.tile} px" if self.resolution == "native" and self.tile != 2048 else ""
        extras = [f"min size {self.min_size} px"] if self.min_size else []
        extras += ["holes filled"] if self.fill_holes else []
        extras += [f"nuclei under {self.min_relative_size:g} x the median area dropped"] if self.min_relative_size else []
        extras += [f"nuclei under mean probability {self.min_probability:g} dropped"] if self.min_probability else []
        extras += ["concave nuclei cut in two or more"] if self.split_concave else []
        extras += [f"TTA {self.tta}"] if self.tta != "none" else []
        extras += [f"scale auto (images whose median nucleus is below {AUTO_BAND[0]:g} px enlarged to it, above {AUTO_BAND[1]:g} px shrunk to it)"] if self.scale == "auto" else []
        extras += ["scale certainty (each image at 1 or 0.5, whichever the network is surer of)"] if self.scale == "certainty" else []
        extras += [f"channel {self.channel}"] if self.channel is not None else []
        inverted = {"auto": "bright backgrounds inverted", "dark": "never inverted (background dark)",
                    "bright": "always inverted (background bright)"}[self.background]
        extras += {"percentile": ["intensity: per-image percentiles"],
                   "grey": [f"intensity: grey, per-image percentiles, {inverted}"],
                   "hematoxylin": [f"intensity: grey, per-image percentiles, {inverted}, "
                                   "stained tissue as its haematoxylin"]}.get(self.intensity, [])
        return f"{geo}, threshold {self.threshold:g}, {how}" + "".join(f", {e}" for e in extras)
