"""Ways to turn one image into segmentation logits, for evaluation.

A predictor maps an RGB uint8 image (H, W, 3) to float32 logits (K, H, W) at the image's size.
`DeployPredictor` scores exactly what `cosa segment` writes (deploy forward, native resolution,
single scale). `PaperProtocolPredictor` is the reference protocol (METHOD.md 7): resize to 448x448
ignoring aspect, scales `DEFAULT_EVAL_SCALES` (1.0, 0.5, 1.5, 0.75, 1.25) + flip, summed seg
logits, upsampled to the label size. `NativeMultiScalePredictor` is test-time augmentation at the
image's own size, fused as the training teacher fuses its passes (the same scales and flip give the
same seg logits).
Exported artifacts (ONNX, TensorRT) plug in through any callable with the same signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from cosa.choices import DEFAULT_EVAL_SCALES
from cosa.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from cosa.model import CosaNet, DeployModel
from cosa.model.deploy import network_size
from cosa.pseudo import teacher_forward


class Predictor(Protocol):
    """`(image uint8 (H, W, 3)) -> logits float32 (K, H, W)`."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...


def image_to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 0-255 (read-only arrays are copied, not aliased)."""
    array = np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    return torch.from_numpy(array).to(device).permute(2, 0, 1)[None].float()


def normalised_image(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) ImageNet-normalised float32, the training networks' input."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (image_to_tensor(image, device) / 255.0 - mean) / std


class DeployPredictor:
    """The deploy forward of a network (what `cosa segment --backend torch` runs)."""

    def __init__(self, net: CosaNet, device: torch.device) -> None:
        self.model = DeployModel(net).to(device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        logits, _ = self.model(image_to_tensor(image, self.device))  # (1, K, H, W)
        return logits[0].float().cpu().numpy()


class PaperProtocolPredictor:
    """Reference test-time protocol: square resize, multi-scale + flip, summed logits."""

    def __init__(
        self,
        net: CosaNet,
        device: torch.device,
        scales: Sequence[float] = DEFAULT_EVAL_SCALES,
        flip: bool = True,
        size: int = 448,
    ) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.scales = tuple(scales)
        self.flip = flip
        self.size = size

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        x = normalised_image(image, self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        total = None
        for scale in self.scales:
            side, _ = network_size(round(self.size * scale), round(self.size * scale))
            xs = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            batch = torch.cat([xs, xs.flip(-1)]) if self.flip else xs
            seg = self.net.forward_seg(batch)  # (1 or 2, K, side/16, side/16)
            seg = F.interpolate(
                seg.float(), size=(self.size, self.size), mode="bilinear", align_corners=False
            )
            summed = seg[0] + seg[1].flip(-1) if self.flip else seg[0]
            total = summed if total is None else total + summed
        logits = F.interpolate(
            total[None], size=(height, width), mode="bilinear", align_corners=False
        )
        return logits[0].cpu().numpy()


class NativeMultiScalePredictor:
    """Multi-scale (+ flip) test-time augmentation at the image's own size.

    Each scale resizes the image to round(s*H) x round(s*W), snapped to multiples of 16; seg logits
    are upsampled back to H x W and summed over the flip pair and the scales: `teacher_forward`'s
    fusion, so with the checkpoint's `pseudo.scales` it scores the seg stream of the teacher that
    trained the model.
    """

    def __init__(
        self, net: CosaNet, device: torch.device, scales: Sequence[float], flip: bool
    ) -> None:
        self.net = net.to(device).eval()
        self.device = device
        self.scales = tuple(scales)
        self.flip = flip

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        x = normalised_image(image, self.device)  # (1, 3, H, W)
        no_labels = torch.zeros(1, self.net.num_classes, device=self.device)
        seg = teacher_forward(self.net, x, no_labels, self.scales, self.flip).seg  # (1, K, H, W)
        return seg[0].cpu().numpy()
