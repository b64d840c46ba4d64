"""Heads on the encoder features: the CAM classifier and the LargeFOV segmentation decoder.

Both follow the reference (METHOD.md section 1): no bias, no BatchNorm, PyTorch's default init.
"""

from __future__ import annotations

import torch
from torch import nn

from cosa.config import CAM_POOLINGS
from cosa.errors import ConfigError


class CamHead(nn.Module):
    """CAM stream: a 1x1 conv D -> C without bias, shared by the image logits and the CAMs.

    Image logits are z = W . GMP(F) (global MAX pool of the features first, then the classifier; the
    ToCo convention, not the max of the CAM), or z = W . GAP(F) with `pooling="mean"` (the usual
    choice for CNN CAMs, whose max pool rewards the single most discriminative cell). CAM logits are
    A = W * F, the same weights per pixel, either way.
    """

    def __init__(self, in_channels: int, num_classes: int, pooling: str = "max") -> None:
        """Build the classifier.

        Args:
            in_channels: D, feature channels.
            num_classes: C, foreground classes.
            pooling: "max" (the reference) or "mean" (`model.cam_pooling`).

        Raises:
            ConfigError: `pooling` is neither.
        """
        super().__init__()
        if pooling not in CAM_POOLINGS:
            raise ConfigError(
                f"model.cam_pooling must be one of {', '.join(CAM_POOLINGS)}, got {pooling!r}"
            )
        self.pooling = pooling
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify and localise.

        Args:
            features: (B, D, h, w) float.

        Returns:
            `(logits, cam)`: (B, C) image logits and (B, C, h, w) CAM logits (no ReLU).
        """
        if self.pooling == "max":
            pooled = features.amax(dim=(2, 3), keepdim=True)  # (B, D, 1, 1)
        else:
            pooled = features.mean(dim=(2, 3), keepdim=True)
        logits = self.classifier(pooled).flatten(1)  # (B, C)
        cam = self.classifier(features)  # (B, C, h, w)
        return logits, cam


class LargeFOV(nn.Module):
    """Segmentation stream (DeepLab LargeFOV): two dilated 3x3 convs with ReLU, then a 1x1 conv.

    conv3x3 D -> ch (dilation d) + ReLU, conv3x3 ch -> ch (dilation d) + ReLU, conv1x1 ch -> K.
    Padding = dilation keeps the (h, w) grid.
    """

    def __init__(self, in_channels: int, channels: int, num_outputs: int, dilation: int) -> None:
        """Build the decoder.

        Args:
            in_channels: D, feature channels.
            channels: hidden width (512 in the paper).
            num_outputs: K = C + 1 (background first).
            dilation: of both 3x3 convs (5 in the paper).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, channels, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.conv2 = nn.Conv2d(
            channels, channels, 3, padding=dilation, dilation=dilation, bias=False
        )
        self.classifier = nn.Conv2d(channels, num_outputs, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) float -> (B, K, h, w) segmentation logits."""
        x = self.relu(self.conv1(features))
        x = self.relu(self.conv2(x))
        return self.classifier(x)
