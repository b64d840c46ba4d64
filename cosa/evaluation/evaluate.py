"""Score a predictor on a dataset split.

Plain mIoU (headline), label-masked mIoU, CAM and CPL quality on the images that have masks; tag F1
(`cosa.evaluation.metrics.TagAgreement`) on every image, masks or not.

METHOD.md section 7. The label-masked metric (the reference's "Seg_vd") sets the logits of
foreground classes absent from the ground-truth image label to -inf before the argmax: it leaks
labels and is reported separately, under that name, never as the headline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cosa.data import DatasetIndex, EvalDataset
from cosa.evaluation.metrics import ConfusionMatrix, PartialLabelScore, TagAgreement
from cosa.evaluation.predictors import Predictor, normalised_image
from cosa.model import CosaNet
from cosa.pseudo import cam_pseudo_label, teacher_forward

CLASS_PRESENT_PROBABILITY = 0.5  # a class is predicted present when sigmoid(logit) exceeds it
CAM_BACKGROUND_THRESHOLD = 0.5  # METHOD.md 7: CAM metric puts background where max CAM <= 0.5


@dataclass
class EvalResult:
    """Scores of one split. mIoU values are fractions in [0, 1].

    The mask scores (mIoU, pixel accuracy, CAM and CPL quality) cover the `num_images_with_masks`
    images that have a mask and are None when none has; `tag_f1` covers all `num_images`.
    """

    miou: float | None
    miou_label_masked: float | None
    pixel_accuracy: float | None
    per_class: dict[str, float | None]
    per_class_label_masked: dict[str, float | None]
    num_images: int
    split: str
    protocol: str
    tag_f1: float = float("nan")
    num_images_with_masks: int = 0
    cam_miou: float | None = None  # GT image labels pick the classes (the WSSS convention)
    cam_miou_predicted_labels: float | None = None  # the classifier picks them (deployable)
    cpl_miou: float | None = None
    cpl_coverage: float | None = None  # fraction of labelled pixels the CPL does not ignore
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "miou": self.miou,
            "miou_label_masked": self.miou_label_masked,
            "pixel_accuracy": self.pixel_accuracy,
            "cam_miou": self.cam_miou,
            "cam_miou_predicted_labels": self.cam_miou_predicted_labels,
            "cpl_miou": self.cpl_miou,
            "cpl_coverage": self.cpl_coverage,
            "tag_f1": self.tag_f1,
            "num_images": self.num_images,
            "num_images_with_masks": self.num_images_with_masks,
            "split": self.split,
            "protocol": self.protocol,
            "per_class": self.per_class,
            "per_class_label_masked": self.per_class_label_masked,
            "seconds": round(self.seconds, 2),
            **self.extra,
        }


class CamQuality:
    """CAM and CAM-pseudo-label quality of a network (teacher multi-scale CAMs).

    Two CAM scores: `cam_matrix` keeps the classes of the GT image label (the WSSS convention for
    pseudo-label quality; an oracle at test time), `cam_predicted_matrix` keeps the classes the
    network's own classifier predicts (sigmoid > 0.5): what a CAM-only model would deploy. The
    CPL uses the GT labels, as training does.
    """

    def __init__(
        self,
        net: CosaNet,
        device: torch.device,
        num_classes: int,
        scales: tuple[float, ...],
        low: float,
        high: float,
        flip: bool,
    ) -> None:
        self.net = net
        self.device = device
        self.scales = scales
        self.flip = flip
        self.low = low
        self.high = high
        self.cam_matrix = ConfusionMatrix(num_classes)
        self.cam_predicted_matrix = ConfusionMatrix(num_classes)
        self.cpl = PartialLabelScore(num_classes)

    @torch.no_grad()
    def update(self, image: np.ndarray, mask: np.ndarray, label: np.ndarray) -> None:
        """Add one image (uint8 (H, W, 3)), its GT mask (H, W) and image label (C,)."""
        height, width = mask.shape
        x = normalised_image(image, self.device)
        y = torch.from_numpy(label).to(self.device)[None].float()
        # Each class's map is normalised on its own, so the all-classes pass masked afterwards
        # equals a pass given that label: one teacher pass serves both label sets, and its
        # scale-1.0 pass gives the classifier's own labels.
        teacher = teacher_forward(self.net, x, torch.ones_like(y), self.scales, self.flip)
        every_class = teacher.cam
        predicted = (teacher.cls_logits.sigmoid() > CLASS_PRESENT_PROBABILITY).float()
        cam = every_class * y[:, :, None, None]  # (1, C, H, W) in [0, 1], absent classes zero
        self.cam_matrix.update(_cam_segmentation(cam), mask)
        self.cam_predicted_matrix.update(
            _cam_segmentation(every_class * predicted[:, :, None, None]), mask
        )
        box = torch.tensor([[0, height, 0, width]], device=self.device)
        cpl = (
            cam_pseudo_label(cam, box, self.low, self.high)[0].cpu().numpy()
        )  # (H, W), 255 = ignore
        self.cpl.update(cpl, mask)


def _cam_segmentation(cam: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) CAM in [0, 1] -> (H, W) ids: argmax class where its CAM > 0.5, else 0."""
    peak, arg = cam.max(dim=1)
    return torch.where(peak > CAM_BACKGROUND_THRESHOLD, arg + 1, 0)[0].cpu().numpy()


