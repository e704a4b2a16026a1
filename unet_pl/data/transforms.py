"""Paired image/mask augmentation for training (albumentations). Validation, test and predict never augment.

Presets (``NucleiDataModule(augment=...)``, ``train.py --augment``):
    "none":    no augmentation, the notebook's training.
    "default": horizontal and vertical flips, 90-degree rotations (the dihedral group a
               microscope image has no preferred orientation in), and mild brightness and
               contrast jitter (+-10%). Geometry moves image and mask together; the jitter
               touches the image only.
    "colour":  "default" and, for stains not in the training set, on the image only: one of a
               hue/saturation shift over the whole colour circle, a channel shuffle or grey
               (70% of crops); gamma 0.7-1.5 (30%). Grey images stay grey (a hue shift or a
               shuffle of equal channels changes nothing): for them, gamma only. Inversion (dark
               nuclei made bright and the reverse, 25% of crops) was tried and left out: on the
               grouped validation's first fold it held the validation score near 0.37 where the
               recipe reached 0.50 (docs/accuracy.md).
    "scale":   "default" and nuclei at another magnification: each training crop is cut at a
               random side between ``crop / 1.5`` and ``crop / 0.67`` and resized to ``crop``
               (``ZOOM``), so the network sees every nucleus between 0.67x and 1.5x its size.
               Native resolution only (``crop_transform``): a resized square has no size to keep.
    "colour+scale": both.
    "stain":   "default" and, on colour images only (H&E and other stained tissue; grey ones pass
               untouched), H&E stain variation: albumentations' ``HEStain``
               (a stain matrix drawn from its presets, each stain's amount scaled 0.7-1.3x and
               shifted +-0.2; 70% of crops), the field's answer to stains a model never saw
               (Tellez et al. 2019).
    "texture": "default" and, on the image only, a grain or a blur that the nuclei's outlines do
               not depend on (50% of crops, one of): fine Gaussian noise, coarse Gaussian noise (drawn
               at a quarter of the resolution: a grain of about 4 px), multiplicative speckle
               (0.7-1.3x per pixel) or a Gaussian blur (sigma 0.5-1.5). The same for every channel,
               so grey images stay grey. For textured nuclei that a model cuts into pieces.
    "texture+touch": "texture" and, before the grain, synthetic touching nuclei (``TouchingCopy``,
               half the crops): a nucleus of the crop copied, turned, and set down pressed against
               itself, a new nucleus in the labels. For touching nuclei the watershed leaves merged.
    or an ``A.Compose`` (or any albumentations transform) of your own, called as
    ``t(image=uint8 (H, W, 3), mask=uint8 (H, W))`` and expected to return the same keys.
"""
from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from scipy import ndimage as ndi

PRESETS = ("none", "default", "colour", "scale", "colour+scale", "stain", "texture", "texture+touch")
ZOOM = (0.67, 1.5)  # the "scale" presets' range of magnifications (crop_transform)


def default_augment() -> A.Compose:
    """The "default" preset: flips, 90-degree rotations, mild brightness/contrast."""
    return A.Compose(
        [
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        ]
    )


def colour_augment() -> list[A.BasicTransform]:
    """The "colour" part: stain, hue, channel and gamma changes (image only)."""
    return [
        A.OneOf([A.HueSaturationValue(hue_shift_limit=180, sat_shift_limit=60, val_shift_limit=0, p=1.0),
                 A.ChannelShuffle(p=1.0),
                 A.ToGray(p=1.0)], p=0.7),
        A.RandomGamma(gamma_limit=(70, 150), p=0.3),
    ]


