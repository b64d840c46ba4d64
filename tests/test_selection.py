"""Checkpoint selection without masks: tag F1 (hand-computed values) and the selection rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosa.data import DatasetIndex, Sample
from cosa.errors import ConfigError
from cosa.evaluation.metrics import TagAgreement
from cosa.train.selection import Selection, resolve_select_metric


def test_tag_f1_hand_computed() -> None:
    tags = TagAgreement(num_foreground=3, min_area=0.1)
    prediction = np.zeros((10, 10), dtype=np.int64)
    prediction[:5] = 1  # class 1 on 50%
    prediction[5, :5] = 2  # class 2 on 5%: below min_area, not predicted
    tags.update(prediction, np.array([1, 0, 1]))  # predicted {1}, tagged {1, 3}: F1 = 2/3
    assert tags.score() == pytest.approx(2 / 3)
    tags.update(np.zeros((4, 4), dtype=np.int64), np.zeros(3))  # both empty: 1.0
    assert tags.score() == pytest.approx((2 / 3 + 1.0) / 2)
    tags.update(np.full((4, 4), 3), np.zeros(3))  # an invented class on a background image: 0.0
    assert tags.score() == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert np.isnan(TagAgreement(3).score())


def _index(masks: list[bool]) -> DatasetIndex:
    samples = tuple(
        Sample(f"{i}", Path(f"{i}.jpg"), Path(f"{i}.png") if has else None, np.zeros(2))
        for i, has in enumerate(masks)
    )
    return DatasetIndex(Path("d"), "tagged", "val", ("background", "a", "b"), (), samples)


def test_auto_picks_miou_with_any_mask_and_tag_f1_without() -> None:
    assert resolve_select_metric("auto", _index([False, True])) == "miou"
    assert resolve_select_metric("auto", _index([False, False])) == "tag_f1"
    # Only the evaluated images count: eval_max_images=1 scores no image with a mask.
    assert resolve_select_metric("auto", _index([False, True]), max_images=1) == "tag_f1"
    assert resolve_select_metric("tag_f1", _index([True])) == "tag_f1"
    with pytest.raises(ConfigError, match="select_metric=miou needs masks .* use .*auto or tag_f1"):
        resolve_select_metric("miou", _index([False]))
    with pytest.raises(ConfigError, match="must be one of auto, miou, tag_f1"):
        resolve_select_metric("accuracy", _index([True]))


def test_selection_keeps_the_best_and_round_trips() -> None:
    selection = Selection("tag_f1", "val")
    assert selection.consider(0.5, 100)
    assert not selection.consider(float("nan"), 200) and not selection.consider(None, 250)
    assert not selection.consider(0.4, 300)
    assert selection.consider(0.6, 400)
    stored = selection.to_dict()
    assert stored == {
        "selection_metric": "tag_f1",
        "selection_split": "val",
        "best_score": 0.6,
        "best_iteration": 400,
    }
    resumed = Selection("tag_f1", "val")
    resumed.restore(stored)
    assert (resumed.best_score, resumed.best_iteration) == (0.6, 400)
    old = Selection("miou", "val")
    old.restore({"best_val_miou": 0.3, "best_iteration": 5, "selection_split": "val"})
    assert (old.best_score, old.best_iteration) == (0.3, 5)
    with pytest.raises(ConfigError, match="chose best.pt by tag_f1, but its data now selects"):
        Selection("miou", "val").restore(stored)
