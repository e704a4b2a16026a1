"""Boundary targets, watershed splitting, size-aware clean-up, TTA and tiling: tiny hand-made images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unet_pl.metrics import dsb_image_score
from skimage.measure import regionprops

from unet_pl.inference.postprocess import (
    CONCAVE_MIN_AREA, CONCAVE_SOLIDITY, components, fill_holes, probabilities_to_labels, relabel, remove_doubtful, remove_small, renumber, split_concave,
    split_nuclei,
)
from unet_pl.data.targets import boundaries, distances, head_channels, make_targets
from unet_pl.inference.predict import labels_from_probabilities
from unet_pl.inference.settings import LEGACY_SEED_THRESHOLDS, Settings
from unet_pl.inference.tiling import pad_to_multiple, predict_whole, tile_side, tile_starts
from unet_pl.inference.tta import forward_view, inverse_view, tta_predict, views


def two_touching_discs(h: int = 40, w: int = 60, r: int = 10) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    lab = np.zeros((h, w), np.int32)
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 < r * r] = 1
    lab[(yy - 20) ** 2 + (xx - 20 - 2 * r + 4) ** 2 < r * r] = 2  # overlaps disc 1's edge: they touch
    return lab


# ------------------------------------------------------------------ targets


def test_boundary_is_each_nucleus_outer_ring_and_the_line_between_two():
    lab = np.zeros((8, 10), np.int32)
    lab[2:6, 1:5] = 1
    lab[2:6, 5:9] = 2
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        [0, 1, 0, 0, 1, 1, 0, 0, 1, 0],
        [0, 1, 0, 0, 1, 1, 0, 0, 1, 0],
        [0, 1, 1, 1, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    ], np.uint8)
    assert (boundaries(lab) == expected).all()
    # The image's own edge is not a boundary: a nucleus filling the image has none.
    assert boundaries(np.ones((4, 4), np.int32)).sum() == 0


def test_make_targets_channels_per_head():
    lab = two_touching_discs()
    assert make_targets(lab, "mask").shape == (1, *lab.shape)
    t = make_targets(lab, "mask+boundary")
    assert t.shape == (2, *lab.shape) and set(np.unique(t)) == {0.0, 1.0}
    assert (t[0] == (lab > 0)).all() and (t[1] <= t[0]).all()
    t3 = make_targets(lab, "mask+boundary+distance")
    assert t3.shape == (3, *lab.shape) and (t3[:2] == t).all() and (t3[2] == distances(lab)).all()
    assert head_channels("mask") == 1 and head_channels("mask+boundary") == 2 and head_channels("mask+boundary+distance") == 3
    with pytest.raises(ValueError, match="choose one of mask, mask\\+boundary"):
        head_channels("contour")


def _brute_force_depth(lab: np.ndarray) -> np.ndarray:
    """Each nucleus pixel's Euclidean distance to the nearest pixel of the image with another label
    (background or another nucleus), over the largest in its 8-connected piece of the nucleus
    (scikit-image's label): every pair of pixels compared."""
    from skimage.measure import label

    out = np.zeros(lab.shape)
    for k in np.unique(lab[lab > 0]):
        own, other = np.argwhere(lab == k), np.argwhere(lab != k)
        d = np.zeros(lab.shape)
        d[lab == k] = np.sqrt(((own[:, None, :] - other[None, :, :]) ** 2).sum(-1)).min(1)
        pieces = label(lab == k, connectivity=2)
        for p in range(1, pieces.max() + 1):
            out[pieces == p] = d[pieces == p] / d[pieces == p].max()
    return out


def test_distance_target_is_each_pixels_depth_in_its_own_nucleus():
    lab = two_touching_discs()
    lab[0:5, 50:60] = 3  # cut by the image's edge, which is not its outside
    lab[30:40, 44:52] = 4  # one nucleus in two pieces (as a crop can leave it): each has its centre
    lab[33:36, 54:57] = 4
    d = distances(lab)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, _brute_force_depth(lab), atol=1e-6)
    assert (d[lab == 0] == 0).all() and all(d[lab == k].max() == 1.0 for k in (1, 2, 3))
    assert d[30:40, 44:52].max() == d[33:36, 54:57].max() == 1.0
    assert d[0, 55] == 1.0  # the edge nucleus is deepest on the image's edge
    # where the discs touch, each is shallow: a line between two nuclei, as the boundary draws it
    line = (boundaries(lab) == 1) & (lab > 0) & (np.abs(np.mgrid[:40, :60][1] - 27.5) < 2)
    assert line.any() and d[line].max() < 0.3
    assert (distances(np.ones((5, 5), np.int32)) == 1).all() and not distances(np.zeros((3, 3), np.int32)).any()


