"""The fully supervised upper bound's objective (`train.supervision=full`).

Same network, same views, same schedule as CoSA; only the seg stream's target changes: the
ground-truth (or `cosa pseudo`) masks instead of the swapped assignments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.config import CosaConfig
from cosa.losses import ObjectiveResult, classification_loss
from cosa.model.outputs import NetOutput
from cosa.pseudo import IGNORE_INDEX


def pixel_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean CE over the labelled pixels; an attached 0 when every pixel is 255.

    `F.cross_entropy(..., ignore_index=255)` divides by the number of labelled pixels and returns
    NaN (0 / 0) on a crop that has none (a crop of padding, or of a mask's ignored border).

    Args:
        logits: (B, K, H, W) float32 seg logits.
        target: (B, H, W) int64 ids in {0..K-1, 255}.

    Returns:
        0-d float32 loss.
    """
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return ce / (target != IGNORE_INDEX).sum().clamp_min(1)


def supervised_objective(
    student: NetOutput, batch: dict[str, Tensor], cfg: CosaConfig
) -> ObjectiveResult:
    """cls + cls_aux + pixel cross-entropy of the seg stream on `batch["mask"]` (B, H, W).

    Returns:
        ObjectiveResult with terms cls, cls_aux, seg (unweighted) and no maps.
    """
    size = batch["mask"].shape[-2:]
    seg = F.interpolate(student.seg.float(), size=size, mode="bilinear", align_corners=False)
    terms = {
        "cls": classification_loss(student.cls_logits.float(), batch["label"]),
        "cls_aux": classification_loss(student.aux_cls_logits.float(), batch["label"]),
        "seg": pixel_cross_entropy(seg, batch["mask"]),
    }
    weighted = {
        "cls": cfg.loss.cls_weight * terms["cls"],
        "cls_aux": cfg.loss.cls_aux_weight * terms["cls_aux"],
        "seg": terms["seg"],
    }
    total = torch.stack(list(weighted.values())).sum()
    return ObjectiveResult(
        total=total,
        terms={k: v.detach() for k, v in terms.items()},
        weighted={k: v.detach() for k, v in weighted.items()},
        maps=None,
    )
