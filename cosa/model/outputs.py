"""The training forward's output, shared by the model, the losses and the trainer."""

from __future__ import annotations

from typing import NamedTuple

import torch


class NetOutput(NamedTuple):
    """Everything one `CosaNet.forward` returns. h, w = H/16, W/16 of the (normalised) input.

    Attributes:
        cls_logits: (B, C) image logits z = W . GMP(F); C = foreground classes.
        aux_cls_logits: (B, C) the same from the aux features and the aux classifier.
        cam: (B, C, h, w) CAM logits A = W * F (no ReLU).
        aux_cam: (B, C, h, w) aux CAM logits.
        seg: (B, C + 1, h, w) segmentation logits of the LargeFOV decoder, background first.
        features: (B, D, h, w) final encoder features F (used by contrastive separation).
    """

    cls_logits: torch.Tensor
    aux_cls_logits: torch.Tensor
    cam: torch.Tensor
    aux_cam: torch.Tensor
    seg: torch.Tensor
    features: torch.Tensor