# ------------------------------------------------------------------ splitting nuclei


def test_watershed_splits_touching_nuclei_that_components_merge():
    lab = two_touching_discs()
    fg, b = (lab > 0).astype(np.float32), boundaries(lab).astype(np.float32)
    assert components(fg > 0.5).max() == 1  # the notebook's way: one blob
    split = split_nuclei(fg, b)
    assert split.max() == 2
    assert dsb_image_score(lab, split).score == 1.0  # the rings grow back: exactly the truth
    assert dsb_image_score(lab, components(fg > 0.5)).score < 0.1  # the merged blob matches one disc at IoU 0.5 at most


def test_distance_channel_splits_what_a_faint_boundary_does_not():
    """With a third (distance) output, seeds need a low boundary and a high depth: two touching
    nuclei whose boundary output is blank between them are still two, as the depth falls there."""
    lab = two_touching_discs()
    fg = (lab > 0).astype(np.float32)
    faint = np.where(lab > 0, 0.0, 1.0).astype(np.float32)  # no line between the discs
    prob = np.stack([fg, faint])
    assert probabilities_to_labels(prob, seed_threshold=0.3).max() == 1
    out = probabilities_to_labels(np.concatenate([prob, distances(lab)[None]]), seed_threshold=0.3)
    assert out.max() == 2 and dsb_image_score(lab, out).score == 1.0
    # at the native default seed threshold (0.15, what validation during training uses), small
    # touching nuclei (about 50 px each) are still two
    yy, xx = np.mgrid[:20, :30]
    small = np.zeros((20, 30), np.int32)
    small[(yy - 10) ** 2 + (xx - 10) ** 2 <= 16] = 1
    small[((yy - 10) ** 2 + (xx - 17) ** 2 <= 16) & (small == 0)] = 2
    assert all(35 < (small == k).sum() < 55 for k in (1, 2)) and (small[:, 1:] * small[:, :-1] == 2).sum() >= 3  # they touch
    out = probabilities_to_labels(np.stack([(small > 0).astype(np.float32), np.where(small > 0, 0.0, 1.0),
                                            distances(small)]), seed_threshold=LEGACY_SEED_THRESHOLDS["native"])
    assert out.max() == 2 and dsb_image_score(small, out).score == 1.0
    # a high boundary still vetoes a seed where the depth is high
    blocked = np.stack([fg, np.ones_like(fg), distances(lab)])
    assert probabilities_to_labels(blocked, seed_threshold=0.3).max() == 1  # no seed: the blob is one nucleus


def test_watershed_keeps_seedless_blobs():
    fg = np.zeros((20, 20), np.float32)
    fg[2:4, 2:4] = 1  # a 2x2 nucleus, all boundary: no seed (and a 1-pixel core would be under min_seed), still a nucleus
    fg[10:18, 10:18] = 1
    b = np.zeros_like(fg)
    b[2:4, 2:4] = 1
    b[10:18, 10] = b[10:18, 17] = b[10, 10:18] = b[17, 10:18] = 1
    out = split_nuclei(fg, b)
    small, big = np.unique(out[2:4, 2:4]), np.unique(out[10:18, 10:18])
    assert out.max() == 2 and len(small) == len(big) == 1 and small[0] != big[0] and 0 not in (small[0], big[0])


