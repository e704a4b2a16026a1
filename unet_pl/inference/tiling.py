"""Whole images at their own size through the U-Net: padded to a multiple of 16, or tiled with
overlap when they are large. torch only.

The U-Net pools four times, so height and width must be multiples of 16 (``unet_pl.model``).
``pad_to_multiple`` mirrors the image out to the next multiple (a mirrored border looks like
more of the same tissue; black would be an edge the network never saw in brightfield or H&E),
and ``predict_whole`` crops the output back. Images larger than ``tile`` go through in
overlapping tiles; each tile keeps only its centre (``margin`` pixels from a cut are dropped,
where the network lacks context), and the kept centres cover every pixel.
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


def tile_side(n: int, tile: int, margin: int = MARGIN) -> int:
    """The side of the tiles along an axis of ``n`` pixels: ``n`` when it fits in one ``tile``, else
    the smallest multiple of 16 (at most ``tile``) that covers the axis with as few tiles as
    ``tile`` allows. 2048 pixels in tiles of at most 1024 (margin 64) take three tiles of 768, not
    three of 1024: 12% more network work instead of 50%."""
    if n <= tile:
        return n
    k = -(-(n - 2 * margin) // (tile - 2 * margin))  # tiles needed: k centres of tile - 2 margin, plus both ends
    side = -(-(n - 2 * margin) // k) + 2 * margin
    return min(tile, side + -side % DIVISOR)


def tile_starts(n: int, side: int, margin: int = MARGIN) -> list[int]:
    """Tile origins along one axis: consecutive kept centres abut; the last tile ends at ``n``."""
    if n <= side:
        return [0]
    step = side - 2 * margin
    starts = list(range(0, n - side, step))
    return starts + [n - side]


def predict_whole(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int = 2048,
                  margin: int = MARGIN, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Per-pixel outputs ``(N, C', H, W)`` of ``predict`` for images ``x`` ``(N, C, H, W)`` of any size.

    ``predict`` must take multiples of 16 (it gets padded input). Images no larger than ``tile``
    on either side go through whole; larger ones in tiles of at most ``tile`` x ``tile``
    (``tile`` a multiple of 16, more than ``2 * margin``; sides from ``tile_side``) whose outer
    ``margin`` pixels are discarded except at the image's own edges. Tiles go to ``predict``
    several at a time while their pixels fit in one ``tile`` x ``tile`` square.
    ``prepare`` turns a crop of ``x`` into ``predict``'s input (e.g. uint8 -> float), so that
    only one batch of tiles is ever converted.
    """
    check_tile(tile, margin)
    prepare = prepare or (lambda t: t)
    n, h, w = x.shape[0], *x.shape[-2:]
    if h <= tile and w <= tile:
        padded, _ = pad_to_multiple(prepare(x))
        return predict(padded)[..., :h, :w]
    th, tw = tile_side(h, tile, margin), tile_side(w, tile, margin)
    origins = [(y0, x0) for y0 in tile_starts(h, th, margin) for x0 in tile_starts(w, tw, margin)]
    per_batch = max(1, tile * tile // (th * tw * n))
    out = None
    for b in range(0, len(origins), per_batch):
        group = origins[b:b + per_batch]
        crops = torch.cat([x[..., y0:y0 + th, x0:x0 + tw] for y0, x0 in group])
        padded, _ = pad_to_multiple(prepare(crops))
        ys = predict(padded)[..., :th, :tw]
        if out is None:
            out = ys.new_zeros((n, ys.shape[1], h, w))
        for j, (y0, x0) in enumerate(group):
            # Keep the tile's centre; at the image's border keep up to the border.
            top = 0 if y0 == 0 else margin
            left = 0 if x0 == 0 else margin
            bottom = th if y0 + th >= h else th - margin
            right = tw if x0 + tw >= w else tw - margin
            y = ys[j * n:(j + 1) * n]
            out[..., y0 + top:y0 + bottom, x0 + left:x0 + right] = y[..., top:bottom, left:right]
    return out
