"""The choice sets the layers share, and the constants that go with them, each declared once.

Ground floor, standard library only: `cli.py` imports it at start-up for its option types, and
`cosa`, `export` and `serving` all may. The sets are `StrEnum`s, so a member is its string
(`Precision.INT8 == "int8"`, `f"{Precision.INT8}" == "int8"`) and library functions keep taking
plain strings from Python callers; `parse_choice` turns a string into a member or raises with the
choices listed.

Three different things were called "protocol": `EvalProtocol` (how `cosa eval` scores),
`WireProtocol` (how a Triton client talks to the server) and `typing.Protocol` (interfaces).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TypeVar

from cosa.errors import ConfigError, CosaError, did_you_mean

__all__ = [
    "DEFAULT_EVAL_SCALES",
    "IGNORE_INDEX",
    "Backend",
    "CalibrationMethod",
    "Device",
    "EvalProtocol",
    "InstanceKind",
    "MaskFormat",
    "OrtFusion",
    "Platform",
    "Precision",
    "WireProtocol",
    "parse_choice",
]

IGNORE_INDEX = 255
"""Mask id excluded from labels, losses and metrics (VOC object boundaries, padding)."""

DEFAULT_EVAL_SCALES: tuple[float, ...] = (1.0, 0.5, 1.5, 0.75, 1.25)
"""Test-time scales of the paper protocol (METHOD.md 7), also `cosa eval --protocol tta`'s."""


class Precision(StrEnum):
    """Numeric precision of an exported network (`cosa export --precision`)."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class CalibrationMethod(StrEnum):
    """How INT8 calibration turns activation histograms into ranges (onnxruntime's methods)."""

    ENTROPY = "entropy"
    PERCENTILE = "percentile"
    MINMAX = "minmax"


class OrtFusion(StrEnum):
    """Whether `cosa export` also writes the onnxruntime-fused graph (`model.ort.onnx`)."""

    AUTO = "auto"  # ViT backbones only
    ON = "on"  # fail if nothing fuses
    OFF = "off"


class Backend(StrEnum):
    """What runs the network for `cosa segment`, `cosa stream` and `cosa benchmark`."""

    AUTO = "auto"  # from the model file: .pt torch, .plan tensorrt, else onnxruntime
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"
    TENSORRT = "tensorrt"
    TRITON = "triton"


class WireProtocol(StrEnum):
    """How a Triton client talks to the server."""

    GRPC = "grpc"
    HTTP = "http"


class Platform(StrEnum):
    """Backend of the segmentation model in a Triton repository (`cosa triton repo --platform`)."""

    ONNXRUNTIME = "onnxruntime"  # onnxruntime_onnx
    TENSORRT = "tensorrt"  # tensorrt_plan
    PYTHON = "python"  # python backend running onnxruntime's CPU provider


class InstanceKind(StrEnum):
    """Where a Triton model's instances run (`instance_group.kind`); auto: by platform."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


class MaskFormat(StrEnum):
    """How `cosa segment` writes a mask."""

    PNG = "png"  # palette PNG, the dataset's colours
    NPY = "npy"  # raw int32 ids


class EvalProtocol(StrEnum):
    """How `cosa eval` turns an image into logits."""

    DEPLOY = "deploy"  # native size, single scale: what `cosa segment` writes
    PAPER = "paper"  # 448x448, DEFAULT_EVAL_SCALES + flip (METHOD.md 7)
    TTA = "tta"  # native size, scales + flip


class Preset(StrEnum):
    """Starting configuration of a training run (`cosa.config.PRESETS` holds each one)."""

    DEMO = "demo"  # EfficientNet-Lite0 on the CPU, the embedded synthetic data
    VOC = "voc"  # the paper's configuration, ViT-B/16
    COCO = "coco"
    REFERENCE = "reference"  # voc with the three techniques off


class SegmentEngine(StrEnum):
    """Where `cosa segment` runs its batches."""

    LOCAL = "local"  # this process
    RAY = "ray"  # Ray Data workers (the `ray` extra)


class Device(StrEnum):
    """Torch device of training and evaluation; auto: CUDA when available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


E = TypeVar("E", bound=StrEnum)


def parse_choice(kind: type[E], value: str, what: str, error: type[CosaError] = ConfigError) -> E:
    """`value` as a member of `kind`.

    Args:
        kind: the choice set.
        value: a member or its string.
        what: the option's name in the message ("backend", "mask format").
        error: the error class the caller's layer raises.

    Raises:
        `error`: "unknown <what> 'x'; choose one of a, b, c" (with "did you mean" when close).
    """
    try:
        return kind(value)
    except ValueError:
        choices = [member.value for member in kind]
        raise error(
            f"unknown {what} {value!r}; choose one of {', '.join(choices)}"
            f"{did_you_mean(str(value), choices)}"
        ) from None
