"""The competition's instance score on tiny label images with answers worked out by hand."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from unet_pl.metrics import THRESHOLDS, DSBScore, dsb_image_score, dsb_score, instance_iou, label_components

from conftest import REAL_DATA_DIR as DSB  # noqa: E402


def square(shape=(20, 20), *boxes):
    """Label image with box k (r0, r1, c0, c1) given label k + 1."""
    out = np.zeros(shape, np.int32)
    for k, (r0, r1, c0, c1) in enumerate(boxes, 1):
        out[r0:r1, c0:c1] = k
    return out


def test_thresholds():
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def test_perfect_match_scores_one():
    true = square((20, 20), (0, 5, 0, 5), (10, 15, 10, 18))
    pred = np.where(true == 1, 7, np.where(true == 2, 3, 0))  # label values need not match
    s = dsb_image_score(true, pred)
    assert s.score == 1.0 and s.n_true == 2 and s.n_pred == 2
    assert (s.per_threshold == 1).all()


def test_instance_iou_by_hand():
    true = square((10, 10), (0, 2, 0, 5))  # 10 pixels
    pred = square((10, 10), (0, 2, 0, 3), (0, 2, 3, 5), (8, 10, 8, 10))  # 6 + 4 px, and 4 elsewhere
    np.testing.assert_allclose(instance_iou(true, pred), [[0.6, 0.4, 0.0]])


def test_one_nucleus_split_in_two():
    true = square((10, 10), (0, 1, 0, 10))  # a 1x10 strip
    pred = square((10, 10), (0, 1, 0, 7), (0, 1, 7, 10))  # 7 px (IoU 0.7) + 3 px (IoU 0.3)
    s = dsb_image_score(true, pred)
    # t in 0.5..0.65: the 7-px part is a hit (IoU 0.7 > t): TP 1, FP 1, FN 0 -> 1/2.
    # t >= 0.7: 0.7 is not > 0.7, no hit: TP 0, FP 2, FN 1 -> 0.
    np.testing.assert_allclose(s.per_threshold, [0.5] * 4 + [0.0] * 6)
    assert s.score == pytest.approx(0.2)


@pytest.mark.parametrize("shift, hits", [(1, 7), (2, 4), (5, 0)])
def test_shifted_nucleus_crosses_some_thresholds(shift, hits):
    true = square((20, 20), (0, 10, 0, 10))
    pred = square((20, 20), (0, 10, shift, 10 + shift))
    # IoU = (100 - 10s) / (100 + 10s): 90/110 = 0.818 (hits up to 0.8), 80/120 = 0.667, 50/150 = 0.333.
    s = dsb_image_score(true, pred)
    np.testing.assert_allclose(s.per_threshold, [1.0] * hits + [0.0] * (10 - hits))
    assert s.score == pytest.approx(hits / 10)


def test_extra_and_missing_nuclei():
    true = square((20, 20), (0, 5, 0, 5), (10, 15, 10, 15))  # A, B
    pred = square((20, 20), (0, 5, 0, 5), (0, 5, 12, 17))  # A, C (extra); B missed
    s = dsb_image_score(true, pred)
    assert s.score == pytest.approx(1 / 3)  # TP 1, FP 1, FN 1 at every threshold
    only_extra = dsb_image_score(square((20, 20), (0, 5, 0, 5)), pred)
    assert only_extra.score == pytest.approx(1 / 2)  # TP 1, FP 1, FN 0
    only_missing = dsb_image_score(true, square((20, 20), (0, 5, 0, 5)))
    assert only_missing.score == pytest.approx(1 / 2)  # TP 1, FP 0, FN 1


def test_empty_images():
    empty = np.zeros((8, 8), np.int32)
    some = square((8, 8), (1, 3, 1, 3))
    assert dsb_image_score(empty, empty).score == 1.0
    assert dsb_image_score(empty, some).score == 0.0
    assert dsb_image_score(some, empty).score == 0.0


def test_sparse_label_values_and_errors():
    true = square((10, 10), (0, 3, 0, 3), (5, 9, 5, 9))
    pred = np.where(true == 1, 2**40, np.where(true == 2, 123_456_789, 0))  # hash-like label values
    assert dsb_image_score(true, pred).score == 1.0
    with pytest.raises(ValueError, match="shape"):
        dsb_image_score(true, true[:5])
    with pytest.raises(ValueError, match="bool mask"):
        dsb_image_score(true, true > 0)
    with pytest.raises(ValueError, match=">= 0"):
        dsb_image_score(true, -true)


def test_set_score_is_mean_over_images():
    a = square((20, 20), (0, 10, 0, 10))
    score, per_t = dsb_score([a, a, a], [a, square((20, 20), (0, 10, 1, 11)), np.zeros_like(a)])
    assert score == pytest.approx((1.0 + 0.7 + 0.0) / 3)
    np.testing.assert_allclose(per_t, [(1 + 1 + 0) / 3] * 7 + [1 / 3] * 3)


def test_label_components_are_8_connected():
    m = np.zeros((2, 5, 5), bool)
    m[0, 0, 0] = m[0, 1, 1] = True  # diagonal neighbours: one nucleus
    m[0, 4, 4] = True
    m[1, 2, 2] = True
    labels = label_components(torch.from_numpy(m))
    assert labels.shape == (2, 5, 5)
    assert labels[0].max() == 2 and labels[0, 0, 0] == labels[0, 1, 1]
    assert labels[1].max() == 1


def test_dsb_score_metric_accumulates_image_scores():
    a = torch.from_numpy(square((20, 20), (0, 10, 0, 10)))
    shifted = torch.from_numpy(square((20, 20), (0, 10, 1, 11)))
    metric = DSBScore()
    metric.update(torch.stack([a, shifted]), torch.stack([a, a]))
    metric.update(torch.zeros(1, 20, 20, dtype=torch.int32), a[None])
    assert metric.compute().item() == pytest.approx((1.0 + 0.7 + 0.0) / 3)
    assert metric.compute_per_threshold().tolist() == pytest.approx([2 / 3] * 7 + [1 / 3] * 3)
    metric.reset()
    metric.update(a, a)  # one (H, W) image
    assert metric.compute().item() == 1.0


def _real_labels(n=3):
    from PIL import Image

    out = []
    for d in sorted((DSB / "stage1_train").iterdir())[:n]:
        masks = sorted((d / "masks").glob("*.png"))
        labels = None
        for k, m in enumerate(masks, 1):
            a = np.asarray(Image.open(m)) > 0
            labels = np.zeros(a.shape, np.int32) if labels is None else labels
            labels[a] = k
        out.append(labels)
    return out


@pytest.mark.skipif(not (DSB / "stage1_train").is_dir(), reason="shared DSB 2018 data not present")
def test_truth_against_itself_is_one_on_real_images():
    for labels in _real_labels():
        rng = np.random.default_rng(0)
        permuted = np.concatenate([[0], rng.permutation(labels.max()) + 1])[labels]  # other label values
        s = dsb_image_score(labels, permuted)
        assert s.score == 1.0 and s.n_true == s.n_pred == labels.max() > 0


def test_lit_unet_logs_val_dsb_score():
    import lightning.pytorch as pl

    from unet_pl import LitUNet

    torch.manual_seed(0)
    labels = torch.zeros(2, 32, 32, dtype=torch.int32)
    labels[0, 4:12, 4:12] = 1
    labels[0, 20:28, 20:28] = 2
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    items = [{"image": images[i], "mask": (labels[i] > 0).to(torch.uint8)[None], "labels": labels[i],
              "id": str(i), "size": torch.tensor([32, 32])} for i in range(2)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(items, batch_size=2)

    def validate_with(logits: torch.Tensor) -> dict:
        model = LitUNet(img_size=32)
        model.forward = lambda x: logits.to(x.device)  # a model that predicts exactly these logits
        (metrics,) = trainer.validate(model, dataloaders=loader, verbose=False)
        return metrics

    perfect = validate_with(torch.where(labels[:, None] > 0, 10.0, -10.0))
    assert perfect["val/dsb_score"] == pytest.approx(1.0)  # both nuclei found; the empty image predicted empty
    nothing = validate_with(torch.full((2, 1, 32, 32), -10.0))
    assert nothing["val/dsb_score"] == pytest.approx(0.5)  # image 0: 2 missed -> 0; image 1: empty, empty -> 1
    assert "val/iou" in perfect


def test_huge_label_values_are_renumbered_not_histogrammed():
    true = np.zeros((256, 256), np.int64)
    true[10:20, 10:20] = 200_000
    pred = true.copy()
    pred[100:110, 100:110] = 199_999  # an extra nucleus
    s = dsb_image_score(true, pred)  # a dense histogram would need 200001**2 cells
    assert s.score == pytest.approx(0.5) and (s.n_true, s.n_pred) == (1, 2)


def test_evaluate_reads_a_masks_folder_as_training_does(make_train_dir, tmp_path):
    from conftest import write_png

    from unet_pl.evaluation import load_truth

    root = make_train_dir(n=2)
    rgba = np.zeros((40, 48, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha everywhere: only the colour channels say where the nucleus is
    rgba[30:34, 2:6, :3] = 255
    write_png(root / "img00" / "masks" / "m9.png", rgba)
    (root / "img00" / "masks" / "._m0.png").write_bytes(b"macOS resource fork, not a PNG")
    truth = load_truth(tmp_path)  # the parent of stage1_train, as training accepts
    labels = truth["img00"][0]()
    assert sorted(truth) == ["img00", "img01"]
    assert labels.max() == 3 and (labels == 3).sum() == 16  # the RGBA mask is its 4x4 square, not the whole image
