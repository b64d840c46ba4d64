"""Soft perplexity-based reliability weighting, RAW (METHOD.md 5.1, [OURS]).

Instead of ignoring the band between the two CAM thresholds, every pixel gets a label and a weight
that falls with the perplexity of the teacher's distribution over {background} U {present classes}:
`q_i = softmax([tau, CAM_c,i for c present] / T_r)`, `PP_i = exp(H(q_i))` in [1, K_i],
`w_i = PP_i^-beta`. A certain pixel has weight ~1; a pixel where background and K_i - 1 classes tie
has weight K_i^-beta.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cosa.errors import ConfigError
from cosa.pseudo import IGNORE_INDEX, box_mask

# Logit of absent classes after the temperature: exp() of it is exactly 0 in float32, and unlike
# -inf it keeps q * log(q) = 0 * finite = 0 (no NaN) in the entropy.
_ABSENT = -1e4


def _as_map(value: float | Tensor, like: Tensor) -> float | Tensor:
    """A threshold (float, 0-d or (B,) tensor) shaped to broadcast against (B, 1, H, W)."""
    if isinstance(value, Tensor):
        value = value.to(device=like.device, dtype=like.dtype)
        if value.dim() == 1:
            return value[:, None, None, None]
    return value


@torch.no_grad()
def reliability_pseudo_label(
    cam: Tensor,
    labels: Tensor,
    img_box: Tensor,
    low: float | Tensor,
    high: float | Tensor,
    temperature: float = 0.1,
    beta: float = 1.0,
    keep_ignore_band: bool = False,
) -> tuple[Tensor, Tensor]:
    """Label and reliability weight of every pixel from the teacher CAM.

    Args:
        cam: (B, C, H, W) teacher CAM in [0, 1].
        labels: (B, C) image labels in {0, 1}; absent classes never win and add no perplexity.
        img_box: (B, 4) `[h0, h1, w0, w1]` valid region of each crop.
        low: tau_l (float, 0-d or (B,) tensor).
        high: tau_h (same forms); the background logit is tau = (low + high) / 2.
        temperature: T_r > 0 (0.1).
        beta: weight exponent (1.0).
        keep_ignore_band: also set the dual-threshold band `low < max_c CAM <= high` to 255
            (weight 0), i.e. RAW on top of the hard band instead of replacing it.

    Returns:
        label: (B, H, W) int64 in {0, 1..C, 255}: argmax of q (255 outside the box).
        weight: (B, H, W) float32 in (0, 1]; 0 wherever the label is 255.

    Raises:
        ConfigError: `temperature` <= 0.
    """
    if temperature <= 0:
        raise ConfigError(f"reliability.temperature must be > 0, got {temperature}")
    cam = cam.float()
    present = labels.to(device=cam.device) > 0  # (B, C)
    tau = (_as_map(low, cam) + _as_map(high, cam)) / 2.0
    background = torch.ones_like(cam[:, :1]) * tau  # (B, 1, H, W)
    logits = torch.cat([background, cam], dim=1) / temperature  # (B, C+1, H, W)
    keep = torch.cat([torch.ones_like(present[:, :1]), present], dim=1)[:, :, None, None]
    logits = logits.masked_fill(~keep, _ABSENT)

    # softmax, not log_q.exp(): exp of the absent classes' -1e4 logits takes the CPU's slow path
    # (10x slower over the whole map); both give exactly 0 there.
    q, log_q = torch.softmax(logits, dim=1), torch.log_softmax(logits, dim=1)
    entropy = -(q * log_q).sum(dim=1)  # (B, H, W), in [0, log K_i]
    weight = torch.exp(-beta * entropy)  # PP^-beta
    # Channel index == class id (0 = background); max().indices is argmax, faster on the CPU.
    label = logits.max(dim=1).indices

    ignore = ~box_mask(img_box, cam.shape[-2], cam.shape[-1])
    if keep_ignore_band:
        peak = cam.masked_fill(~keep[:, 1:], 0.0).amax(dim=1, keepdim=True)
        band = (peak > _as_map(low, cam)) & (peak <= _as_map(high, cam))
        ignore = ignore | band[:, 0]
    label = label.masked_fill(ignore, IGNORE_INDEX)
    weight = weight.masked_fill(ignore, 0.0)
    return label, weight
