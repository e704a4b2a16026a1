"""Training targets from per-nucleus label images: the foreground, each nucleus' boundary, and
where nuclei touch (the contact weights' map).

The notebook trains one output, the union of the masks, so two touching nuclei are one blob
and connected components cannot split them. The ``mask+boundary`` head adds a second output:
the nucleus boundary, the outermost ring of pixels of every nucleus (``find_boundaries``'s
"inner" mode), which covers the line where two nuclei touch from both sides. Foreground minus
boundary then leaves one core per nucleus, the seeds ``unet_pl.inference.postprocess.split_nuclei``
grows back into the foreground with a watershed. The ``mask+boundary+distance`` head adds a third:
each nucleus pixel's distance to the nucleus' edge over the largest such distance in that nucleus
(``distances``), high at every nucleus' centre whatever its size or texture, as StarDist's object
probability; seeds then need both a low boundary and a high distance.

The heads themselves (names, channel counts) are ``unet_pl.geometry``'s.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..geometry import HEADS, head_channels  # noqa: F401  (the heads are the network's: unet_pl.geometry)

#: 8-connectivity (a pixel touches the eight around it), as prediction's components
EIGHT = np.ones((3, 3), bool)


def boundaries(labels: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W)`` in {0, 1}: pixels of a nucleus with a 4-neighbour outside it (background,
    another nucleus, or nothing at the image's edge is not counted).

    ``labels``: int ``(H, W)``, 0 background, 1..k one per nucleus. Pure numpy, so it runs in a
    DataLoader worker on every random crop.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected one label image (H, W), got shape {lab.shape}")
    edge = np.zeros(lab.shape, bool)
    # A pixel is on the boundary when a 4-neighbour carries a different label; comparing
    # shifted copies in both directions marks both sides of a touching line.
    dv = lab[1:, :] != lab[:-1, :]
    dh = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dv
    edge[:-1, :] |= dv
    edge[:, 1:] |= dh
    edge[:, :-1] |= dh
    return (edge & (lab > 0)).astype(np.uint8)


def contacts(labels: np.ndarray, reach: int = 2) -> np.ndarray:
    """uint8 ``(H, W)`` in {0, 1}: pixels (nucleus or background) with two different nuclei within
    ``reach`` pixels (a ``2 * reach + 1`` square), i.e. where nuclei touch or nearly touch and a
    watershed must cut. ``LitUNet(contact_weight=w)`` weighs the loss there by ``1 + w``, as the
    DSB 2018 top solutions weighed touching borders."""
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected one label image (H, W), got shape {lab.shape}")
    size = 2 * reach + 1
    none = int(lab.max()) + 1 if lab.size else 1  # "no nucleus" for the minimum
    if none < 2 ** 24:  # float32 holds these labels exactly: OpenCV's morphology, ~20x scipy's
        lab = lab.astype(np.float32)
        square = np.ones((size, size), np.uint8)  # outside the image counts as nothing (OpenCV's default border)
        top = cv2.dilate(lab, square)
        bottom = cv2.erode(np.where(lab > 0, lab, np.float32(none)), square)
    else:
        lab = lab.astype(np.int64)
        top = ndi.maximum_filter(lab, size=size, mode="constant", cval=0)
        bottom = ndi.minimum_filter(np.where(lab > 0, lab, none), size=size, mode="constant", cval=none)
    return ((bottom != none) & (top != bottom)).astype(np.uint8)


def distances(labels: np.ndarray) -> np.ndarray:
    """float32 ``(H, W)`` in [0, 1]: each nucleus pixel's Euclidean distance to the nearest pixel
    outside its nucleus (background or another nucleus; the image's edge does not count), divided
    by the largest such distance in its piece of the nucleus (8-connected: a nucleus that a crop or
    a resize cut in two is two pieces, each with a centre); 0 on background.

    A pixel on the nucleus' rim is 1 pixel from the outside, its centre the farthest, so every
    piece reads 1.0 at its centre(s).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"expected one label image (H, W), got shape {lab.shape}")
    out = np.zeros(lab.shape, np.float32)
    h, w = lab.shape
    for k, box in enumerate(ndi.find_objects(lab.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        # the nucleus' box grown by one pixel (inside the image), so its outside is in view
        rows = slice(max(box[0].start - 1, 0), min(box[0].stop + 1, h))
        cols = slice(max(box[1].start - 1, 0), min(box[1].stop + 1, w))
        own = lab[rows, cols] == k
        # OpenCV's exact Euclidean transform (scipy's distance_transform_edt gives the same, ~4x slower);
        # its last bit varies with the array's address, so the squared distance, a whole number, is
        # rounded and the root taken again: the same targets on every run
        depth = cv2.distanceTransform(own.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        depth = np.sqrt(np.rint(np.square(depth, dtype=np.float64)))
        if depth.max() >= 1e9:  # nothing outside it in view (a nucleus filling the image): all centre
            depth = np.ones(own.shape)
        pieces, n = ndi.label(own, EIGHT)
        top = depth.max() if n == 1 else ndi.maximum(depth, pieces, np.arange(1, n + 1))[pieces[own] - 1]
        out[rows, cols][own] = depth[own] / top
    return out


def make_targets(labels: np.ndarray, head: str) -> np.ndarray:
    """float32 ``(C, H, W)`` for ``head``: foreground, then (``mask+boundary``) the boundary, both in
    {0, 1}, then (``mask+boundary+distance``) ``distances`` in [0, 1]."""
    n = head_channels(head)
    channels = [(np.asarray(labels) > 0).astype(np.float32)]
    if n > 1:
        channels.append(boundaries(labels).astype(np.float32))
    if n > 2:
        channels.append(distances(labels))
    return np.stack(channels)
