"""Artifacts: ONNX export and verification, FP16/INT8 conversion and calibration, TensorRT engines,
and the `spec.json` sidecar (`cosa.export.spec`).

Entry point: `export_artifacts(checkpoint, out, ExportOptions(...)) -> ExportResult`
(`cosa.export.pipeline`). The public names below are loaded on first use (PEP 562), so that
`import cosa.export.spec` (what serving and the Triton tools need) does not import torch or onnx.
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
