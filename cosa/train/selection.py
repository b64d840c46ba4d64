"""Which evaluation chooses `best.pt`: the selection criterion and the best score so far.

With masks on the validation split, the seg stream's mIoU on them chooses. Without any (a user's
tagged photos), tag F1 does: the mean per-image F1 between the classes the seg stream shows and the
image's tags (`cosa.evaluation.metrics.TagAgreement`). It scores the network that is deployed, on
its deployed output, and needs only the tags every image already has; `benchmarks/own_data.py`
measures how often it picks the checkpoint val mIoU would pick.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cosa.config import SELECT_METRICS
from cosa.data import DatasetIndex
from cosa.errors import ConfigError

MASK_METRICS = ("miou", "cam_miou", "cam_miou_predicted_labels")
"""Criteria that need masks on the selection split."""


def resolve_select_metric(choice: str, index: DatasetIndex, max_images: int = 0) -> str:
    """The criterion `choice` means for the selection split `index`.

    Args:
        choice: a `SELECT_METRICS` entry; "auto" = "miou" when any evaluated image has a mask,
            else "tag_f1".
        index: the selection split.
        max_images: the evaluation's limit (0 = every image), so "auto" looks at what is scored.

    Raises:
        ConfigError: an unknown choice, or a mask criterion on a split whose evaluated images
            have no mask.
    """
    if choice not in SELECT_METRICS:
        raise ConfigError(
            f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, got {choice!r}"
        )
    scored = index.samples[:max_images] if max_images > 0 else index.samples
    has_masks = any(sample.mask_path is not None for sample in scored)
    if choice == "auto":
        return "miou" if has_masks else "tag_f1"
    if choice in MASK_METRICS and not has_masks:
        raise ConfigError(
            f"train.select_metric={choice} needs masks on the selection split {index.split!r} "
            f"of {index.root}, and none of its {len(scored)} evaluated images has one; use "
            "train.select_metric=auto or tag_f1"
        )
    return choice


@dataclass
class Selection:
    """The criterion choosing `best.pt` and the best evaluation so far (stored in checkpoints).

    Attributes:
        metric: the resolved criterion (never "auto").
        split: the selection split.
        best_score: the criterion's best value so far (higher is better), None before any.
        best_iteration: where it was reached.
    """

    metric: str
    split: str
    best_score: float | None = None
    best_iteration: int | None = None

    def consider(self, score: float | None, iteration: int) -> bool:
        """Record an evaluation; True when it is the new best (a NaN or None score never is)."""
        if score is None or math.isnan(score):
            return False
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_iteration = float(score), iteration
            return True
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "selection_metric": self.metric,
            "selection_split": self.split,
            "best_score": self.best_score,
            "best_iteration": self.best_iteration,
        }

    def restore(self, metrics: dict[str, Any]) -> None:
        """Continue from a checkpoint's `metrics` (checkpoints before tag F1 kept the best score
        as `best_val_miou`)."""
        stored = metrics.get("selection_metric", self.metric)
        if stored != self.metric:
            raise ConfigError(
                f"the run chose best.pt by {stored}, but its data now selects by {self.metric} "
                "(masks were added to or removed from the val split); restore the data or start "
                "a new run"
            )
        self.best_score = metrics.get("best_score", metrics.get("best_val_miou"))
        self.best_iteration = metrics.get("best_iteration")
