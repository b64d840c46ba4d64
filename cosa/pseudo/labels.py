"""Pseudo-labels from the teacher's maps: CAM dual threshold (CPL) and seg softmax (SPL).

METHOD.md section 3. Label maps use 0 = background, 1..C = foreground classes, 255 = ignore.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cosa.choices import IGNORE_INDEX as IGNORE_INDEX  # re-exported by cosa.pseudo

# Logit given to foreground classes absent from the image label (reference value); after the
# division by the temperature its softmax probability is exactly 0 in float32.
ABSENT_LOGIT = -1e5


def _per_image(value: float | Tensor, like: Tensor) -> float | Tensor:
    """Broadcast a threshold (python float, 0-d tensor or (B,) tensor) against (B, H, W) maps."""
    if isinstance(value, Tensor):
        value = value.to(device=like.device, dtype=like.dtype)
        if value.dim() == 1:
            return value[:, None, None]
    return value


def box_mask(img_box: Tensor, height: int, width: int) -> Tensor:
    """Rasterise the valid-region boxes of the crops.

    Args:
        img_box: (B, 4) integer boxes `[h0, h1, w0, w1]`, half-open (rows h0..h1-1, columns
            w0..w1-1), as recorded by the random crop.
        height: H of the crop.
        width: W of the crop.

    Returns:
        (B, H, W) bool, True inside the box.
    """
    box = img_box.to(torch.long)
    rows = torch.arange(height, device=box.device)[None, :]  # (1, H)
    cols = torch.arange(width, device=box.device)[None, :]  # (1, W)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 1:2])  # (B, H)
    in_cols = (cols >= box[:, 2:3]) & (cols < box[:, 3:4])  # (B, W)
    return in_rows[:, :, None] & in_cols[:, None, :]


def cam_pseudo_label(
    cam: Tensor, img_box: Tensor, low: float | Tensor, high: float | Tensor
) -> Tensor:
    """CAM pseudo-label (CPL) by the dual-threshold rule on `m_i = max_c cam_c,i`.

    Exactly the rule of METHOD.md section 3, evaluated per pixel at full resolution:
    `argmax_c + 1` if `m > high`; 255 if `low < m <= high`; 0 if `m <= low`; 255 outside the box.
    The reference evaluates it on softmax-ed maps at half resolution and upsamples, which only
    approximates this rule at region borders; we do not reproduce that approximation.

    Args:
        cam: (B, C, H, W) teacher CAM in [0, 1], absent classes already zeroed.
        img_box: (B, 4) `[h0, h1, w0, w1]` valid region of each crop.
        low: tau_l, a float, a 0-d tensor or a (B,) tensor.
        high: tau_h, same forms as `low`.

    Returns:
        (B, H, W) int64 labels in {0, 1..C, 255}.
    """
    peak, index = cam.max(dim=1)  # (B, H, W)
    low_t, high_t = _per_image(low, peak), _per_image(high, peak)
    ignore = torch.full_like(index, IGNORE_INDEX)
    label = torch.where(peak > high_t, index + 1, ignore)
    label = torch.where(peak <= low_t, torch.zeros_like(index), label)
    inside = box_mask(img_box, cam.shape[-2], cam.shape[-1])
    return torch.where(inside, label, ignore)


def seg_pseudo_label(seg: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Seg pseudo-label (SPL) distribution Q = softmax(P / T) over {bg} and the present classes.

    Args:
        seg: (B, C + 1, H, W) teacher seg logits P (background first).
        labels: (B, C) image labels in {0, 1}.
        temperature: T > 0 (0.01 in the paper: Q is almost one-hot).

    Returns:
        (B, C + 1, H, W) float32 probabilities; absent foreground classes get exactly 0.
    """
    keep = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1) > 0  # (B, C+1)
    logits = seg.float().masked_fill(~keep[:, :, None, None], ABSENT_LOGIT)
    return torch.softmax(logits / temperature, dim=1)