def evaluate(
    predictor: Predictor,
    index: DatasetIndex,
    protocol: str = "deploy",
    max_images: int = 0,
    cam_quality: CamQuality | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Run `predictor` over the split of `index`; score it against its masks and its tags.

    Args:
        predictor: image (H, W, 3) uint8 -> logits (K, H, W) float32.
        index: an opened split; images without a mask count for tag F1 only.
        protocol: a label for the report ("deploy", "paper" or "tta").
        max_images: score only the first N images (0 = all).
        cam_quality: optional CAM/CPL scorer fed the images that have masks.
        progress: optional callback `(done, total)`.
    """
    dataset = EvalDataset(index)
    total = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
    num_classes = len(index.class_names)
    plain = ConfusionMatrix(num_classes)
    masked = ConfusionMatrix(num_classes)
    tags = TagAgreement(num_classes - 1)
    with_masks = 0
    start = time.perf_counter()
    for i in range(total):
        item = dataset[i]
        logits = np.asarray(predictor(item["image"]), dtype=np.float32)  # (K, H, W)
        prediction = logits.argmax(0)
        tags.update(prediction, item["label"])
        mask = item["mask"]
        if mask is not None:
            if logits.shape[1:] != mask.shape:
                raise ValueError(
                    f"{item['name']}: prediction {logits.shape[1:]} != mask {mask.shape}"
                )
            with_masks += 1
            plain.update(prediction, mask)
            present = np.concatenate([[1.0], item["label"]]) > 0  # background always allowed
            masked_logits = np.where(present[:, None, None], logits, -np.inf)
            masked.update(masked_logits.argmax(0), mask)
            if cam_quality is not None:
                cam_quality.update(item["image"], mask, item["label"])
        if progress is not None:
            progress(i + 1, total)
    plain_scores, masked_scores = plain.scores(), masked.scores()
    names = list(index.class_names)
    result = EvalResult(
        miou=plain_scores.miou if with_masks else None,
        miou_label_masked=masked_scores.miou if with_masks else None,
        pixel_accuracy=plain_scores.pixel_accuracy if with_masks else None,
        per_class=plain_scores.per_class(names) if with_masks else {},
        per_class_label_masked=masked_scores.per_class(names) if with_masks else {},
        num_images=total,
        split=index.split,
        protocol=protocol,
        tag_f1=tags.score(),
        num_images_with_masks=with_masks,
        seconds=time.perf_counter() - start,
    )
    if cam_quality is not None and with_masks:
        result.cam_miou = cam_quality.cam_matrix.scores().miou
        result.cam_miou_predicted_labels = cam_quality.cam_predicted_matrix.scores().miou
        result.cpl_miou = cam_quality.cpl.miou()
        result.cpl_coverage = cam_quality.cpl.coverage() or 0.0
    return result
