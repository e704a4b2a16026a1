"""Per-nucleus measurements for ``nuclei.csv``, for all nuclei of an image at once.

``nucleus_table`` gives the columns scikit-image's ``regionprops_table`` gives for
``outputs.NUCLEUS_PROPERTIES``, equal to them (up to float rounding), at a fraction of the cost:
regionprops builds one Python object per nucleus and, for solidity, runs Qhull and a polygon
rasterisation per nucleus; here every property is a handful of whole-image numpy operations on the
foreground pixels grouped by label. Its definitions are scikit-image 0.26's, reproduced step by step:

- moments, inertia tensor, eigenvalues, axis lengths, eccentricity, orientation: as
  ``skimage.measure._moments`` (``eigvalsh`` of the inertia tensor; the central moments computed
  exactly in integers, or as scikit-image does for regions too large for int64);
- perimeter: ``skimage.measure.perimeter(region_image, neighborhood=4)`` per region;
- solidity: area / ``area_convex``, the number of pixel centres inside or on the convex hull of the
  region's pixel-edge midpoints (``convex_hull_image``): the hulls come from a quickhull run on all
  regions together, in exact integer arithmetic on half-pixel coordinates, and the pixel centres are
  counted row by row along the hull's edges;
- intensity_mean: ``np.mean`` of the region's values in the intensity's own dtype; for float32 that
  is a float32 pairwise sum, which is reproduced exactly so that the table does not depend on which
  function measured it.
"""
from __future__ import annotations

import numpy as np

COLUMNS = ("label", "area", "centroid-0", "centroid-1", "bbox-0", "bbox-1", "bbox-2", "bbox-3", "intensity_mean",
           "intensity_min", "intensity_max", "perimeter", "eccentricity", "solidity", "axis_major_length",
           "axis_minor_length", "orientation", "equivalent_diameter_area")
_INT_COLUMNS = ("label", "bbox-0", "bbox-1", "bbox-2", "bbox-3")

# skimage.measure.perimeter's weights for the codes 1 + 2 * (4-neighbours) + 10 * (diagonal neighbours)
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_PAIRWISE_BLOCK = 128  # numpy's PW_BLOCKSIZE
_SPAN = 1 << 32  # (y, x) -> one int64 key; doubled coordinates stay far below it


def nucleus_table(labels: np.ndarray, intensity: np.ndarray) -> dict[str, np.ndarray]:
    """``regionprops_table(labels, intensity_image=intensity, properties=NUCLEUS_PROPERTIES)``, vectorised.

    ``labels``: int (H, W), 0 background, nucleus k = k (any non-negative labels, not necessarily
    consecutive or connected); ``intensity``: (H, W) integer, float32 or float64. One row per label
    present, in increasing label order; ``label`` and ``bbox-*`` are int64, the rest float64
    (``intensity_min``/``max`` hold the intensity's own values).
    """
    labels, intensity = _check(labels, intensity)
    flat = labels.ravel()
    fg, lab, starts, region, area, rows, cols, r0, r1 = _grouped(flat, np.flatnonzero(flat), labels.shape[1])
    if not len(lab):
        return {k: np.zeros(0, np.int64 if k in _INT_COLUMNS else np.float64) for k in COLUMNS}
    c0, c1 = np.minimum.reduceat(cols, starts), np.maximum.reduceat(cols, starts) + 1
    out = {"label": lab[starts].astype(np.int64), "area": area.astype(np.float64)}
    out["centroid-0"] = np.add.reduceat(rows, starts) / area
    out["centroid-1"] = np.add.reduceat(cols, starts) / area
    out.update({"bbox-0": r0, "bbox-1": c0, "bbox-2": r1, "bbox-3": c1})
    out.update(_intensity(intensity.ravel()[fg], starts, area))
    out["perimeter"] = _perimeter(labels, rows, cols, lab, region, len(starts))
    out.update(_inertia(rows - r0[region], cols - c0[region], region, starts, area))
    out["solidity"] = out["area"] / _convex_area(rows, cols, region, starts, r0, r1)
    out["equivalent_diameter_area"] = (4 * out["area"] / np.pi) ** 0.5
    return {k: out[k].astype(np.int64 if k in _INT_COLUMNS else np.float64, copy=False) for k in COLUMNS}