class ColourStain(A.HEStain):
    """``A.HEStain`` on colour images; grey ones (three equal channels: fluorescence, brightfield)
    are returned as they are, where the stain matrix would paint them purple."""

    def __call__(self, *args, force_apply: bool = False, **data):
        image = data.get("image")
        if image is not None and image.ndim == 3 and image.shape[2] == 3 and (
                (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()):
            return data
        return super().__call__(*args, force_apply=force_apply, **data)


def stain_augment() -> list[A.BasicTransform]:
    """The "stain" part: H&E stain variation of colour images (image only)."""
    return [ColourStain(method="random_preset", intensity_scale_range=(0.7, 1.3), intensity_shift_range=(-0.2, 0.2),
                        p=0.7)]


def texture_augment() -> list[A.BasicTransform]:
    """The "texture" part: grain, speckle or blur, the same in every channel (image only)."""
    return [
        A.OneOf([A.GaussNoise(std_range=(0.02, 0.08), per_channel=False, p=1.0),
                 A.GaussNoise(std_range=(0.02, 0.08), per_channel=False, noise_scale_factor=0.25, p=1.0),
                 A.MultiplicativeNoise(multiplier=(0.7, 1.3), per_channel=False, elementwise=True, p=1.0),
                 A.GaussianBlur(sigma_limit=(0.5, 1.5), p=1.0)], p=0.5),
    ]


class TouchingCopy(A.DualTransform):
    """Synthetic touching nuclei (the DSB 2018 ablations' "touching nuclei" augmentation): one
    nucleus of the crop, copied pixel for pixel, turned by one of the eight right-angle symmetries,
    and set down against the original in a random direction, 1 to ``max_overlap`` steps short of
    where the two would no longer overlap, on top of it: pressed together along a line (they share
    4-neighbours). The copy takes background pixels and the original's (never another nucleus');
    it becomes a new nucleus in the labels (``masks[0]``), so the boundary target draws the line
    between the two where the image shows only their shapes.

    Nuclei of at least ``min_area`` pixels that do not touch the crop's edge are drawn from; a copy
    of which less than ``min_kept`` would land, or that would leave less than ``min_kept`` of the
    original, is not made; after ``tries`` nuclei and directions that do not fit, the crop passes
    unchanged. Without ``masks`` (no labels), the mask's 8-connected blobs stand for the nuclei.
    """

    def __init__(self, min_area: int = 20, max_overlap: int = 2, min_kept: float = 0.7, tries: int = 5,
                 p: float = 0.5) -> None:
        super().__init__(p=p)
        self.min_area, self.max_overlap, self.min_kept, self.tries = min_area, max_overlap, min_kept, tries

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        none = {"src": None, "dst": None, "new": 0}
        masks = data.get("masks")
        labels = np.asarray(masks[0]) if masks is not None and len(masks) else ndi.label(data["mask"] > 0, np.ones((3, 3)))[0]
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        ok = ids[(areas >= self.min_area) & ~np.isin(ids, edge)]
        if not len(ok):
            return none
        rng = self.random_generator
        for _ in range(self.tries):
            plan = self._place(labels, ok[rng.integers(len(ok))], rng)
            if plan is not None:
                return plan
        return none

    def _place(self, labels: np.ndarray, k: int, rng: np.random.Generator) -> dict[str, Any] | None:
        """Where the turned copy of nucleus ``k`` lands pressed against it, in a random direction; None
        where it does not fit."""
        h, w = labels.shape
        ys, xs = np.nonzero(labels == k)
        cy, cx = int(round(ys.mean())), int(round(xs.mean()))
        dy, dx = ys - cy, xs - cx
        if rng.random() < 0.5:  # one of the eight symmetries of the square: a transpose or not, then signs
            dy, dx = dx, dy
        dy, dx = dy * rng.choice((-1, 1)), dx * rng.choice((-1, 1))
        angle = rng.uniform(0, 2 * np.pi)
        uy, ux = np.sin(angle), np.cos(angle)
        own = labels == k
        reach = 2 * (int(np.abs(dy).max()) + int(np.abs(dx).max())) + 3
        for t in range(1, reach + 1):  # the first step at which the copy no longer covers the original
            ty, tx = cy + dy + int(round(t * uy)), cx + dx + int(round(t * ux))
            inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
            if not own[ty[inside], tx[inside]].any():
                break
        else:
            return None
        t = max(1, t - int(rng.integers(1, self.max_overlap + 1)))  # a step or two back: over the original's edge
        ty, tx = cy + dy + int(round(t * uy)), cx + dx + int(round(t * ux))
        inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
        free = np.zeros_like(inside)
        free[inside] = np.isin(labels[ty[inside], tx[inside]], (0, k))
        covered = own[ty[free], tx[free]].sum()
        if free.sum() < self.min_kept * len(ys) or len(ys) - covered < self.min_kept * len(ys):
            return None
        # pixel i of the original lands at (ty[i], tx[i]): the turn and the shift keep the order
        return {"src": (ys[free], xs[free]), "dst": (ty[free], tx[free]), "new": int(labels.max()) + 1}

    def apply(self, img: np.ndarray, src=None, dst=None, **params: Any) -> np.ndarray:
        if src is None:
            return img
        out = img.copy()
        out[dst] = img[src]
        return out

    def apply_to_mask(self, mask: np.ndarray, src=None, dst=None, **params: Any) -> np.ndarray:
        if src is None:
            return mask
        out = mask.copy()
        out[dst] = 1
        return out

    def apply_to_masks(self, masks: np.ndarray, src=None, dst=None, new: int = 0, **params: Any) -> np.ndarray:
        if src is None:
            return masks
        out = np.array(masks, dtype=np.promote_types(np.asarray(masks).dtype, np.min_scalar_type(new)), copy=True)
        out[0][dst] = new
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_area", "max_overlap", "min_kept", "tries")


def zoom_range(augment) -> tuple[float, float] | None:
    """The magnifications a preset trains at (``crop_transform``'s ``zoom``), None: the crop as cut."""
    return ZOOM if isinstance(augment, str) and "scale" in augment.lower().split("+") else None


def build_augment(augment: str | A.BasicTransform | A.BaseCompose | None) -> A.BaseCompose | None:
    """A preset name, an albumentations transform, or None -> a transform to call, or None for no augmentation."""
    if augment is None:
        return None
    if isinstance(augment, str):
        name = augment.lower()
        if name == "none":
            return None
        if name == "default" or name == "scale":  # scale is the crop's (crop_transform)
            return default_augment()
        if name in ("colour", "colour+scale"):
            return A.Compose([*default_augment().transforms, *colour_augment()])
        if name == "stain":
            return A.Compose([*default_augment().transforms, *stain_augment()])
        if name == "texture":
            return A.Compose([*default_augment().transforms, *texture_augment()])
        if name == "texture+touch":
            return A.Compose([*default_augment().transforms, TouchingCopy(p=0.5), *texture_augment()])
        raise ValueError(f"unknown augment preset {augment!r}; choose one of {', '.join(PRESETS)} or pass an A.Compose")
    if isinstance(augment, A.BaseCompose):
        return augment
    if isinstance(augment, A.BasicTransform):
        return A.Compose([augment])
    raise TypeError(f"augment must be a preset name ({', '.join(PRESETS)}) or an albumentations transform, got {type(augment).__name__}")
