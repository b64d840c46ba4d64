"""Confusion-matrix mIoU against hand-computed values."""

import numpy as np
import pytest

from cosa.evaluation.metrics import ConfusionMatrix, PartialLabelScore


def test_miou_hand_computed_with_ignore() -> None:
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    scores = cm.scores()
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3;
    # class 2: tp 1, gt 2, pred 1 -> 1/2
    np.testing.assert_allclose(scores.iou, [1 / 3, 2 / 3, 1 / 2])
    assert scores.miou == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores.pixel_accuracy == pytest.approx(4 / 6)


def test_absent_class_is_nan_and_skipped() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((2, 2), int), np.zeros((2, 2), int))
    scores = cm.scores()
    assert scores.iou[0] == 1.0 and np.isnan(scores.iou[1]) and scores.miou == 1.0
    assert scores.per_class(["bg", "a", "b"]) == {"bg": 1.0, "a": None, "b": None}


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(2).update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_partial_label_score_hand_computed() -> None:
    score = PartialLabelScore(num_classes=2)
    assert score.miou() is None and score.coverage() is None
    labels = np.array([[0, 1, 255, 1]])
    truth = np.array([[0, 1, 1, 255]])  # 3 labelled truth pixels, 2 of them labelled by both
    score.update(labels, truth)
    assert score.coverage() == pytest.approx(2 / 3)
    assert score.miou() == pytest.approx(1.0)  # both shared pixels agree
    score.update(np.array([[1, 1]]), np.array([[0, 1]]))
    # background: tp 1, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3
    assert score.miou() == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert score.coverage() == pytest.approx(4 / 5)