def _one_watershed(fg, boundary, threshold, seed_threshold, min_seed):
    """The reference: one scikit-image watershed over the whole image, unseeded blobs as 8-connected components."""
    from skimage.measure import label
    from skimage.morphology import remove_small_objects
    from skimage.segmentation import watershed

    mask = fg > threshold
    seeds = label(remove_small_objects(label(mask & (boundary < seed_threshold)), max_size=min_seed - 1))
    labels = watershed(boundary, seeds, mask=mask)
    orphans = label(mask & (labels == 0))
    labels = np.where(labels > 0, labels, np.where(orphans > 0, orphans + labels.max(), 0))
    values = np.unique(labels[labels > 0])  # renumber 1..k by old value
    return np.where(labels > 0, np.searchsorted(values, labels) + 1, 0)


@pytest.mark.parametrize("seed", range(3))
def test_split_nuclei_equals_one_watershed_over_the_whole_image(seed):
    """split_nuclei floods only blobs with two or more seeds, each in its box: the same nuclei,
    numbered alike, as scikit-image's watershed over the whole image."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    for _ in range(20):
        fg = ndi.gaussian_filter(rng.random((96, 120)), 2.5)
        b = ndi.gaussian_filter(rng.random((96, 120)), 1.5)
        fg, b = [(a - a.min()) / (a.max() - a.min()) for a in (fg, b)]
        for threshold, seed_threshold in ((0.5, 0.5), (0.4, 0.35), (0.6, 0.7)):
            ours = split_nuclei(fg, b, threshold, seed_threshold, min_seed=3)
            assert np.array_equal(ours, _one_watershed(fg, b, threshold, seed_threshold, 3))


def test_probabilities_to_labels_dispatch_and_errors():
    lab = two_touching_discs()
    prob = np.stack([(lab > 0), boundaries(lab)]).astype(np.float32)
    assert probabilities_to_labels(prob).max() == 2  # two channels: watershed by default
    assert probabilities_to_labels(prob, split="components").max() == 1
    assert probabilities_to_labels(prob[0]).max() == 1
    with pytest.raises(ValueError, match="boundary channel"):
        probabilities_to_labels(prob[:1], split="watershed")


def test_components_are_scikit_image_label():
    from scipy import ndimage as ndi
    from skimage.measure import label

    rng = np.random.default_rng(1)
    for i in range(50):
        mask = ndi.gaussian_filter(rng.random((57, 64)), 1.0 + i % 3) > 0.5 if i % 2 else rng.random((40, 41)) > 0.6
        assert np.array_equal(components(mask), label(mask))


def test_remove_small_and_relabel():
    lab = np.zeros((6, 6), np.int32)
    lab[0, 0] = 3
    lab[2:5, 2:5] = 7
    out = remove_small(lab, 2)
    assert out.max() == 1 and (out[2:5, 2:5] == 1).all() and out[0, 0] == 0
    assert (relabel(lab) == np.where(lab == 3, 1, np.where(lab == 7, 2, 0))).all()


def test_fill_holes_fills_background_only():
    lab = np.zeros((9, 9), np.int32)
    lab[1:8, 1:8] = 1
    lab[3:6, 3:6] = 0  # a 3x3 hole
    lab[4, 4] = 2  # with another nucleus inside it
    out = fill_holes(lab)
    assert out[4, 4] == 2 and (out[3:6, 3:6][lab[3:6, 3:6] == 0] == 1).all()
    open_ring = lab.copy()
    open_ring[4, 1:3] = 0  # a channel to the outside: not a hole
    open_ring[4, 4] = 0
    assert (fill_holes(open_ring) == open_ring).all()


def test_min_size_and_hole_filling_through_probabilities_to_labels():
    prob = np.zeros((12, 12), np.float32)
    prob[1:8, 1:8] = 0.9
    prob[3:5, 3:5] = 0.1  # hole
    prob[10, 10] = 0.9  # speck
    out = probabilities_to_labels(prob, min_size=4, holes=True)
    assert out.max() == 1 and (out[1:8, 1:8] == 1).all() and out[10, 10] == 0


# ------------------------------------------------------------------ TTA


@pytest.mark.parametrize("tta", ["none", "flips", "d4"])
def test_every_view_is_inverted(tta):
    x = torch.arange(2 * 3 * 16 * 32, dtype=torch.float32).reshape(2, 3, 16, 32)
    for k, flip in views(tta):
        v = forward_view(x, k, flip)
        assert (inverse_view(v, k, flip) == x).all()
    # An equivariant per-pixel model: TTA changes nothing.
    assert torch.allclose(tta_predict(lambda t: t.sigmoid(), x / 1000, tta), (x / 1000).sigmoid(), atol=1e-6)
    assert len(views(tta)) == {"none": 1, "flips": 4, "d4": 8}[tta]


def test_tta_averages_an_orientation_dependent_model():
    x = torch.zeros(1, 1, 4, 4)
    x[..., 0, 0] = 1
    # A model that shifts everything one pixel right: its TTA output smears over four directions.
    shift = lambda t: torch.roll(t, 1, dims=-1)  # noqa: E731
    y = tta_predict(shift, x, "d4")
    assert y.sum().item() == pytest.approx(1.0) and y[..., 0, 1] > 0 and y[..., 1, 0] > 0
    with pytest.raises(ValueError, match="none, flips, d4"):
        views("rot45")


# ------------------------------------------------------------------ tiling


def test_pad_to_multiple_mirrors_and_keeps_size():
    x = torch.arange(20, dtype=torch.float32).reshape(1, 1, 4, 5)
    p, size = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (8, 8) and size == (4, 5) and (p[..., :4, :5] == x).all()
    assert pad_to_multiple(torch.zeros(1, 1, 16, 32))[0].shape[-2:] == (16, 32)


def test_tiles_agree_with_whole_image_for_a_pointwise_model():
    x = torch.rand(1, 3, 300, 170)
    f = lambda t: t.mean(1, keepdim=True).sigmoid()  # noqa: E731
    whole = predict_whole(f, x, tile=1024)
    tiled = predict_whole(f, x, tile=96, margin=16)
    assert tiled.shape == (1, 1, 300, 170) and torch.equal(tiled, whole)


@pytest.mark.parametrize("tile,margin", [(1024, 64), (2048, 64), (96, 16)])
def test_tiles_cover_each_axis_once_with_as_few_tiles_as_the_size_allows(tile, margin):
    for n in range(1, 3 * tile, 7):
        side = tile_side(n, tile, margin)
        starts = tile_starts(n, side, margin)
        assert side <= tile and (side == n or side % 16 == 0)
        # the fewest tiles of at most `tile` whose centres (edges kept at the image's borders) cover n
        fewest = 1 if n <= tile else next(k for k in range(2, n) if k * (tile - 2 * margin) + 2 * margin >= n)
        assert len(starts) == fewest
        kept = np.zeros(n, int)
        for i, s0 in enumerate(starts):
            lo = s0 if i == 0 else s0 + margin
            hi = s0 + side if i == len(starts) - 1 else s0 + side - margin
            kept[lo:hi] += 1
        assert (kept >= 1).all() and starts[-1] + side == n


def test_batched_tiles_of_uint8_input_agree_with_the_whole_image():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    x8 = torch.randint(0, 256, (1, 3, 608, 96), dtype=torch.uint8)  # tall and thin: its tiles fit in one square
    calls = []

    def model(t):
        calls.append(t.shape[0])
        return conv(t)

    prepare = lambda t: t.float() / 255  # noqa: E731
    with torch.no_grad():
        whole = predict_whole(conv, prepare(x8), tile=1024)
        tiled = predict_whole(model, x8, tile=256, margin=16, prepare=prepare)
    assert torch.equal(tiled, whole)
    assert calls == [3]  # three tiles of 224 x 96 fit in one 256 x 256 square: one call


def test_tiles_agree_with_whole_image_for_a_local_model():
    # A 3x3 convolution sees one pixel beyond each output: with a 16-pixel margin every kept
    # pixel has its full context, so tiles reproduce the whole image exactly.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3, padding=1)
    x = torch.rand(1, 3, 208, 176)
    with torch.no_grad():
        whole = predict_whole(conv, x, tile=1024)
        tiled = predict_whole(conv, x, tile=96, margin=16)
    assert torch.allclose(tiled, whole, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        predict_whole(conv, x, tile=100)


def disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def touching_field() -> tuple[np.ndarray, list[np.ndarray]]:
    """Five round nuclei of radius 8, one ellipse twice their area, and two touching discs drawn as one
    nucleus (label 7): the labels, and the true nuclei of the touching pair."""
    shape = (60, 160)
    lab = np.zeros(shape, np.int32)
    for k, x in enumerate((10, 30, 50, 70, 90), start=1):
        lab[disc(shape, (12, x), 8)] = k
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab[((yy - 40) / 8) ** 2 + ((xx - 25) / 17) ** 2 <= 1] = 6  # convex, 2.1 x the median: stays whole
    left, right = disc(shape, (40, 100), 8), disc(shape, (40, 115), 8)  # centres 15 px apart: a waist
    lab[left | right] = 7
    return lab, [left & ~right, right & ~left]


def test_split_concave_cuts_two_touching_nuclei_and_leaves_convex_ones():
    lab, (left, right) = touching_field()
    props = {p.label: p for p in regionprops(lab)}
    assert props[7].solidity < CONCAVE_SOLIDITY < props[6].solidity  # the reference says which is concave
    assert props[6].area >= CONCAVE_MIN_AREA * np.median([p.area for p in props.values()])
    out = split_concave(lab)
    assert out.dtype == np.int32 and out.max() == 8
    for k in range(1, 7):  # untouched, same numbers
        assert np.array_equal(out == k, lab == k)
    pieces = [out == 7, out == 8]
    assert np.array_equal(pieces[0] | pieces[1], lab == 7)
    for truth in (left, right):  # each true disc is one of the pieces
        iou = max((truth & p).sum() / (truth | p).sum() for p in pieces)
        assert iou > 0.9
    assert np.array_equal(split_concave(lab[:, :45]), relabel(lab[:, :45]))  # two nuclei: no median, left alone


def test_split_concave_through_the_post_processing():
    lab, _ = touching_field()
    fg = (lab > 0).astype(np.float32)
    prob = np.stack([fg, np.zeros_like(fg)])  # no boundary drawn: the watershed keeps the pair in one piece
    assert probabilities_to_labels(prob, 0.5).max() == 7
    assert probabilities_to_labels(prob, 0.5, concave=True).max() == 8
    s = Settings(resolution="native", out_channels=2, threshold=0.5, split_concave=True)
    assert labels_from_probabilities(prob, s).max() == 8
    assert "concave nuclei cut" in s.describe() and "concave" not in s.replace(split_concave=False).describe()
    for wrong in ("no", "yes", 0.9, 1):  # "no" would otherwise switch the cut on
        with pytest.raises(ValueError, match="split_concave is True or False"):
            s.replace(split_concave=wrong)
    with pytest.raises(ValueError, match="fill_holes is True or False"):
        s.replace(fill_holes="no")


def test_segment_splits_concave_nuclei_when_asked():
    """The README's ``unet_pl.segment(net, image, split_concave=True)``, with a stand-in network that
    reads the foreground off the image and draws no boundary."""
    import unet_pl

    class Reader(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x[:, :1] * 20 - 10, torch.full_like(x[:, :1], -10.0)], 1)

    lab, _ = touching_field()
    image = np.where(lab > 0, 255, 0).astype(np.uint8)
    settings = Settings(resolution="native", out_channels=2, threshold=0.5)
    assert unet_pl.segment(Reader(), image, settings).max() == 7
    assert unet_pl.segment(Reader(), image, settings, split_concave=True).max() == 8


def test_remove_doubtful_by_relative_size_and_mean_probability():
    lab = np.zeros((40, 40), np.int32)
    lab[0:10, 0:10] = 3  # 100 px
    lab[20:30, 0:10] = 5  # 100 px
    lab[0:10, 20:30] = 8  # 100 px
    lab[35:37, 35:37] = 9  # 4 px speck
    fg = np.full((40, 40), 0.9, np.float32)
    fg[20:30, 0:10] = 0.55  # a faint nucleus
    # median area 100: the speck is 0.04 of it
    assert np.array_equal(remove_doubtful(lab, fg, min_relative_size=0.1), relabel(np.where(lab == 9, 0, lab)))
    assert np.array_equal(remove_doubtful(lab, fg, min_probability=0.6), relabel(np.where(lab == 5, 0, lab)))
    both = remove_doubtful(lab, fg, 0.1, 0.6)
    assert both.max() == 2 and set(np.unique(both[lab == 3])) == {1} and set(np.unique(both[lab == 8])) == {2}
    assert np.array_equal(remove_doubtful(lab, fg), relabel(lab))  # both off: only renumbered
    prob = np.stack([fg, np.zeros_like(fg)])
    assert probabilities_to_labels(prob, 0.5, split="components", min_relative_size=0.1).max() == 1  # one blob of fg


# --- contact weights ---------------------------------------------------------------------------


def test_contacts_mark_pixels_near_two_nuclei_by_a_brute_force_count():
    from unet_pl.data.targets import contacts

    lab = np.zeros((24, 30), np.int32)
    lab[3:10, 3:10] = 1
    lab[3:10, 10:16] = 2  # touches 1
    lab[12:20, 4:9] = 3  # 3 px below 1: near, not touching
    lab[14:20, 20:28] = 70000  # alone
    expected = np.zeros(lab.shape, np.uint8)
    for y in range(lab.shape[0]):
        for x in range(lab.shape[1]):
            window = lab[max(0, y - 2):y + 3, max(0, x - 2):x + 3]
            expected[y, x] = len(set(window[window > 0].tolist())) >= 2
    np.testing.assert_array_equal(contacts(lab), expected)
    np.testing.assert_array_equal(contacts(np.where(lab > 0, lab + 2 ** 24, 0)), expected)  # labels float32 cannot hold
    assert expected[3:10, 8:12].all() and not expected[14:20, 20:28].any()
    assert expected[10:12, 4:9].all()  # the 2-px gap between 1 and 3 counts: a watershed must cut there too


def test_dice_weight_adds_the_soft_dice_of_the_foreground_by_hand():
    import torch

    from unet_pl import LitUNet

    torch.manual_seed(1)
    logits, y = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.6).float()
    y[2, 0] = 0  # an image without a nucleus: its Dice term is 1 / (sum(p) + 1)
    bce = LitUNet(head="mask+boundary")._loss(logits, y)
    got = LitUNet(head="mask+boundary", dice_weight=2.0)._loss(logits, y)
    terms = []
    for i in range(3):  # the Dice of each image's foreground output, by hand, from plain sums
        p, t = torch.sigmoid(logits[i, 0]).tolist(), y[i, 0].tolist()
        inter = sum(a * b for ra, rb in zip(p, t) for a, b in zip(ra, rb))
        total = sum(map(sum, p)) + sum(map(sum, t))
        terms.append(1 - (2 * inter + 1) / (total + 1))
    torch.testing.assert_close(got, bce + 2.0 * sum(terms) / 3)
    mask_only = LitUNet(dice_weight=1.0)._loss(logits[:, :1], y[:, :1])
    torch.testing.assert_close(mask_only, LitUNet()._loss(logits[:, :1], y[:, :1]) + sum(terms) / 3)
    with pytest.raises(ValueError, match="dice_weight must be a number >= 0"):
        LitUNet(dice_weight=-1.0)


def test_lovasz_hinge_is_the_lovasz_extension_of_the_jaccard_loss_by_hand():
    """Berman et al.'s definition computed from sets: pixels sorted by hinge error, the Jaccard loss of the first
    k mispredicted (1 - |truth & prediction| / |truth | prediction|, the prediction with those k flipped), and
    the loss the sum of each error times its step in that Jaccard loss. On errors of 0 or 2 it is twice 1 - IoU."""
    import torch

    from unet_pl import LitUNet
    from unet_pl.lit import lovasz_hinge

    def by_sets(z, t):
        z, t = z.tolist(), [int(v) for v in t.tolist()]
        errors = [1 - a * (2 * b - 1) for a, b in zip(z, t)]
        order = sorted(range(len(z)), key=lambda i: -errors[i])
        truth = {i for i, v in enumerate(t) if v}
        total, before = 0.0, 0.0
        for k in range(1, len(z) + 1):
            flipped = set(order[:k])
            predicted = (truth - flipped) | (flipped - truth)
            loss = 1 - len(truth & predicted) / len(truth | predicted) if truth | predicted else 0.0
            total += max(errors[order[k - 1]], 0.0) * (loss - before)
            before = loss
        return total

    torch.manual_seed(3)
    for n_true in (0, 5, 20):
        z, t = torch.randn(40) * 2, torch.zeros(40)
        t[torch.randperm(40)[:n_true]] = 1
        torch.testing.assert_close(lovasz_hinge(z, t), torch.tensor(by_sets(z, t)), rtol=1e-5, atol=1e-6)
    t = (torch.rand(64) > 0.5).float()
    hard = torch.where(torch.rand(64) > 0.3, 2 * t - 1, 1 - 2 * t)  # logits +-1: right or wrong by exactly 1
    pred = hard > 0
    iou = (pred & (t > 0)).sum() / (pred | (t > 0)).sum()
    torch.testing.assert_close(lovasz_hinge(hard, t), 2 * (1 - iou))
    assert lovasz_hinge(3 * (2 * t - 1), t) == 0  # right by a margin: nothing to learn
    logits, y = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.6).float()
    got = LitUNet(head="mask+boundary", lovasz_weight=0.5)._loss(logits, y)
    per_image = sum(by_sets(logits[i, 0].flatten(), y[i, 0].flatten()) for i in range(3)) / 3
    torch.testing.assert_close(got, LitUNet(head="mask+boundary")._loss(logits, y) + 0.5 * torch.tensor(per_image),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lovasz_weight must be a number >= 0"):
        LitUNet(lovasz_weight=-1.0)


def test_contact_weight_weighs_the_loss_by_hand():
    import torch

    from unet_pl import LitUNet

    torch.manual_seed(0)
    logits, y = torch.randn(2, 2, 8, 8), (torch.rand(2, 2, 8, 8) > 0.7).float()
    contact = (torch.rand(2, 1, 8, 8) > 0.8).to(torch.uint8)
    model = LitUNet(head="mask+boundary", contact_weight=3.0)
    got = model._loss(logits, y, model._weights({"contact": contact}))
    p = torch.sigmoid(logits)
    pos = torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)  # boundary_weight 5 on the boundary's positives
    by_hand = -(pos * y * torch.log(p) + (1 - y) * torch.log(1 - p)) * (1 + 3 * contact.float())
    torch.testing.assert_close(got, by_hand.mean())
    assert LitUNet(head="mask+boundary")._weights({"contact": contact}) is None
    with pytest.raises(ValueError, match="needs the 'mask\\+boundary' head"):
        LitUNet(contact_weight=1.0)


def test_renumber_is_relabel_then_remove_small():
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 0, 0, 2, 5, 6, 9, 40], size=(30, 30)) * (rng.random((30, 30)) < 0.8)
    labels[0, :3] = 77  # a 3-pixel nucleus
    for min_size in (0, 1, 4, 60, 10_000):
        expected = remove_small(relabel(labels), min_size)
        got = renumber(labels, min_size)
        assert got.dtype == np.int32 and np.array_equal(got, expected), min_size
    assert renumber(labels, 4).max() == len(np.unique(labels)) - 2  # 77 dropped, the rest 1..k


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
def test_an_image_without_pixels_has_no_nuclei(shape):
    for prob in (np.zeros((2, *shape), np.float32), np.zeros((1, *shape), np.float32)):
        labels = probabilities_to_labels(prob, min_size=5, holes=True)
        assert labels.shape == shape and labels.dtype == np.int32
