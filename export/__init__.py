"""Artifacts: ONNX export and verification, FP16/INT8 conversion and calibration, TensorRT engines,
and the `spec.json` sidecar (`cosa.export.spec`).

Entry point: `export_artifacts(checkpoint, out, ExportOptions(...)) -> ExportResult`
(`cosa.export.pipeline`). The public names below are loaded on first use (PEP 562), so that
importing one of the small modules serving may use does not import torch or onnx.

Layers (enforced by tests/test_layers.py): export imports the core (`cosa`), never `cosa.serving`.
Serving may import three modules of export and no other: `spec` (the spec.json sidecar), the
artifact chooser (which file of an export folder a runtime runs) and `tensorrt_engine` (the
TensorRT engine session). Those three import nothing else from export.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportOptions": "cosa.export.pipeline",
    "ExportResult": "cosa.export.pipeline",
    "export_artifacts": "cosa.export.pipeline",
    "parse_shape": "cosa.export.pipeline",
    "ModelSpec": "cosa.export.spec",
    "ShapeProfile": "cosa.export.spec",
    "read_spec": "cosa.export.spec",
    "write_spec": "cosa.export.spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cosa.export' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
