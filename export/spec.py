"""ModelSpec: the one place where the deploy graph's names, dtypes and classes are declared.

`spec.json` sits beside every artifact (`model.onnx`, `model.plan`). The exporter writes it, the
Triton repository writer reads it to fill `config.pbtxt`, the client checks the server's metadata
against it.

Deploy-graph contract (DESIGN.md): input `images` float32 (N, 3, H, W) raw RGB 0-255; outputs
`logits` float32 (N, K, H, W) and `mask` int32 (N, H, W); K = classes incl. background.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cosa.errors import ExportError
from cosa.files import write_text_atomic

SPEC_FORMAT_VERSION = 1
SPEC_FILENAME = "spec.json"

INPUT_NAME = "images"
LOGITS_NAME = "logits"
MASK_NAME = "mask"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output. `shape` uses -1 for dynamic dims (batch included)."""

    name: str
    dtype: str  # numpy dtype name: float32, float16, int32
    shape: tuple[int, ...]


def deploy_inputs() -> tuple[TensorSpec, ...]:
    """The deploy graph's inputs."""
    return (TensorSpec(INPUT_NAME, "float32", (-1, 3, -1, -1)),)


def deploy_outputs(num_classes: int) -> tuple[TensorSpec, ...]:
    """The deploy graph's outputs for K = `num_classes` (incl. background)."""
    return (
        TensorSpec(LOGITS_NAME, "float32", (-1, num_classes, -1, -1)),
        TensorSpec(MASK_NAME, "int32", (-1, -1, -1)),
    )


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max (N, H, W) of the input, as a TensorRT optimization profile uses them."""

    min: tuple[int, int, int] = (1, 224, 224)
    opt: tuple[int, int, int] = (1, 448, 448)
    max: tuple[int, int, int] = (8, 1024, 1024)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a runtime needs to know about one artifact folder."""

    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    precision: str = "fp32"  # fp32 | fp16 | int8
    artifact: str = "model.onnx"  # file name inside the folder: model.onnx | model.plan | model.pt
    opset: int | None = None
    profile: ShapeProfile = field(default_factory=ShapeProfile)
    calibration: dict[str, Any] | None = None
    fusion: dict[str, Any] | None = None  # model.ort.onnx: what was fused (cosa.export.fusion)
    verification: dict[str, Any] | None = None
    source_checkpoint: str | None = None
    source_checkpoint_sha256: str | None = None
    backbone: str | None = None
    tensorrt_version: str | None = None
    gpu_name: str | None = None
    extra_artifacts: dict[str, str] = field(
        default_factory=dict
    )  # e.g. {"int8_cpu": "model.int8_qop.onnx"}
    format_version: int = SPEC_FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        """K, classes incl. background."""
        return len(self.class_names)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return deploy_inputs()

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return deploy_outputs(self.num_classes)

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inputs"] = [asdict(t) for t in self.inputs]
        data["outputs"] = [asdict(t) for t in self.outputs]
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], where: str = "spec.json") -> ModelSpec:
        """Parse and validate a spec dict.

        Raises:
            ExportError: another format version, or missing/invalid fields.
        """
        version = data.get("format_version")
        if version != SPEC_FORMAT_VERSION:
            raise ExportError(
                f"{where}: spec format version {version!r} is not supported (expected "
                f"{SPEC_FORMAT_VERSION}); re-export the model with this version of cosa"
            )
        try:
            profile = data.get("profile") or {}
            return cls(
                class_names=tuple(data["class_names"]),
                palette=tuple(tuple(int(c) for c in rgb) for rgb in data["palette"]),
                precision=str(data.get("precision", "fp32")),
                artifact=str(data.get("artifact", "model.onnx")),
                opset=data.get("opset"),
                profile=ShapeProfile(
                    min=tuple(profile.get("min", (1, 224, 224))),
                    opt=tuple(profile.get("opt", (1, 448, 448))),
                    max=tuple(profile.get("max", (8, 1024, 1024))),
                ),
                calibration=data.get("calibration"),
                fusion=data.get("fusion"),
                verification=data.get("verification"),
                source_checkpoint=data.get("source_checkpoint"),
                source_checkpoint_sha256=data.get("source_checkpoint_sha256"),
                backbone=data.get("backbone"),
                tensorrt_version=data.get("tensorrt_version"),
                gpu_name=data.get("gpu_name"),
                extra_artifacts=dict(data.get("extra_artifacts") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{where}: malformed spec ({exc!r}); re-export the model") from exc


def write_spec(spec: ModelSpec, folder: Path) -> Path:
    """Write `folder/spec.json` atomically and return its path."""
    path = folder / SPEC_FILENAME
    write_text_atomic(path, json.dumps(spec.to_json_dict(), indent=2) + "\n")
    return path


def read_spec(folder: Path) -> ModelSpec:
    """Read `folder/spec.json` (or a path to the file itself).

    Raises:
        ExportError: missing, unreadable or invalid spec.
    """
    path = folder if folder.suffix == ".json" else folder / SPEC_FILENAME
    if not path.is_file():
        raise ExportError(f"{path} not found; pass a folder written by `cosa export`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    return ModelSpec.from_json_dict(data, where=str(path))
