"""The CoSA networks (METHOD.md section 1): encoders, heads, the online/assignment networks, EMA,
pretrained weights from local files, and the deploy forward."""

from cosa.model.backbone import BACKBONES, Encoder, build_encoder
from cosa.model.deploy import DeployModel
from cosa.model.ema import ema_update, make_teacher
from cosa.model.network import CosaNet, build_model
from cosa.model.outputs import NetOutput
from cosa.model.pretrained import (
    default_weights,
    efficientnet_lite0_wheel_state_dict,
    load_pretrained,
)

BACKBONE_CHOICES: tuple[str, ...] = tuple(BACKBONES)

__all__ = [
    "BACKBONE_CHOICES",
    "CosaNet",
    "DeployModel",
    "Encoder",
    "NetOutput",
    "build_encoder",
    "build_model",
    "default_weights",
    "efficientnet_lite0_wheel_state_dict",
    "ema_update",
    "load_pretrained",
    "make_teacher",
]
