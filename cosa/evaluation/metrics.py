"""Segmentation metrics: mIoU from one confusion matrix (METHOD.md section 7), and tag F1, the
agreement of a segmentation with the image's tags, which needs no masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosa.choices import IGNORE_INDEX


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


class PartialLabelScore:
    """Quality of a label map that may leave pixels unlabelled (255): a CAM pseudo-label, a
    pseudo-mask. mIoU is taken on the pixels both it and the ground truth label; coverage is the
    share of the ground truth's labelled pixels that it labels. Read the two together: ignoring
    every hard pixel raises the first and lowers the second."""

    def __init__(self, num_classes: int) -> None:
        self.matrix = ConfusionMatrix(num_classes)
        self.labelled = 0  # pixels labelled by both
        self.truth_labelled = 0  # pixels labelled by the ground truth
        self.images = 0

    def update(self, labels: np.ndarray, truth: np.ndarray) -> None:
        """Add one image: `labels` and `truth` integer (H, W) ids, 255 = unlabelled."""
        keep = (labels != IGNORE_INDEX) & (truth != IGNORE_INDEX)
        self.matrix.update(np.where(keep, labels, 0), np.where(keep, truth, IGNORE_INDEX))
        self.labelled += int(keep.sum())
        self.truth_labelled += int((truth != IGNORE_INDEX).sum())
        self.images += 1

    def miou(self) -> float | None:
        """mIoU on the pixels both label (None before any image)."""
        return self.matrix.scores().miou if self.images else None

    def coverage(self) -> float | None:
        """Share of the ground truth's labelled pixels this labels (None before any)."""
        return self.labelled / self.truth_labelled if self.truth_labelled else None


MIN_TAG_AREA = 0.01
"""Share of an image a class must cover to count as predicted by `TagAgreement`. Bilinear upsampling
of stride-16 logits leaves slivers of a neighbouring class along object borders; 1% of the image
ignores those while a small object (a 16 x 16 cell of a 160 x 160 image) still counts."""


class TagAgreement:
    """Mean per-image F1 between the classes a segmentation shows and the image's tags.

    For one image, predicted = foreground classes covering at least `min_area` of its pixels,
    tagged = its image-level label; F1 = 2 |predicted & tagged| / (|predicted| + |tagged|), and 1.0
    when both are empty (a background-only image segmented as background). The score is the mean
    over images: it rewards finding every tagged class and penalises inventing untagged ones, and
    it needs no masks, so it can choose a checkpoint on a validation split that has only tags.
    """

    def __init__(self, num_foreground: int, min_area: float = MIN_TAG_AREA) -> None:
        self.num_foreground = num_foreground
        self.min_area = min_area
        self.total = 0.0
        self.images = 0

    def update(self, prediction: np.ndarray, label: np.ndarray) -> None:
        """Add one image: `prediction` integer (H, W) class ids, `label` (C,) in {0, 1}."""
        counts = np.bincount(prediction.ravel(), minlength=self.num_foreground + 1)
        predicted = counts[1 : self.num_foreground + 1] >= self.min_area * prediction.size
        tagged = np.asarray(label) > 0
        both = int(np.sum(predicted & tagged))
        either = int(predicted.sum() + tagged.sum())
        self.total += 1.0 if either == 0 else 2.0 * both / either
        self.images += 1

    def score(self) -> float:
        """The mean F1 in [0, 1] (NaN before any image)."""
        return self.total / self.images if self.images else float("nan")
