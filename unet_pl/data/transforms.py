"""Paired image/mask augmentation for training (albumentations). Validation, test and predict never augment.

Presets (``NucleiDataModule(augment=...)``):
    "none":    no augmentation, the notebook's training.
    "default": horizontal and vertical flips, 90-degree rotations (the dihedral group a
               microscope image has no preferred orientation in), and mild brightness and
               contrast jitter (+-10%). Geometry moves image and mask together; the jitter
               touches the image only.
    or an ``A.Compose`` (or any albumentations transform) of your own, called as
    ``t(image=uint8 (H, W, 3), mask=uint8 (H, W))`` and expected to return the same keys.
"""
from __future__ import annotations

import albumentations as A

PRESETS = ("none", "default")


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


def build_augment(augment: str | A.BasicTransform | A.BaseCompose | None) -> A.BaseCompose | None:
    """A preset name, an albumentations transform, or None -> a transform to call, or None for no augmentation."""
    if augment is None:
        return None
    if isinstance(augment, str):
        name = augment.lower()
        if name == "none":
            return None
        if name == "default":
            return default_augment()
        raise ValueError(f"unknown augment preset {augment!r}; choose one of {', '.join(PRESETS)} or pass an A.Compose")
    if isinstance(augment, A.BaseCompose):
        return augment
    if isinstance(augment, A.BasicTransform):
        return A.Compose([augment])
    raise TypeError(f"augment must be a preset name ({', '.join(PRESETS)}) or an albumentations transform, got {type(augment).__name__}")