def solidity(labels: np.ndarray, which: np.ndarray) -> np.ndarray:
    """regionprops' ``solidity`` (area / ``area_convex``) of the labels ``which`` (distinct, each present
    in ``labels``), float64 in ``which``'s order; measured on their pixels only."""
    labels, which = np.asarray(labels), np.asarray(which, np.int64)
    if not len(which):
        return np.zeros(0)
    flat = labels.ravel()
    wanted = np.zeros(int(max(flat.max(initial=0), which.max())) + 1, bool)
    wanted[which] = True
    _, lab, starts, region, area, rows, cols, r0, r1 = _grouped(flat, np.flatnonzero(wanted[flat]), labels.shape[1])
    found = lab[starts]
    if len(found) != len(which):
        raise ValueError(f"labels {sorted(set(which.tolist()) - set(found.tolist()))[:5]} are not in the image")
    measured = area / _convex_area(rows, cols, region, starts, r0, r1)
    return measured[np.searchsorted(found, which)]


def _grouped(flat: np.ndarray, fg: np.ndarray, w: int) -> tuple[np.ndarray, ...]:
    """The pixels ``fg`` (flat indices into the labels ``flat`` of an image ``w`` wide) grouped by label:
    ``(fg, lab, starts, region, area, rows, cols, r0, r1)``, ``fg`` and ``lab`` sorted by label and in
    raster order within one (as regionprops reads), ``starts`` each group's first index, ``region``
    each pixel's group 0..n-1, ``area`` each group's pixels, ``rows``, ``cols`` each pixel's, ``r0``,
    ``r1`` each group's first row and last row + 1."""
    keys = flat[fg]
    if keys.max(initial=0) <= np.iinfo(np.uint16).max:
        keys = keys.astype(np.uint16)  # the same stable order, by numpy's radix sort: 4x faster
    order = np.argsort(keys, kind="stable")  # by label, raster order within a label
    fg = fg[order]
    lab = flat[fg]
    new = np.r_[True, lab[1:] != lab[:-1]] if len(lab) else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    region = np.cumsum(new) - 1  # 0..n-1 per pixel
    area = np.diff(np.r_[starts, len(lab)])
    rows, cols = np.divmod(fg, w)
    r0, r1 = rows[starts], rows[np.r_[starts[1:], len(lab)][:len(starts)] - 1] + 1
    return fg, lab, starts, region, area, rows, cols, r0, r1


def _check(labels: np.ndarray, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, intensity = np.asarray(labels), np.asarray(intensity)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer (H, W) label image, got {labels.dtype} {labels.shape}")
    if intensity.shape != labels.shape:
        raise ValueError(f"intensity {intensity.shape} must have the labels' shape {labels.shape} (one channel)")
    if not (intensity.dtype == np.bool_ or np.issubdtype(intensity.dtype, np.integer)
            or intensity.dtype in (np.float32, np.float64)):
        raise ValueError(f"intensity must be integer, float32 or float64, got {intensity.dtype}: cast it to float32")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 background); relabel negative labels first")
    return labels, intensity


