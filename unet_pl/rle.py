"""Run-length encoding in the 2018 Data Science Bowl's format. numpy only.

Pixels are numbered from 1, column-major (top to bottom, then left to right): pixel ``(r, c)``
of an ``(H, W)`` image is number ``c * H + r + 1``. A mask is the space-separated pairs
``start length`` of its runs of foreground, in increasing order, e.g. ``"1 3 10 5"`` is pixels
1, 2, 3 and 10..14. The empty string is the empty mask.
"""
from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> str:
    """``mask``: bool (or 0/1) ``(H, W)``, foreground True -> ``"start length start length ..."``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"encode expects one 2-D mask (H, W), got shape {mask.shape}")
    flat = np.concatenate([[False], mask.astype(bool).ravel(order="F"), [False]])
    # Positions where the value changes: run starts and run ends alternate.
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    runs = np.empty(2 * len(starts), dtype=np.int64)
    runs[0::2] = starts + 1  # numbered from 1
    runs[1::2] = ends - starts
    return " ".join(map(str, runs.tolist()))


def parse(rle: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Check ``rle`` against an image of ``shape`` and return ``(starts, lengths)``, starts from 1.

    Raises ``ValueError`` naming the problem for an odd number of values, values that are not
    integers, starts below 1, lengths below 1, runs past ``H * W``, and runs that overlap or
    are out of order.
    """
    if rle is None or (isinstance(rle, float) and np.isnan(rle)):  # pandas' empty cell
        rle = ""
    if not isinstance(rle, str):
        raise ValueError(f"run-length encoding must be a string, got {type(rle).__name__}")
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"run-length encoding has an odd number of values ({len(tokens)}); expected 'start length' pairs: {_short(rle)}")
    try:
        values = np.array(tokens, dtype=np.int64)
    except (ValueError, OverflowError):
        bad = next((t for t in tokens if not t.lstrip("+-").isdigit()), None)
        what = f"a value that is not an integer ({bad!r})" if bad else "a value too large for int64"
        raise ValueError(f"run-length encoding has {what}: {_short(rle)}") from None
    starts, lengths = values[0::2], values[1::2]
    n = int(shape[0]) * int(shape[1])
    if (starts < 1).any():
        raise ValueError(f"run-length encoding has a start below 1 ({starts.min()}); pixels are numbered from 1: {_short(rle)}")
    if (lengths < 1).any():
        raise ValueError(f"run-length encoding has a run length below 1 ({lengths.min()}): {_short(rle)}")
    ends = starts + lengths - 1  # last pixel of each run, inclusive
    if len(ends) and ends.max() > n:
        raise ValueError(
            f"run-length encoding runs past the image: pixel {ends.max()} > {n} = {shape[0]}x{shape[1]}; "
            f"is the shape (height, width) right? {_short(rle)}"
        )
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if len(bad):
        i = bad[0]
        raise ValueError(
            f"run-length encoding has overlapping or unsorted runs: run {i + 2} starts at {starts[i + 1]}, "
            f"before run {i + 1} ({starts[i]} {lengths[i]}) ends: {_short(rle)}"
        )
    return starts, lengths


def decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """``"start length ..."`` -> bool ``(H, W)`` mask; ``shape`` is ``(H, W)``. See ``parse`` for errors."""
    starts, lengths = parse(rle, shape)
    h, w = int(shape[0]), int(shape[1])
    # +1 where each run starts, -1 just after it ends; the running sum is the mask.
    step = np.zeros(h * w + 1, dtype=np.int8)
    step[starts - 1] = 1
    step[starts - 1 + lengths] -= 1
    return np.cumsum(step[:-1], dtype=np.int8).astype(bool).reshape(w, h).T


