"""FP16 ONNX: float16 weights and activations; float32 `images`/`logits`, int32 `mask` at the edges.

Tool: `onnxruntime.transformers.float16.convert_float_to_float16`, which ships inside the
onnxruntime wheel (no extra dependency). DEPLOYMENT.md reports that the stand-alone
`onnxconverter-common` produced an FP16 model onnxruntime could not load from one export; the same
converter inside onnxruntime, run on a dynamo export, gives a valid graph once two things are
repaired here:
  * it appends the boundary Casts at the end of the node list, so the graph is topologically sorted
    again (onnx-ir's `TopologicalSortPass`; onnx-ir comes with onnxscript);
  * the dynamo exporter's `value_info` entries keep float32 types for tensors that became float16,
    so they are cleared (the same step ModelOpt AutoCast needs, DEPLOYMENT.md) and re-inferred.
The result passes `onnx.checker` and runs in onnxruntime; `cosa.export.verify` then compares it
with the FP32 ONNX. Ops in the converter's default block list (Range, TopK, CumSum, Min/Max, ...)
stay FP32, and so do `FP32_OPS`: TensorRT 11 builds every network strongly typed, so an op runs in
the precision its inputs have in the ONNX, and LayerNorm's variance and Softmax's exponentials
overflow FP16 (ViT LayerNorm overflow is a known TensorRT complaint; TensorRT 10's weakly typed
FP16 builds kept them in FP32 on their own).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnx

from cosa.errors import ExportError

logger = logging.getLogger(__name__)

FP32_OPS = ("LayerNormalization", "Softmax")
"""Op types kept in FP32 (inputs cast up, outputs cast down) in every FP16 graph."""


def convert_to_fp16(src: Path, dst: Path, keep_fp32_nodes: Sequence[str] = ()) -> Path:
    """Write an FP16 copy of the FP32 deploy graph `src` to `dst`.

    Args:
        src: FP32 deploy-graph ONNX (`images` float32 in; `logits` float32, `mask` int32 out).
        dst: destination file; inputs/outputs keep their FP32/INT32 types.
        keep_fp32_nodes: node names to leave in FP32 (numerically sensitive layers).

    Returns:
        `dst`.

    Raises:
        ExportError: the converter failed or produced a graph that fails `onnx.checker`.
    """
    import onnx_ir as ir
    from onnx_ir.passes.common import TopologicalSortPass
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    del model.graph.value_info[:]  # stale FP32 annotations of tensors that become FP16
    try:
        converted = convert_float_to_float16(
            model,
            keep_io_types=True,
            op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
            node_block_list=list(keep_fp32_nodes),
        )
    # The converter raises bare ValueError/KeyError/AssertionError on graphs it cannot handle.
    except Exception as exc:
        raise ExportError(f"FP16 conversion of {src} failed ({type(exc).__name__}: {exc})") from exc

    ir_model = ir.serde.deserialize_model(converted)
    TopologicalSortPass()(ir_model)
    converted = ir.serde.serialize_model(ir_model)
    del converted.graph.value_info[:]
    try:
        converted = onnx.shape_inference.infer_shapes(converted, strict_mode=True)
        onnx.checker.check_model(converted, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"FP16 graph converted from {src} is invalid: {exc}") from exc
    onnx.save(converted, str(dst))
    fp16 = sum(1 for t in converted.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    logger.info("wrote %s (%d FP16 initializers)", dst, fp16)
    return dst