def _intensity(vals: np.ndarray, starts: np.ndarray, area: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, min and max per region; ``vals`` grouped by region, each group in raster order."""
    if vals.dtype.kind == "f":
        # np.mean of a float array sums pairwise in its own dtype and divides in it
        mean = _pairwise_sums(vals, starts, area) / area.astype(vals.dtype)
    else:
        mean = np.add.reduceat(vals.astype(np.float64), starts) / area  # integers: float64, exact sums
    return {"intensity_mean": mean.astype(np.float64), "intensity_min": np.minimum.reduceat(vals, starts),
            "intensity_max": np.maximum.reduceat(vals, starts)}


def _pairwise_sums(vals: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``np.sum(vals[s:s + n])`` for every segment, bit for bit: numpy's pairwise summation (halves
    rounded down to a multiple of 8 until a block has <= 128 values; a block sums 8 interleaved
    partial sums, adds them as a tree, then adds the remainder one by one), run for all segments at
    once level by level."""
    t = vals.dtype.type
    # split every segment into blocks, remembering each split (parent -> two children) to add back up
    node_s, node_n = starts.astype(np.int64), lengths.astype(np.int64)
    splits = []  # per level: (parent ids, left child ids, right child ids)
    leaves = np.zeros(len(node_s), bool)
    frontier = np.arange(len(node_s))
    while len(frontier):
        big = frontier[node_n[frontier] > _PAIRWISE_BLOCK]
        leaves[frontier[node_n[frontier] <= _PAIRWISE_BLOCK]] = True
        if not len(big):
            break
        half = node_n[big] // 2
        half -= half % 8
        left = len(node_s) + np.arange(len(big))
        right = left + len(big)
        node_s = np.r_[node_s, node_s[big], node_s[big] + half]
        node_n = np.r_[node_n, half, node_n[big] - half]
        leaves = np.r_[leaves, np.zeros(2 * len(big), bool)]
        splits.append((big, left, right))
        frontier = np.r_[left, right]
    total = np.zeros(len(node_s), vals.dtype)
    leaf = np.flatnonzero(leaves)
    s, n = node_s[leaf], node_n[leaf]
    lanes = n // 8  # blocks of >= 8 values: 8 partial sums over the first 8 * (n // 8) values
    res = np.zeros(len(leaf), vals.dtype)
    wide = lanes > 0
    if wide.any():
        sw, lw = s[wide], lanes[wide]
        r = vals[sw[:, None] + np.arange(8)]
        for k in range(1, int(lw.max())):
            more = lw > k
            r[more] += vals[sw[more, None] + 8 * k + np.arange(8)]
        res[wide] = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    rest_s, rest_n = s + 8 * lanes, n - 8 * lanes
    for k in range(int(rest_n.max(initial=0))):
        more = rest_n > k
        res[more] += vals[rest_s[more] + k]
    total[leaf] = res
    for parent, left, right in reversed(splits):
        total[parent] = total[left] + total[right]
    return total[:len(starts)].astype(t, copy=False)


def _perimeter(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray, lab: np.ndarray, region: np.ndarray,
               n: int) -> np.ndarray:
    """skimage's 4-neighbourhood perimeter of every region's own image, all regions at once: a pixel is
    a border pixel when a 4-neighbour is not its label (or is off the image); each border pixel gets
    the code 1 + 2 per 4-neighbour and 10 per diagonal neighbour that is a border pixel of the same
    label, and the code's weight. Neighbours are looked up in images padded by one pixel of
    background, so that off-image neighbours need no test."""
    h, w = labels.shape
    pw = w + 2
    padded = np.zeros((h + 2, pw), labels.dtype)
    padded[1:-1, 1:-1] = labels
    flat = padded.ravel()
    at = (rows + 1) * pw + (cols + 1)
    border = np.zeros(len(lab), bool)
    for step in (-pw, pw, -1, 1):
        border |= flat[at + step] != lab
    bat, blab, breg = at[border], lab[border], region[border]
    borders = np.zeros_like(padded).ravel()  # each border pixel's label, 0 elsewhere
    borders[bat] = blab
    code = np.ones(len(bat), np.int64)
    for step, weight in ((-pw, 2), (pw, 2), (-1, 2), (1, 2), (-pw - 1, 10), (-pw + 1, 10), (pw - 1, 10), (pw + 1, 10)):
        code += weight * (borders[bat + step] == blab)
    return np.bincount(breg, weights=_PERIMETER_WEIGHTS[code], minlength=n)


def _inertia(dr: np.ndarray, dc: np.ndarray, region: np.ndarray, starts: np.ndarray,
             area: np.ndarray) -> dict[str, np.ndarray]:
    """Eccentricity, axis lengths and orientation from the inertia tensor, as skimage computes them
    (``dr``, ``dc``: bbox-local pixel coordinates)."""
    extent = max(int(dr.max()), int(dc.max())) + 1
    if float(area.max()) ** 2 * extent ** 2 < 2.0 ** 62:
        # exact: n * mu = n * sum(x y) - sum(x) sum(y) in int64, so that a moment that is 0 (a symmetric
        # nucleus) is 0, not +-1e-15 whose sign would flip the orientation between +-pi/2
        sr, sc = np.add.reduceat(dr, starts), np.add.reduceat(dc, starts)
        mu20, mu02, mu11 = ((area * np.add.reduceat(x * y, starts) - sx * sy) / area
                            for x, y, sx, sy in ((dr, dr, sr, sr), (dc, dc, sc, sc), (dr, dc, sr, sc)))
    else:  # about the bbox-local centroid, as skimage
        dr = dr - (np.add.reduceat(dr, starts) / area)[region]
        dc = dc - (np.add.reduceat(dc, starts) / area)[region]
        mu20, mu02, mu11 = (np.add.reduceat(x * y, starts) for x, y in ((dr, dr), (dc, dc), (dr, dc)))
    both = mu20 + mu02
    a, c, b = (both - mu20) / area, (both - mu02) / area, -mu11 / area  # T = [[a, b], [b, c]]
    ev = np.linalg.eigvalsh(np.stack([np.stack([a, b], -1), np.stack([b, c], -1)], -2))
    ev = np.clip(ev, 0, None)
    l1, l2 = ev[:, 1], ev[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 == 0, 0.0, np.sqrt(1 - l2 / l1))
    flat = np.where(b < 0, np.pi / 4, -np.pi / 4)  # skimage's choice when a == c
    orientation = np.where(a - c == 0, flat, 0.5 * np.arctan2(-2 * b, c - a))
    return {"eccentricity": ecc, "axis_major_length": 4 * np.sqrt(l1), "axis_minor_length": 4 * np.sqrt(l2),
            "orientation": orientation}


def _convex_area(rows: np.ndarray, cols: np.ndarray, region: np.ndarray, starts: np.ndarray, r0: np.ndarray,
                 r1: np.ndarray) -> np.ndarray:
    """``area_convex`` of every region: pixel centres inside or on the convex hull of its pixels' edge
    midpoints (skimage's ``convex_hull_image``). Coordinates are doubled so that every point is an
    integer and every test is exact."""
    # the hull of all pixels' edge midpoints is the hull of those of each row's first and last pixel
    first = np.r_[True, (region[1:] != region[:-1]) | (rows[1:] != rows[:-1])]
    last = np.r_[first[1:], True]
    y2 = 2 * rows[first]
    lx2, rx2, g = 2 * cols[first], 2 * cols[last], region[first]
    py = np.concatenate([y2, y2 - 1, y2 + 1, y2, y2 - 1, y2 + 1])
    px = np.concatenate([lx2 - 1, lx2, lx2, rx2 + 1, rx2, rx2])
    pg = np.tile(g, 6)
    ey, ex = _hull_edges(py, px, pg, len(starts))  # (E, 2) endpoints of every hull edge
    eg = ey[:, 2]
    # pixel centres on each edge's rows: x where the edge crosses row y; count floor(max) - ceil(min) + 1 per row
    ya, yb = ey[:, 0], ey[:, 1]
    xa, xb = ex[:, 0], ex[:, 1]
    keep = ya != yb
    ya, yb, xa, xb, eg = ya[keep], yb[keep], xa[keep], xb[keep], eg[keep]
    lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
    first_row, last_row = -(-lo // 2), hi // 2
    count = np.maximum(last_row - first_row + 1, 0)
    edge = np.repeat(np.arange(len(ya)), count)
    y = first_row[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(count) - count, count)
    den_e = (yb - ya)[edge]
    num = xa[edge] * den_e + (xb[edge] - xa[edge]) * (2 * y - ya[edge])  # x = num / (2 * den)
    sign = np.sign(den_e)
    num, den2 = num * sign, 2 * den_e * sign
    right, left = num // den2, -(-num // den2)
    g = eg[edge]
    height = r1 - r0
    slot = (np.cumsum(height) - height)[g] + y - r0[g]
    n_slots = int(height.sum())
    hi_x = np.full(n_slots, np.iinfo(np.int64).min)
    lo_x = np.full(n_slots, np.iinfo(np.int64).max)
    np.maximum.at(hi_x, slot, right)
    np.minimum.at(lo_x, slot, left)
    return np.bincount(np.repeat(np.arange(len(height)), height), weights=hi_x - lo_x + 1, minlength=len(height))


def _hull_edges(py: np.ndarray, px: np.ndarray, pg: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Quickhull on every group of points at once (integer coordinates, group ids ``pg`` in 0..n-1).
    Returns ``(ys, xs)``: ``ys[:, :2]``, ``xs`` the two ends of each hull edge, ``ys[:, 2]`` its group."""
    # the lowest (y, x) and the highest of each group (points come grouped, in any order within a group)
    a, b = _first_max(pg, py * _SPAN + px, n, lowest=True), _first_max(pg, py * _SPAN + px, n)
    # edges u -> v; a point is outside an edge when cross(v - u, p - u) > 0
    uy, ux = np.r_[py[a], py[b]], np.r_[px[a], px[b]]
    vy, vx = np.r_[py[b], py[a]], np.r_[px[b], px[a]]
    eg = np.r_[np.arange(n), np.arange(n)]
    split = np.zeros(2 * n, bool)
    c = _cross(py[a][pg], px[a][pg], py[b][pg], px[b][pg], py, px)
    pe, pc = np.where(c > 0, pg, pg + n), np.abs(c)
    keep = c != 0
    pe, pc, py, px = pe[keep], pc[keep], py[keep], px[keep]
    while len(pe):
        present = np.zeros(len(uy), bool)
        present[pe] = True
        e = np.flatnonzero(present)  # the edges with points outside, in order (np.unique without sorting)
        k = (np.cumsum(present) - 1)[pe]  # which split each point belongs to
        far = _first_max(k, pc, len(e))  # the point farthest outside each edge
        fy, fx = py[far], px[far]
        split[e] = True
        m = len(uy)
        uy, ux = np.r_[uy, uy[e], fy], np.r_[ux, ux[e], fx]
        vy, vx = np.r_[vy, fy, vy[e]], np.r_[vx, fx, vx[e]]
        eg = np.r_[eg, eg[e], eg[e]]
        split = np.r_[split, np.zeros(2 * len(e), bool)]
        c1 = _cross(uy[m + k], ux[m + k], fy[k], fx[k], py, px)
        c2 = _cross(fy[k], fx[k], vy[m + len(e) + k], vx[m + len(e) + k], py, px)
        pe = np.where(c1 > 0, m + k, m + len(e) + k)
        pc = np.where(c1 > 0, c1, c2)
        keep = (c1 > 0) | (c2 > 0)
        pe, pc, py, px = pe[keep], pc[keep], py[keep], px[keep]
    final = ~split
    return np.stack([uy[final], vy[final], eg[final]], -1), np.stack([ux[final], vx[final]], -1)


def _first_max(group: np.ndarray, value: np.ndarray, n: int, lowest: bool = False) -> np.ndarray:
    """Index of the first largest (or smallest) ``value`` in each of the groups 0..n-1 (none empty)."""
    best = np.full(n, np.iinfo(np.int64).max if lowest else np.iinfo(np.int64).min)
    (np.minimum if lowest else np.maximum).at(best, group, value)
    at = np.flatnonzero(value == best[group])[::-1]
    first = np.empty(n, np.int64)
    first[group[at]] = at  # the last write wins: the first index
    return first


def _cross(uy, ux, vy, vx, py, px):
    return (vx - ux) * (py - uy) - (vy - uy) * (px - ux)
