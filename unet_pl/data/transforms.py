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
    or an ``A.Compose`` (or any albumentations transform) of your own, called as
    ``t(image=uint8 (H, W, 3), mask=uint8 (H, W))`` and expected to return the same keys.
"""
from __future__ import annotations

import albumentations as A

PRESETS = ("none", "default", "colour", "scale", "colour+scale", "stain", "texture")
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
        raise ValueError(f"unknown augment preset {augment!r}; choose one of {', '.join(PRESETS)} or pass an A.Compose")
    if isinstance(augment, A.BaseCompose):
        return augment
    if isinstance(augment, A.BasicTransform):
        return A.Compose([augment])
    raise TypeError(f"augment must be a preset name ({', '.join(PRESETS)}) or an albumentations transform, got {type(augment).__name__}")
