"""Image-level classification loss of the CAM streams (METHOD.md section 4: L_cls, L_cls_aux)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multi-label soft margin: `-(1/C) sum_c [y log s(z) + (1-y) log(1-s(z))]`, batch mean.

    Args:
        logits: (B, C) image logits z (main or aux classifier); computed in float32.
        labels: (B, C) image labels in {0, 1} (any dtype).

    Returns:
        0-d float32 loss (log 2 = 0.693 for all-zero logits).
    """
    return F.multilabel_soft_margin_loss(logits.float(), labels.to(torch.float32))
