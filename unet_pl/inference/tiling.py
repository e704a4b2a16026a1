"""Whole images at their own size through the U-Net: padded to a multiple of 16, or tiled with
overlap when they are large. torch only.

The U-Net pools four times, so height and width must be multiples of 16 (``unet_pl.model``).
``pad_to_multiple`` mirrors the image out to the next multiple (a mirrored border looks like
more of the same tissue; black would be an edge the network never saw in brightfield or H&E),
and ``predict_whole`` crops the output back. Images larger than ``tile`` go through in
overlapping tiles; each tile keeps only its centre (``margin`` pixels from a cut are dropped,
where the network lacks context), and the kept centres cover the image exactly once.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..model import DIVISOR


#: Pixels dropped at each cut between tiles (the network lacks context there).
MARGIN = 64


def check_tile(tile: int, margin: int = MARGIN) -> int:
    """``tile`` if it is a multiple of 16 larger than ``2 * margin``, else ``ValueError`` saying so."""
    if tile % DIVISOR or tile <= 2 * margin:
        raise ValueError(f"tile must be a multiple of {DIVISOR} larger than {2 * margin} (twice the margin dropped at "
                         f"each cut), got {tile}")
    return tile


def pad_to_multiple(x: torch.Tensor, divisor: int = DIVISOR) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(N, C, H, W)`` -> (padded ``(N, C, H', W')`` with H', W' multiples of ``divisor``, (H, W)).

    Padding goes to the bottom and right, mirrored (``reflect``) where the image is larger than
    the pad, else repeated edge pixels.
    """
    h, w = x.shape[-2:]
    ph, pw = -h % divisor, -w % divisor
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def _starts(n: int, tile: int, margin: int) -> list[int]:
    """Tile origins along one axis: consecutive kept centres abut; the last tile ends at ``n``."""
    if n <= tile:
        return [0]
    step = tile - 2 * margin
    starts = list(range(0, n - tile, step))
    return starts + [n - tile]


def predict_whole(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = 1024,
                  margin: int = MARGIN) -> torch.Tensor:
    """Per-pixel outputs ``(N, C', H, W)`` of ``predict`` for images ``x`` ``(N, C, H, W)`` of any size.

    ``predict`` must take multiples of 16 (it gets padded input). Images no larger than ``tile``
    on either side go through whole; larger ones in ``tile`` x ``tile`` tiles (``tile`` a
    multiple of 16, more than ``2 * margin``) whose outer ``margin`` pixels are discarded
    except at the image's own edges.
    """
    check_tile(tile, margin)
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        padded, _ = pad_to_multiple(x)
        return predict(padded)[..., :h, :w]
    out = None
    ys, xs = _starts(h, tile, margin), _starts(w, tile, margin)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            padded, _ = pad_to_multiple(x[..., y0:y0 + th, x0:x0 + tw])
            y = predict(padded)[..., :th, :tw]
            if out is None:
                out = y.new_zeros((*y.shape[:-2], h, w))
            # Keep the tile's centre; at the image's border keep up to the border.
            top = 0 if y0 == 0 else margin
            left = 0 if x0 == 0 else margin
            bottom = th if y0 + th >= h else th - margin
            right = tw if x0 + tw >= w else tw - margin
            out[..., y0 + top:y0 + bottom, x0 + left:x0 + right] = y[..., top:bottom, left:right]
    return out
