"""The two swapped assignments of CoSA (METHOD.md section 4): cam2seg and seg2cam."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.pseudo import IGNORE_INDEX

# Added to each part's pixel count (or weight sum), as the reference does, so an empty part
# (no background or no foreground pixel in the batch) contributes 0 instead of NaN.
PART_EPS = 1e-6


def balanced_cross_entropy(
    logits: Tensor, target: Tensor, alpha: float = 0.5, weights: Tensor | None = None
) -> Tensor:
    """Class-balanced CE: `(1 - alpha) * CE_bg + alpha * CE_fg`.

    CE_bg and CE_fg are the (weighted) mean pixel CE over the background (label 0) and the
    foreground (labels 1..K-1) pixels of the whole batch: `sum_i w_i CE_i / (sum_i w_i + 1e-6)`
    per part, with w = 1 when `weights` is None. Pixels labelled 255 are ignored.

    Args:
        logits: (B, K, H, W) seg logits (K = C + 1, background first); computed in float32.
        target: (B, H, W) int64 labels in {0..K-1, 255}.
        alpha: share of the foreground part.
        weights: optional (B, H, W) non-negative per-pixel weights (no gradient is taken).

    Returns:
        0-d float32 loss.
    """
    ce = F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="none")
    background = (target == 0).float()  # (B, H, W)
    foreground = ((target > 0) & (target != IGNORE_INDEX)).float()
    if weights is not None:
        weights = weights.detach().float()
        background, foreground = background * weights, foreground * weights
    ce_bg = (ce * background).sum() / (background.sum() + PART_EPS)
    ce_fg = (ce * foreground).sum() / (foreground.sum() + PART_EPS)
    return (1.0 - alpha) * ce_bg + alpha * ce_fg


def cam2seg_loss(
    seg_logits: Tensor,
    main_label: Tensor,
    aux_label: Tensor,
    mix: float = 0.5,
    alpha: float = 0.5,
    main_weights: Tensor | None = None,
    aux_weights: Tensor | None = None,
) -> Tensor:
    """Swapped assignment 1: the student seg learns from the teacher's CAM pseudo-labels.

    `L_seg = (1 - mix) * BCE(S, Y_main) + mix * BCE(S, Y_aux)` with BCE = `balanced_cross_entropy`.

    Args:
        seg_logits: (B, C + 1, H, W) student seg logits S at crop size.
        main_label: (B, H, W) int64 pseudo-label from the main CAM (CPL or RAW label).
        aux_label: (B, H, W) int64 pseudo-label from the aux CAM.
        mix: share of the aux pseudo-label (0.5 in the paper).
        alpha: foreground share inside each balanced CE.
        main_weights: optional (B, H, W) reliability weights of `main_label`.
        aux_weights: optional (B, H, W) reliability weights of `aux_label`.

    Returns:
        0-d float32 loss.
    """
    main = balanced_cross_entropy(seg_logits, main_label, alpha, main_weights)
    aux = balanced_cross_entropy(seg_logits, aux_label, alpha, aux_weights)
    return (1.0 - mix) * main + mix * aux


def seg2cam_loss(cam_logits: Tensor, q: Tensor) -> Tensor:
    """Swapped assignment 2: the student CAM learns from the teacher's seg pseudo-label.

    The foreground part Q[1:] is downsampled (bilinear) to the CAM grid; the loss is
    `mean_{b,i} (1/C) sum_c BCEWithLogits(ReLU(A_c,i), t_c,i)`. Because of the ReLU a zero target
    costs at least log 2 = 0.693, so the loss never goes below log 2 * (share of zero targets); that
    floor is the reference's behaviour, not a bug.

    Args:
        cam_logits: (B, C, h, w) student CAM logits A.
        q: (B, C + 1, H, W) SPL distribution Q (background first), values in [0, 1].

    Returns:
        0-d float32 loss.
    """
    target = F.interpolate(
        q[:, 1:].float(), size=cam_logits.shape[-2:], mode="bilinear", align_corners=False
    )  # (B, C, h, w)
    return F.binary_cross_entropy_with_logits(torch.relu(cam_logits.float()), target)
