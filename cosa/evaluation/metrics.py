"""Segmentation metrics from one confusion matrix (METHOD.md section 7)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


class ConfusionMatrix:
    """Accumulates a (K, K) confusion matrix over all pixels of a split; rows = ground truth.

    Pixels whose ground truth is `IGNORE_INDEX` (or outside 0..K-1) are skipped.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        """Add one image. `prediction`, `target`: integer arrays of the same (H, W) shape."""
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction {prediction.shape} and target {target.shape} differ in shape"
            )
        valid = target < self.num_classes
        index = target[valid].astype(np.int64) * self.num_classes + prediction[valid].astype(
            np.int64
        )
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix of the same size (e.g. from another DDP rank)."""
        self.matrix += other.matrix

    def scores(self) -> SegmentationScores:
        """IoU per class, mIoU over classes present in GT or prediction, pixel accuracy."""
        tp = np.diag(self.matrix).astype(np.float64)
        gt = self.matrix.sum(axis=1).astype(np.float64)
        pred = self.matrix.sum(axis=0).astype(np.float64)
        union = gt + pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
        total = self.matrix.sum()
        return SegmentationScores(
            iou=iou,
            miou=float(np.nanmean(iou)) if np.any(union > 0) else float("nan"),
            pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        )


@dataclass(frozen=True)
class SegmentationScores:
    """`iou`: (K,) per-class IoU (NaN for a class absent from both GT and prediction)."""

    iou: np.ndarray
    miou: float
    pixel_accuracy: float

    def per_class(self, class_names: list[str]) -> dict[str, float | None]:
        return {
            name: (None if np.isnan(v) else float(v))
            for name, v in zip(class_names, self.iou, strict=True)
        }
