"""Dense-CRF energy regulariser in pure PyTorch, on a local window (METHOD.md section 4).

The reference (Tang et al., ECCV'18, via a CPU permutohedral-lattice extension) computes
`E = -(1/B) sum_k sum_i (p_k roi)_i g_i [K * (p_k roi)]_i` with a *fully connected* bilateral
kernel K and scales it by 1e-7. Here K is restricted to a k x k dilated window around each pixel
(as the gated CRF loss does). The filtered map `K * p` is built by shift-and-accumulate over the
window offsets without autograd (O(B * K * h * w) memory, no unfolded (B, K, k*k, h*w) tensor), and
the loss takes the reference's gradient `-2 g (K * p)` through one differentiable product, so the
backward pass costs one element-wise op. Everything runs on the training device.

Normalisation (ours): the energy of each image is divided by the number of ROI pixels and by the
number of window neighbours (k*k - 1), then averaged over the batch:
`loss = -(1/B) sum_b [sum_i g_i sum_{j in N(i)} K_ij sum_k p_ki p_kj] / (|ROI_b| (k*k - 1))`.
The per-pixel term is the gated, kernel-weighted agreement of a pixel with its neighbours, so the
loss lies in [-1, 0]: about -0.25 for an uncertain but spatially smooth prediction (gate 0.5,
sum_k p_k^2 = 0.5), near 0 for a confident one (the gate closes) or a noisy one (neighbours
disagree). That is the O(0.1-1) magnitude of the reference's logged values (-0.2 to -0.6).
The gate and the filtered map are constants for the backward pass, as in the reference's
hand-written backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.errors import ConfigError

# The energy runs at half resolution, as the reference's (scale_factor 0.5).
_SCALE = 0.5
# Kernel weights below this (colour distances beyond ~13 sigma) are denormal numbers.
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _half(x: Tensor, mode: str) -> Tensor:
    size = (max(1, round(x.shape[-2] * _SCALE)), max(1, round(x.shape[-1] * _SCALE)))
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _half_window_offsets(window: int, dilation: int) -> list[tuple[int, int]]:
    """One offset of every +/- pair of the window, centre excluded: (k*k - 1) / 2 offsets."""
    radius = window // 2
    offsets = []
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy > 0 or (dy == 0 and dx > 0):
                offsets.append((dy * dilation, dx * dilation))
    return offsets


def crf_energy_loss(
    probs: Tensor,
    image: Tensor,
    roi: Tensor,
    ignore: Tensor,
    sigma_rgb: float = 15.0,
    sigma_xy: float = 100.0,
    window: int = 9,
    dilation: int = 2,
) -> Tensor:
    """Gated local-window bilateral CRF energy of a soft segmentation (see the module docstring).

    Everything is first resized x0.5 (probabilities and image bilinearly, `roi` and `ignore` by
    nearest). Kernel: `exp(-|I_i - I_j|^2 / (2 sigma_rgb^2) - |x_i - x_j|^2 / (2 (sigma_xy/2)^2))`
    over the window offsets (the spatial sigma is given in full-resolution pixels). Gate:
    `g_i = 1` where `ignore` (the CPL's 255 band), else `max(0, roi_i - max_k p_ki)`.
    The gradient with respect to `probs` is `-2 g (K * p)` (normalised), as in the reference.

    Args:
        probs: (B, K, H, W) softmax of the student seg logits at crop size (differentiable).
        image: (B, 3, H, W) the strong view in RGB 0-255 (no gradient is taken).
        roi: (B, H, W) float in {0, 1}, 1 inside `img_box`.
        ignore: (B, H, W) bool, True where the CAM pseudo-label is 255.
        sigma_rgb: colour bandwidth in 0-255 units (15).
        sigma_xy: spatial bandwidth in full-resolution pixels (100, i.e. the reference's 50 at
            the half resolution the energy runs at).
        window: odd window side k (9).
        dilation: spacing of the window taps, in half-resolution pixels (2).

    Returns:
        0-d float32 loss in [-1, 0].

    Raises:
        ConfigError: `window` is not an odd integer >= 3, `dilation` < 1 or a sigma <= 0.
    """
    if window < 3 or window % 2 == 0 or dilation < 1:
        raise ConfigError(
            f"loss.crf_window must be odd and >= 3 and loss.crf_dilation >= 1, got {window}, "
            f"{dilation}"
        )
    if sigma_rgb <= 0 or sigma_xy <= 0:
        raise ConfigError(f"CRF sigmas must be > 0, got rgb={sigma_rgb}, xy={sigma_xy}")
    roi_half = _half(roi.float()[:, None], "nearest")  # (B, 1, h, w)
    probs_half = _half(probs.float(), "bilinear") * roi_half  # (B, K, h, w), differentiable
    with torch.no_grad():
        filtered, gate = _filtered_and_gate(
            probs_half.detach(), roi_half, image, ignore, sigma_rgb, sigma_xy, window, dilation
        )
        detached_energy = (gate * (probs_half.detach() * filtered).sum(dim=1)).flatten(1).sum(1)
    # Value: the energy sum_i g_i sum_k p_ki (K * p_k)_i. Gradient: 2 g (K * p), the reference's
    # hand-written backward (exact for a symmetric kernel and a locally constant gate); the
    # `2 x - x.detach()` form gives exactly that value and that gradient.
    energy = 2.0 * (gate * (probs_half * filtered).sum(dim=1)).flatten(1).sum(1) - detached_energy
    pixels = roi_half.flatten(1).sum(dim=1).clamp_min(1.0)  # (B,)
    return -(energy / (pixels * (window * window - 1))).mean()


def _filtered_and_gate(
    probs: Tensor,
    roi: Tensor,
    image: Tensor,
    ignore: Tensor,
    sigma_rgb: float,
    sigma_xy: float,
    window: int,
    dilation: int,
) -> tuple[Tensor, Tensor]:
    """The window-filtered probabilities `(K * p)` (B, K, h, w) and the gate (B, h, w).

    Shift-and-accumulate over the window offsets at half resolution; each +/- offset pair shares
    one kernel evaluation (K is symmetric), scattered to both ends of the pair.
    """
    image_half = _half(image.float(), "bilinear") / sigma_rgb  # (B, 3, h, w)
    ignore_half = _half(ignore.float()[:, None], "nearest") > 0.5
    gate = (roi - probs.amax(dim=1, keepdim=True)).clamp_min(0.0)
    gate = torch.where(ignore_half, torch.ones_like(gate), gate)[:, 0]  # (B, h, w)

    height, width = probs.shape[-2:]
    pad = (window // 2) * dilation
    # Zero padding: beyond the border p = 0, so those taps add nothing, and what is scattered
    # into the padding of `filtered_pad` is cropped away.
    probs_pad = F.pad(probs, (pad, pad, pad, pad))
    image_pad = F.pad(image_half, (pad, pad, pad, pad))
    filtered_pad = torch.zeros_like(probs_pad)
    filtered = filtered_pad[:, :, pad : pad + height, pad : pad + width]  # a view
    two_var_xy = 2.0 * (sigma_xy * _SCALE) ** 2
    for dy, dx in _half_window_offsets(window, dilation):
        rows = slice(pad + dy, pad + dy + height)
        cols = slice(pad + dx, pad + dx + width)
        colour = (image_half - image_pad[:, :, rows, cols]).square().sum(dim=1, keepdim=True)
        kernel = torch.exp(-colour / 2.0 - (dy * dy + dx * dx) / two_var_xy)  # (B, 1, h, w)
        # Weights under float32's smallest normal number add nothing to any sum, but as denormal
        # operands they make the CPU's multiply-adds several times slower: they become exact 0.
        kernel.masked_fill_(kernel < _FLOAT32_TINY, 0.0)
        filtered.addcmul_(kernel, probs_pad[:, :, rows, cols])  # i <- i + d
        filtered_pad[:, :, rows, cols].addcmul_(kernel, probs)  # i + d <- i
    return filtered, gate
