"""Contrastive separation, CSP (METHOD.md 5.3, [OURS]).

Pixel-to-prototype InfoNCE against the classes that coexist in the same image: a student pixel
feature must be closer to the teacher prototype of its own SPL class than to the prototypes of the
other classes (background included) present in that image. Prototypes come from the teacher
(detached), so only the student is pulled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.errors import ConfigError
from cosa.pseudo import IGNORE_INDEX

# Logit of classes absent from an image: exp() is 0 in float32 but, unlike -inf, the NLL of a
# (masked-out) pixel stays finite, so 0-weight pixels never produce 0 * inf = NaN.
_ABSENT = -1e4
_WEIGHT_EPS = 1e-6


def labels_at_cell_centres(labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """The label at the centre pixel of each feature cell (nearest-neighbour would take its corner).

    A feature cell of a stride-16 grid covers pixels 16i .. 16i+15; its label is the one at
    pixel 16i + 8 (floor((i + 0.5) * H / h) in general), so CSP's labels sit where the cell's
    receptive field is centred, as the RAW weights beside them (mean-pooled over the cell) do.

    Args:
        labels: (B, H, W) integer label map.
        grid: (h, w) feature grid, h <= H and w <= W.

    Returns:
        (B, h, w) labels of the same dtype.
    """
    height, width = labels.shape[-2:]
    rows = ((torch.arange(grid[0], device=labels.device) + 0.5) * height / grid[0]).long()
    cols = ((torch.arange(grid[1], device=labels.device) + 0.5) * width / grid[1]).long()
    return labels[:, rows][:, :, cols]


def contrastive_separation_loss(
    student_feat: Tensor,
    teacher_feat: Tensor,
    spl_label: Tensor,
    num_classes: int,
    weights: Tensor | None = None,
    temperature: float = 0.1,
) -> Tensor:
    """Weighted pixel-to-prototype InfoNCE over the classes present in each image.

    For image b and class k present in its SPL, `p_bk = normalise(mean_{i: y_i = k} t_i)` with
    t_i the L2-normalised teacher features. For a student pixel f_i (L2-normalised) labelled k:
    `l_i = -log softmax_k(f_i . p_bj / temperature over j present in b)`.
    The loss is `sum_i w_i l_i / sum_i w_i` over labelled pixels of images with >= 2 present
    classes (one class has no negative). All images are handled at once with one-hot matmuls.

    Args:
        student_feat: (B, D, h, w) online-network features F (the gradient flows here).
        teacher_feat: (B, D, h, w) assignment-network features (detached here).
        spl_label: (B, h, w) int64 SPL at the feature grid, in {0..num_classes, 255}.
        num_classes: C, the number of foreground classes (labels 1..C; 0 = background).
        weights: optional (B, h, w) non-negative per-pixel weights (e.g. RAW), no gradient.
        temperature: InfoNCE temperature t > 0 (0.1).

    Returns:
        0-d float32 loss; an exact 0 that is still attached to the student graph when no image
        has two classes.

    Raises:
        ConfigError: shapes disagree or `temperature` <= 0.
    """
    if temperature <= 0:
        raise ConfigError(f"separation.temperature must be > 0, got {temperature}")
    if student_feat.shape != teacher_feat.shape or student_feat.shape[-2:] != spl_label.shape[-2:]:
        raise ConfigError(
            f"contrastive separation needs student/teacher features and labels on one grid, got "
            f"{tuple(student_feat.shape)}, {tuple(teacher_feat.shape)}, {tuple(spl_label.shape)}"
        )
    batch = student_feat.shape[0]
    labelled = spl_label != IGNORE_INDEX  # (B, h, w)
    index = torch.where(labelled, spl_label, torch.zeros_like(spl_label)).flatten(1)  # (B, N)
    onehot = F.one_hot(index, num_classes + 1).transpose(1, 2).float()  # (B, K, N)
    onehot = onehot * labelled.flatten(1)[:, None, :].float()

    student = F.normalize(student_feat.float().flatten(2), dim=1)  # (B, D, N)
    with torch.no_grad():
        teacher = F.normalize(teacher_feat.detach().float().flatten(2), dim=1)  # (B, D, N)
        prototypes = F.normalize(onehot @ teacher.transpose(1, 2), dim=2)  # (B, K, D)
        present = onehot.sum(dim=2) > 0  # (B, K)
        multi = present.sum(dim=1) >= 2  # (B,)

    logits = (prototypes @ student) / temperature  # (B, K, N)
    logits = logits.masked_fill(~present[:, :, None], _ABSENT)
    nll = -torch.log_softmax(logits, dim=1).gather(1, index[:, None, :])[:, 0]  # (B, N)

    weight = labelled.flatten(1).float() * multi[:, None].float()  # (B, N)
    if weights is not None:
        weight = weight * weights.detach().float().reshape(batch, -1)
    return (weight * nll).sum() / weight.sum().clamp_min(_WEIGHT_EPS)
