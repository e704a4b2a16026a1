"""How an image meets the network, decided once: the resolution mode, the side, the head, and the
notebook's resize with its inverse. numpy and scikit-image only; the data module, the LightningModule
and inference all read these names from here.

Resolutions:
    "resize"  every image is squashed to an ``img_size`` square (the notebook), and the network's
              probabilities are resized back to the image's own size.
    "native"  images keep their size: training sees random ``img_size`` crops, prediction sees
              each image whole (padded to a multiple of 16, in tiles when large).
So ``img_size`` is always the side of the squares the network trains on.

Heads (the U-Net body is the seed's; only the 1x1 head's channel count changes):
    "mask"           1 channel: foreground (the notebook)
    "mask+boundary"  2 channels: foreground, each nucleus' boundary (``unet_pl.data.targets``)
    "mask+boundary+distance"  3 channels: also each pixel's distance to its nucleus' edge, divided
                     by the largest in that nucleus (1 at its centre; StarDist's object probability;
                     ``unet_pl.data.targets.distances``)

The notebook's resize (on the scikit-image of early 2018, whose ``resize`` did not blur first):
``resize(x, (S, S), order=1, mode="constant", preserve_range=True, anti_aliasing=False)``;
images are then cast to uint8 by truncation (the notebook assigned floats into a uint8 array),
masks keep every pixel > 0. Today's default blurs before downsampling, and the blurred mask
cast to bool dilates every nucleus (15.0% foreground at full resolution becomes 24.7% at
128x128, against 16.5% without the blur), so ``anti_aliasing=False`` is not optional here.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .model import DIVISOR, nearest_valid_size

RESOLUTIONS = ("resize", "native")
HEADS = {"mask": 1, "mask+boundary": 2, "mask+boundary+distance": 3}
#: What a boundary head's boundary output learns: each nucleus' rim, or the rim and where nuclei touch.
BOUNDARY_TARGETS = ("ring", "ring+contact")
#: The defaults a model falls back on when it was never given a side or a resolution (and that
#: checkpoints from before these settings existed were trained with).
DEFAULT_RESOLUTION, DEFAULT_SIZE = "resize", 128
#: The settings a LitUNet and a NucleiDataModule both hold, which must agree for one training run:
#: how images meet the network, and how their files are read (the channel, the intensity rule).
SHARED_KEYS = ("resolution", "img_size", "head", "channel", "intensity")
#: The keys prediction needs the data module to agree on: how files are read (the geometry and
#: head of prediction are the model's own).
READING_KEYS = ("channel", "intensity")


def agreed_keys(predicting: bool) -> tuple[str, ...]:
    """The keys a model and its data module must agree on: all ``SHARED_KEYS`` to train, validate
    and test; ``READING_KEYS`` to predict."""
    return READING_KEYS if predicting else SHARED_KEYS


def head_channels(head: str) -> int:
    """The output channels of ``head``; ``ValueError`` naming the choices otherwise."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
    return HEADS[head]


def check_resolution(resolution: str) -> str:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    return resolution


def check_side(side: Any, name: str = "img_size") -> int:
    """``side`` as an int if it is a positive multiple of 16, else ``ValueError`` with the nearest good value."""
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < DIVISOR or side % DIVISOR:
        try:
            hint = f"; try {nearest_valid_size(max(int(side), 1))}"
        except (TypeError, ValueError):
            hint = ""
        raise ValueError(f"{name} must be a positive multiple of {DIVISOR} (the U-Net pools four times), got {side!r}{hint}")
    return int(side)


def reconcile(model: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """The model's values for ``SHARED_KEYS`` once it meets a data module's.

    A model value of None means "take the data module's" (a model built without a side or a
    resolution trains at whatever it is fed). Any other difference is a mistake: ``ValueError``
    naming each key and both values, so it surfaces before the first step and not as a checkpoint
    that predicts differently from how it was trained.
    """
    taken, clashes = {}, []
    for key in SHARED_KEYS:
        if key not in data:
            continue
        mine, theirs = model.get(key), data[key]
        if mine is None:
            taken[key] = theirs
        elif mine != theirs:
            clashes.append(f"{key}: model {mine!r}, data module {theirs!r}")
    if clashes:
        hint = ("; or leave the model's resolution, img_size, channel and intensity unset (None) to take the data module's"
                if any(not c.startswith("head") for c in clashes) else "")
        raise ValueError("the model and the data module disagree on " + "; ".join(clashes) +
                         ". Build both with the same values" + hint)
    return taken


# The notebook's resize and its inverse.


def _notebook_resize(x: np.ndarray, shape: tuple[int, int], order: int = 1) -> np.ndarray:
    from skimage.transform import resize

    return resize(x, shape, order=order, mode="constant", preserve_range=True, anti_aliasing=False)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> uint8 ``(size, size, 3)``: bilinear, no blur, truncated (the notebook)."""
    return _notebook_resize(image, (size, size)).astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """bool ``(H, W)`` -> bool ``(size, size)``: bilinear without blur, any value > 0 is foreground.

    Resizing the union once equals the notebook's resize-each-mask-then-max: bilinear weights
    are non-negative, so a pixel is > 0 exactly when some mask has a foreground pixel under it.
    """
    return _notebook_resize(mask.astype(np.uint8), (size, size)) > 0


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """int ``(H, W)`` instance labels -> same dtype ``(size, size)``, nearest neighbour.

    Nuclei smaller than a resized pixel can vanish; the score computed on these labels is the
    score at training resolution, not the competition's full-resolution one.
    """
    return _notebook_resize(labels, (size, size), order=0).astype(labels.dtype)


def resize_back(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The inverse of ``resize_image`` for the network's output: probabilities ``(C, S, S)`` (or
    ``(S, S)``) -> ``(C, H, W)`` (or ``(H, W)``), bilinear without blur, each channel on its own,
    as the notebook resized its predictions (float64, as scikit-image returns it)."""
    prob = np.asarray(prob)
    if prob.ndim == 3:
        return np.stack([_notebook_resize(p, tuple(size)) for p in prob])
    return _notebook_resize(prob, tuple(size))
