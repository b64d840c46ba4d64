"""The deploy network of DESIGN.md: raw 0-255 RGB in; `logits` and `mask` at input size out.

The model owns its preprocessing (resize to a multiple of 16, ImageNet normalisation), so exporters
and clients only do geometry and can never forget normalisation. The graph has no data-dependent
Python branches: it exports with `torch.onnx.export(..., dynamo=True)` and dynamic N, H, W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cosa.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cosa.model.network import CosaNet

# The training statistics (METHOD.md section 2) in 0-255 units, so the raw input needs no rescaling.
IMAGENET_MEAN_255 = tuple(255.0 * m for m in IMAGENET_MEAN)
IMAGENET_STD_255 = tuple(255.0 * s for s in IMAGENET_STD)
SIZE_MULTIPLE = 16


def network_size(height: int, width: int) -> tuple[int, int]:
    """Size the network runs at for an (height, width) input: nearest multiple of 16, >= 16.

    Works on Python ints and on symbolic sizes during export (floor division only).
    """

    def nearest(size: int) -> int:
        return torch.sym_max((size + SIZE_MULTIPLE // 2) // SIZE_MULTIPLE, 1) * SIZE_MULTIPLE

    return nearest(height), nearest(width)


class DeployModel(nn.Module):
    """Segmentation stream of a `CosaNet` (the assignment network at deploy time) with its pre- and
    post-processing.

    Forward: normalise; bilinearly resize (align_corners=False, no antialias: TensorRT has none) to
    the nearest multiple of 16 per side, at least 16 (round to nearest distorts the aspect ratio by
    at most 8 px per side, less than always rounding up or down, and never crops content); run the
    seg stream; bilinearly upsample the (N, K, H'/16, W'/16) logits to (H, W); argmax.

    Attributes:
        net: the wrapped network (call `.eval()` on the DeployModel before exporting).
        pixel_mean, pixel_std: (1, 3, 1, 1) float32 ImageNet statistics in 0-255 units (buffers, not
            saved in the state dict).
    """

    def __init__(self, net: CosaNet) -> None:
        super().__init__()
        self.net = net
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment a batch.

        Args:
            images: (N, 3, H, W) float32 RGB in [0, 255], any H, W >= 1.

        Returns:
            `(logits, mask)`: (N, K, H, W) float32 segmentation logits at input size (K = C + 1,
            background = 0) and (N, H, W) int32 class ids = argmax of `logits` over K.
        """
        height, width = images.shape[-2], images.shape[-1]
        x = (images - self.pixel_mean) / self.pixel_std
        # Always resize, even when already a multiple of 16 (then it is the identity): a size check
        # would be a Python branch that export specialises on.
        x = F.interpolate(x, size=network_size(height, width), mode="bilinear", align_corners=False)
        seg = self.net.forward_seg(x)  # (N, K, H' / 16, W' / 16)
        logits = F.interpolate(seg, size=(height, width), mode="bilinear", align_corners=False)
        mask = logits.argmax(dim=1).to(torch.int32)  # (N, H, W)
        return logits, mask
