"""FP32 ONNX export of the deploy network with dynamic batch, height and width.

The exporter is torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`): the legacy
TorchScript exporter silently bakes `H // 16` into constants (DEPLOYMENT.md), so it is never used.
The exported graph is checked structurally here (`onnx.checker`, exact tensor names, dynamic dims);
numerical agreement with PyTorch is `cosa.export.verify`'s job.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import onnx
import torch
from torch import nn

from cosa.errors import ExportError
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME

logger = logging.getLogger(__name__)

MIN_OPSET = 18
"""The dynamo exporter has no implementations below 18: it silently keeps 18 for a lower request."""
MAX_OPSET = 23
"""Highest opset checked with the pinned onnx/onnxruntime; TensorRT parsers lag behind ONNX."""
DEFAULT_OPSET = 18
"""The exporter's native opset, parsed by TensorRT 10 and 11."""

TRACE_SHAPE = (2, 3, 96, 128)
"""(N, 3, H, W) of the tracing example. N = 2 and H != W: torch.export specialises a dim whose
example is 1 to the constant 1, and equal example sizes can tie H to W."""

_DYNAMIC_INPUT_DIMS = (0, 2, 3)  # N, H, W of `images`
_GENERATED_NAME = re.compile(r"^(\d+|.*\.\d+|onnx::.*|val_\d+)$")


def validate_opset(opset: int) -> int:
    """Check that `opset` is one this exporter produces faithfully.

    Raises:
        ExportError: `opset` outside [MIN_OPSET, MAX_OPSET].
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"--opset {opset} is not supported; pass an opset between {MIN_OPSET} and {MAX_OPSET} "
            f"(default {DEFAULT_OPSET})"
        )
    return opset


def is_generated_name(name: str) -> bool:
    """True for names the exporter invents ("308", "input.1", "onnx::Conv_5", "val_12")."""
    return bool(_GENERATED_NAME.match(name))


def export_onnx(model: nn.Module, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Export the deploy network to `path` with dynamic N, H, W and check the result.

    Args:
        model: a deploy network in eval mode: (N, 3, H, W) float32 raw RGB 0-255 ->
            (logits (N, K, H, W) float32, mask (N, H, W) int32).
        path: destination `.onnx` file (weights embedded, no external data).
        opset: ONNX opset, MIN_OPSET..MAX_OPSET.

    Returns:
        `path`.

    Raises:
        ExportError: opset out of range, the exporter failed, or the graph fails `check_graph`.
    """
    validate_opset(opset)
    model = model.eval()
    example = torch.rand(TRACE_SHAPE) * 255.0
    dim = torch.export.Dim.DYNAMIC
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[LOGITS_NAME, MASK_NAME],
                dynamic_shapes=({i: dim for i in _DYNAMIC_INPUT_DIMS},),
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
    # The exporter raises many unrelated types (torch._dynamo, onnxscript, onnx); all mean the same
    # thing to the user: this network cannot be exported as is.
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ExportError(
            f"ONNX export of {type(model).__name__} failed ({type(exc).__name__}: {first_line}); "
            "the deploy network must be traceable by torch.export with dynamic N/H/W"
        ) from exc
    proto = onnx.load(str(path))
    check_graph(proto, opset=opset, where=str(path))
    logger.info("exported %s (opset %d, %d nodes)", path, opset, len(proto.graph.node))
    return path


def check_graph(
    proto: onnx.ModelProto, opset: int | None = None, where: str = "model.onnx"
) -> None:
    """Structural checks of a deploy-graph ONNX.

    `onnx.checker` (full check, with shape inference); inputs exactly (`images`,) and outputs
    exactly (`logits`, `mask`) so that no generated name reaches configs or clients; the input's N,
    H, W and the outputs' N, H, W symbolic rather than fixed; the default-domain opset equal to
    `opset`.

    Raises:
        ExportError: naming the first check that failed.
    """
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{where} fails onnx.checker: {str(exc).splitlines()[0]}") from exc

    inputs = [v.name for v in proto.graph.input]
    outputs = [v.name for v in proto.graph.output]
    for kind, names, expected in (
        ("inputs", inputs, [INPUT_NAME]),
        ("outputs", outputs, [LOGITS_NAME, MASK_NAME]),
    ):
        generated = [n for n in names if is_generated_name(n)]
        if generated:
            raise ExportError(
                f"{where} has generated {kind} names {generated}; expected {expected}"
            )
        if names != expected:
            raise ExportError(
                f"{where} has {kind} {names}; the deploy graph needs exactly {expected}"
            )

    dynamic_axes = {INPUT_NAME: (0, 2, 3), LOGITS_NAME: (0, 2, 3), MASK_NAME: (0, 1, 2)}
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        fixed = [
            i for i in dynamic_axes[value.name] if i >= len(dims) or dims[i].HasField("dim_value")
        ]
        if fixed:
            shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise ExportError(
                f"{where}: {value.name} has fixed dims {fixed} (shape {shape}); N, H and W must be "
                "dynamic. The network bakes an input size into the graph."
            )

    if opset is not None:
        actual = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if actual != opset:
            raise ExportError(f"{where} has opset {actual}, {opset} was requested")
