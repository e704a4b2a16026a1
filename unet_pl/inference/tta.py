"""Test-time augmentation: predict the flipped and rotated image too and average the results.

A microscope image has no preferred orientation, so the eight symmetries of the square (the
dihedral group: flips and 90-degree rotations) are all equally valid views. Each view goes
through the model, its output is mapped back (the inverse flip or rotation) and the
probabilities are averaged.

    "none"   the image as it is (the notebook)
    "flips"  4 views: identity, horizontal, vertical, both flips
    "d4"     8 views: the 4 rotations by 90 degrees, each with and without a horizontal flip
"""
from __future__ import annotations

from collections.abc import Callable

import torch

TTAS = ("none", "flips", "d4")

# A view is (k, flip): rotate by k * 90 degrees after flipping the width when ``flip``.
_VIEWS = {
    "none": [(0, False)],
    "flips": [(0, False), (0, True), (2, True), (2, False)],  # rot180 + hflip = vflip; rot180 = both flips
    "d4": [(k, f) for k in range(4) for f in (False, True)],
}


def views(tta: str) -> list[tuple[int, bool]]:
    """The ``(rotations, flip)`` pairs of a TTA name; ``ValueError`` naming the choices otherwise."""
    if tta not in _VIEWS:
        raise ValueError(f"unknown TTA {tta!r}; choose one of {', '.join(TTAS)}")
    return _VIEWS[tta]


def forward_view(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """``(N, C, H, W)`` -> the view: flip the width, then rotate ``k`` quarter turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def inverse_view(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Undo ``forward_view``: rotate back, then flip back."""
    if k % 4:
        y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


def tta_predict(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Mean of ``inverse(predict(view(x)))`` over the views of ``tta``.

    ``predict`` maps ``(N, C, H, W)`` to per-pixel outputs ``(N, C', H, W)`` (probabilities, so
    that the mean is a probability). Rotations swap height and width: both must suit the model
    (multiples of 16), which padding guarantees.
    """
    vs = views(tta)
    total = None
    for k, flip in vs:
        y = inverse_view(predict(forward_view(x, k, flip)), k, flip)
        total = y if total is None else total + y
    return total / len(vs)