def encode_labels(labels: np.ndarray) -> list[str]:
    """One string per nucleus of an int label image ``(H, W)`` (0 background), in label order.

    Equivalent to ``[encode(labels == k) for k in 1..max]`` for present labels, but in one pass.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"encode_labels expects one 2-D label image (H, W), got shape {labels.shape}")
    h, w = labels.shape
    if not labels.size:
        return []
    # Runs of equal value in column-major order, found in the array's own (row-major) order: a
    # column-major copy of a large image costs more than everything else here. A pixel starts a
    # run when the pixel above differs (for a column's top pixel: the previous column's bottom one),
    # ends one when the pixel below differs (the next column's top one).
    fg = labels != 0
    first = np.empty((h, w), bool)
    last = np.empty((h, w), bool)
    np.not_equal(labels[1:], labels[:-1], out=first[1:])
    np.copyto(last[:-1], first[1:])
    first[0, 0], last[-1, -1] = True, True
    np.not_equal(labels[0, 1:], labels[-1, :-1], out=first[0, 1:])
    np.copyto(last[-1, :-1], first[0, 1:])
    first &= fg
    last &= fg
    r, c = np.divmod(np.flatnonzero(first), w)
    start = np.sort(c * h + r)  # column-major numbers from 0
    r, c = np.divmod(np.flatnonzero(last), w)
    end = np.sort(c * h + r)  # runs do not overlap: the k-th start goes with the k-th end
    value = labels[start % h, start // h]
    if not len(value):
        return []
    order = np.argsort(value, kind="stable")  # runs, not pixels: a few per nucleus column
    start, length, value = start[order] + 1, (end - start + 1)[order], value[order]  # numbered from 1
    words = list(map(str, np.stack([start, length], 1).ravel().tolist()))
    edges = [0, *(2 * (np.flatnonzero(np.diff(value)) + 1)).tolist(), len(words)]
    return [" ".join(words[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def _short(rle: str, n: int = 60) -> str:
    return repr(rle if len(rle) <= n else rle[:n] + "...")


def decode_labels(rles: list[str], shape: tuple[int, int], allow_overlap: bool = False) -> np.ndarray:
    """One int32 label image ``(H, W)`` from one string per nucleus: nucleus ``i`` of ``rles``
    (counting from 1, empty strings skipped but counted) gets label ``i``.

    Raises ``ValueError`` when two nuclei share a pixel (the competition rejects such
    submissions), unless ``allow_overlap``: then later nuclei overwrite earlier ones.
    """
    h, w = int(shape[0]), int(shape[1])
    parsed = [parse(r, shape) for r in rles]
    starts = np.concatenate([s for s, _ in parsed] + [np.zeros(0, np.int64)])
    lengths = np.concatenate([n for _, n in parsed] + [np.zeros(0, np.int64)])
    label = np.repeat(np.arange(1, len(parsed) + 1), [len(s) for s, _ in parsed])
    order = np.argsort(starts, kind="stable")
    starts, lengths, label = starts[order], lengths[order], label[order]
    clash = np.flatnonzero(starts[1:] < starts[:-1] + lengths[:-1])
    if len(clash):
        if not allow_overlap:
            a, b = sorted((int(label[clash[0]]), int(label[clash[0] + 1])))
            raise ValueError(f"nuclei {a} and {b} (rows counted from 1) overlap at pixel {starts[clash[0] + 1]}; "
                             "every pixel may belong to one nucleus only")
        out = np.zeros(h * w, dtype=np.int32)
        for i, (s, n) in enumerate(parsed, 1):  # rare: overlapping truth; later rows win
            out[_run_pixels(s, n)] = i
        return out.reshape(w, h).T
    # Runs are disjoint: +label where a run starts, -label just after it ends, then a running sum.
    step = np.zeros(h * w + 1, dtype=np.int64)
    step[starts - 1] += label
    np.add.at(step, starts - 1 + lengths, -label)  # a run may end where the next one starts
    return np.cumsum(step[:-1]).astype(np.int32).reshape(w, h).T


def _run_pixels(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """0-based flat indices of all pixels of the runs."""
    if not len(starts):
        return np.zeros(0, np.int64)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts - 1, lengths) + offsets
