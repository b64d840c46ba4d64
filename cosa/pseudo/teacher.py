"""The assignment network's multi-scale + flip pass on the weak view (METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from cosa.errors import ConfigError
from cosa.model.deploy import network_size
from cosa.model.outputs import NetOutput

# Added to the spatial range before dividing, as the reference does, so an all-zero map stays zero.
NORMALISE_EPS = 1e-5


class TeacherOutput(NamedTuple):
    """What the teacher contributes to one training step. H, W = crop size; h, w = H/16, W/16.

    Attributes:
        cam: (B, C, H, W) float32 CAM in [0, 1]: flip-max, ReLU, summed over scales, min-max
            normalised per image and class; classes absent from the image label are exactly 0.
        aux_cam: (B, C, H, W) float32, the same from the aux CAM.
        seg: (B, C + 1, H, W) float32 seg logits summed over the flip pair and the scales (not
            normalised, so about 2 * len(scales) times a single pass).
        features: (B, D, h, w) float32 final encoder features F at scale 1.0, unflipped.
        cls_logits: (B, C) float32 image logits of the same scale-1.0 unflipped pass.
    """

    cam: Tensor
    aux_cam: Tensor
    seg: Tensor
    features: Tensor
    cls_logits: Tensor


def _normalise_per_class(cam: Tensor) -> Tensor:
    """Min-max normalise each (image, class) map to [0, 1]: `(x - min) / (max - min + 1e-5)`."""
    flat = cam.flatten(2)  # (B, C, H*W)
    flat = flat - flat.amin(dim=2, keepdim=True)
    flat = flat / (flat.amax(dim=2, keepdim=True) + NORMALISE_EPS)
    return flat.view_as(cam)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def teacher_forward(
    net: Callable[[Tensor], NetOutput],
    images: Tensor,
    labels: Tensor,
    scales: Sequence[float],
    flip: bool,
    aux_last_scale_only: bool = False,
) -> TeacherOutput:
    """Run the assignment network over scales (+ flips) and fuse its CAM and seg outputs.

    For each scale s the weak images are resized (bilinear) to round(s*H) x round(s*W), rounded to
    the nearest multiple of 16 (`cosa.model.deploy.network_size`; crops of 448 or 160 at the
    presets' scales are multiples already), and, when
    `flip`, stacked with their horizontal mirror into one batch of 2B, so each scale is a single
    forward. Outputs are upsampled back to H x W, the mirrored half is un-flipped, and the pair is
    fused: element-wise max for CAMs (then ReLU), sum for seg logits. Scales are summed.
    Net outputs are cast to float32 first, so the fusion is exact under autocast.

    Args:
        net: the assignment network (AN); called as `net(x) -> NetOutput`. Its train/eval mode is
            the caller's choice.
        images: (B, 3, H, W) ImageNet-normalised weak view.
        labels: (B, C) image labels in {0, 1} (any float/int dtype).
        scales: resize factors, e.g. (1.0, 0.5, 1.5).
        flip: add the horizontal flip of every scale.
        aux_last_scale_only: reproduce the reference's slip where the aux CAM keeps only the last
            scale instead of the sum.

    Returns:
        TeacherOutput; `features` and `cls_logits` come from the scale-1.0 pass (an extra
        unflipped forward at scale 1.0 is made when 1.0 is not among `scales`).

    Raises:
        ConfigError: `scales` is empty or holds a non-positive value.
    """
    if len(scales) == 0 or any(s <= 0 for s in scales):
        raise ConfigError(
            f"pseudo.scales must be a non-empty list of positive factors, got {list(scales)}"
        )
    batch, _, height, width = images.shape
    size = (height, width)
    present = labels.to(torch.float32)[:, :, None, None]  # (B, C, 1, 1)

    cam_sum: Tensor | None = None
    aux_sum: Tensor | None = None
    seg_sum: Tensor | None = None
    unflipped: NetOutput | None = None  # the scale-1.0 pass
    for scale in scales:
        # The network sees a whole number of 16-pixel cells, as in the deploy graph: a size that
        # is not a multiple of 16 would leave a remainder the patch grid drops, and the output,
        # stretched back over the full image, would shift by up to 15 pixels.
        scaled = _resize(images, network_size(round(height * scale), round(width * scale)))
        if flip:
            scaled = torch.cat([scaled, scaled.flip(-1)], dim=0)  # (2B, 3, sH, sW)
        out = net(scaled)
        cam = _resize(out.cam.float(), size)  # (B or 2B, C, H, W)
        aux = _resize(out.aux_cam.float(), size)
        seg = _resize(out.seg.float(), size)  # (B or 2B, C+1, H, W)
        if flip:
            cam = torch.maximum(cam[:batch], cam[batch:].flip(-1))
            aux = torch.maximum(aux[:batch], aux[batch:].flip(-1))
            seg = seg[:batch] + seg[batch:].flip(-1)
        cam, aux = cam.relu(), aux.relu()
        cam_sum = cam if cam_sum is None else cam_sum + cam
        aux_sum = aux if aux_sum is None or aux_last_scale_only else aux_sum + aux
        seg_sum = seg if seg_sum is None else seg_sum + seg
        if scale == 1.0 and unflipped is None:
            unflipped = out
    if unflipped is None:
        unflipped = net(images)
    assert cam_sum is not None and aux_sum is not None and seg_sum is not None  # scales non-empty

    return TeacherOutput(
        cam=_normalise_per_class(cam_sum) * present,
        aux_cam=_normalise_per_class(aux_sum) * present,
        seg=seg_sum,
        features=unflipped.features[:batch].float(),
        cls_logits=unflipped.cls_logits[:batch].float(),
    )
