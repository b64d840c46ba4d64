"""Explicit INT8 quantization of the FP32 deploy graph (Q/DQ nodes in the ONNX), calibrated on
images.

Tool: onnxruntime's `quantize_static` after `quant_pre_process` (symbolic shape inference + graph
optimisation), pure CPU. The TensorRT artifact is symmetric INT8 Q/DQ: activations and weights
QInt8, every zero-point 0 (TensorRT rejects others), weights per output channel, biases left in
float (TensorRT's parser rejects a DequantizeLinear of int32 biases). Only the inputs of the
weighted ops (`QUANTIZED_OP_TYPES`: Conv, MatMul, Gemm) get Q/DQ pairs, their outputs none, as
TensorRT's placement guide recommends: TensorRT fuses conv + bias + activation and requantizes at
the next Q. Quantizing a conv's raw output instead (onnxruntime's default) puts a Q/DQ pair before
the ReLU6 of EfficientNet blocks, whose pre-activation range (+-150) leaves the clipped 0..6 range
about four levels; measured on the demo network, pixel agreement with FP32 fell from 0.92 to 0.70.

Default exclusion (`default_nodes_to_exclude`): the tail that produces `logits`, i.e. the final
classifier (the first Conv/MatMul/Gemm met walking back from `logits`) and the resize after it.
Class scores are the most sensitive place to quantize (a shift there flips pixels between classes)
and the classifier is a negligible share of the compute. User exclusions are added to it.

The optional CPU flavour (`CPU_FLAVOUR`) is what onnxruntime runs fast on x86 without VNNI: u8
activations, 7-bit s8 weights (no u8 x s8 saturation), fused QLinear* operators over every op
onnxruntime can quantize (so conv + ReLU6 fuse and take the activation's range). The Q/DQ file runs
slowly in onnxruntime (its convs cannot fuse without output Q/DQ); it is the TensorRT artifact.
Calibration runs once: the tensor ranges are cached and shared by both files.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from cosa.choices import CalibrationMethod
from cosa.errors import ExportError
from cosa.export.calibration import CalibrationSet
from cosa.export.onnx_export import check_graph
from cosa.export.spec import INPUT_NAME, LOGITS_NAME

logger = logging.getLogger(__name__)

CALIBRATION_METHODS: tuple[str, ...] = tuple(CalibrationMethod)
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
_CALIB_BATCH = 1  # images per calibration inference
_MAX_CALIB_STRIDE = 8  # images whose activations are held at once (ViT-B at 448 px: ~0.25 GB each)


@dataclass(frozen=True)
class Int8Flavour:
    """One way of writing the quantized graph."""

    name: str
    quant_format: str  # "QDQ" | "QOperator" (onnxruntime.quantization.QuantFormat member names)
    activation_type: str  # "QInt8" | "QUInt8" (QuantType member names)
    reduce_range: bool  # 7-bit weights: avoids u8s8 saturation on x86 CPUs without VNNI
    symmetric_activations: bool
    op_types: tuple[str, ...] | None  # None: every op type onnxruntime can quantize
    quantize_outputs: bool  # Q/DQ on the outputs of `op_types` nodes too
    quantize_bias: bool  # int32 bias + DequantizeLinear (TensorRT's parser rejects int32 DQ)


TENSORRT_FLAVOUR = Int8Flavour(
    "tensorrt",
    "QDQ",
    "QInt8",
    reduce_range=False,
    symmetric_activations=True,
    op_types=QUANTIZED_OP_TYPES,
    quantize_outputs=False,
    quantize_bias=False,
)
"""Symmetric s8/s8 Q/DQ on weighted-op inputs, zero-points 0: TensorRT's explicit quantization."""
CPU_FLAVOUR = Int8Flavour(
    "cpu",
    "QOperator",
    "QUInt8",
    reduce_range=True,
    symmetric_activations=False,
    op_types=None,
    quantize_outputs=True,
    quantize_bias=True,
)
"""u8 activations / s8 weights as fused QLinear* operators: onnxruntime's fast x86 path."""


@dataclass(frozen=True)
class Int8Result:
    """What `quantize_int8` wrote."""

    path: Path
    method: str
    excluded_nodes: tuple[str, ...]
    quantized_nodes: int  # QuantizeLinear nodes (Q/DQ format) or QLinear*/*Integer ops
    cpu_path: Path | None = None


def default_nodes_to_exclude(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes between the final classifier and `logits`, the classifier included.

    Walks back from the `logits` output along each node's data input (input 0) until a
    Conv/MatMul/Gemm is met.

    Raises:
        ExportError: no weighted op feeds `logits` (not a deploy graph).
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    tail: list[str] = []
    tensor = LOGITS_NAME
    while tensor in producer:
        node = producer[tensor]
        tail.append(node.name)
        if node.op_type in QUANTIZED_OP_TYPES:
            return tail
        if not node.input:
            break
        tensor = node.input[0]
    raise ExportError(
        f"no {'/'.join(QUANTIZED_OP_TYPES)} feeds '{LOGITS_NAME}'; the graph is not a deploy graph"
    )


def zero_points(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Zero-point arrays of every QuantizeLinear/DequantizeLinear node, by node name.

    A node without the optional zero-point input maps to the ONNX default, a uint8 scalar 0.
    """
    initializers = {t.name: t for t in model.graph.initializer}
    constants = {
        out: attr.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for out in node.output
        for attr in node.attribute
        if attr.name == "value"
    }
    points: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            points[node.name] = np.zeros((), dtype=np.uint8)
            continue
        name = node.input[2]
        if name in initializers:
            points[node.name] = numpy_helper.to_array(initializers[name])
        elif name in constants:
            points[node.name] = numpy_helper.to_array(constants[name])
        else:
            raise ExportError(f"zero-point {name!r} of {node.name} is not a constant")
    return points


def quantize_int8(
    src: Path,
    dst: Path,
    calibration: CalibrationSet,
    method: str,
    work_dir: Path,
    exclude_nodes: Sequence[str] = (),
    cpu_dst: Path | None = None,
) -> Int8Result:
    """Quantize the FP32 deploy graph `src` to symmetric INT8 Q/DQ at `dst`.

    Args:
        src: FP32 deploy-graph ONNX.
        dst: the TensorRT-ready INT8 ONNX (`TENSORRT_FLAVOUR`).
        calibration: images fed through the graph to collect activation ranges.
        method: "entropy" | "percentile" | "minmax".
        work_dir: scratch folder (pre-processed model, calibration cache); the caller removes it.
        exclude_nodes: node names to keep in float, added to `default_nodes_to_exclude`. Names
            refer to the pre-processed graph (`work_dir/preprocessed.onnx`), which keeps the
            exporter's node names except where onnxruntime fused nodes.
        cpu_dst: if given, also write the `CPU_FLAVOUR` model there (same calibration ranges).

    Returns:
        Paths, method, the excluded node names and the number of quantized tensors.

    Raises:
        ExportError: unknown method or node name, quantization failure, a non-zero zero-point,
            or an output graph that fails `check_graph`.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ExportError(
            f"--calib-method {method!r} is not one of {', '.join(CALIBRATION_METHODS)}"
        )
    preprocessed = work_dir / "preprocessed.onnx"
    try:
        # Symbolic shape inference lets the quantizer see the shapes of a dynamic-H/W graph.
        quant_pre_process(str(src), str(preprocessed), skip_symbolic_shape=False)
    except Exception as exc:  # onnxruntime's pre-processing raises bare Exceptions
        raise ExportError(f"INT8 pre-processing of {src} failed: {exc}") from exc
    model = onnx.load(str(preprocessed))
    excluded = _resolve_exclusions(model, exclude_nodes)

    cache = work_dir / "calibration_ranges.json"
    if cpu_dst is not None:  # first: it calibrates every tensor, a superset of what Q/DQ needs
        _quantize(preprocessed, cpu_dst, calibration, method, excluded, CPU_FLAVOUR, cache)
        check_graph(onnx.load(str(cpu_dst)), where=str(cpu_dst))
        logger.info("wrote %s (onnxruntime CPU flavour)", cpu_dst)
    _quantize(preprocessed, dst, calibration, method, excluded, TENSORRT_FLAVOUR, cache)
    quantized = onnx.load(str(dst))
    asymmetric = [
        name for name, zp in zero_points(quantized).items() if zp.dtype != np.int8 or np.any(zp)
    ]
    if asymmetric:
        raise ExportError(
            f"{dst}: {len(asymmetric)} Q/DQ nodes have a zero-point that is not int8 0 (e.g. "
            f"{asymmetric[0]}); TensorRT takes only int8 Q/DQ with zero-point 0"
        )
    check_graph(quantized, where=str(dst))
    count = sum(1 for n in quantized.graph.node if n.op_type == "QuantizeLinear")
    logger.info("wrote %s: %d quantized tensors, %d nodes excluded", dst, count, len(excluded))
    return Int8Result(
        path=dst,
        method=method,
        excluded_nodes=tuple(excluded),
        quantized_nodes=count,
        cpu_path=cpu_dst,
    )


def _resolve_exclusions(model: onnx.ModelProto, extra: Sequence[str]) -> list[str]:
    names = [n.name for n in model.graph.node]
    known = set(names)
    for name in extra:
        if name not in known:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ExportError(
                f"--exclude-node {name!r} is not a node of the pre-processed graph{hint}"
            )
    excluded = default_nodes_to_exclude(model)
    return excluded + [n for n in extra if n not in excluded]


class _Reader:
    """onnxruntime calibration data reader (duck-typed: `CalibrationDataReader` accepts any class
    with `get_next`) over a `CalibrationSet`, with `set_range` support so
    that calibration collects statistics one slice at a time (bounded memory)."""

    def __init__(self, calibration: CalibrationSet) -> None:
        self._batches = list(calibration.batches(_CALIB_BATCH))
        self._iter: Iterator[np.ndarray] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._iter, None)
        return None if batch is None else {INPUT_NAME: batch}

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._iter = iter(self._batches[start_index:end_index])


def _calibration_stride(count: int) -> int:
    """Largest divisor of `count` up to `_MAX_CALIB_STRIDE` (onnxruntime needs an exact divisor)."""
    return max(d for d in range(1, _MAX_CALIB_STRIDE + 1) if count % d == 0)


def _quantize(
    src: Path,
    dst: Path,
    calibration: CalibrationSet,
    method: str,
    excluded: Sequence[str],
    flavour: Int8Flavour,
    cache: Path,
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
    }
    # onnxruntime's calibrators print progress to stdout; library code must not.
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            quantize_static(
                str(src),
                str(dst),
                calibration_data_reader=_Reader(calibration),
                quant_format=QuantFormat[flavour.quant_format],
                op_types_to_quantize=list(flavour.op_types) if flavour.op_types else None,
                per_channel=True,
                reduce_range=flavour.reduce_range,
                activation_type=QuantType[flavour.activation_type],
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(excluded),
                calibrate_method=methods[method],
                calibration_cache_path=str(cache),
                extra_options={
                    "ActivationSymmetric": flavour.symmetric_activations,
                    "WeightSymmetric": True,
                    "QuantizeBias": flavour.quantize_bias,
                    # Collect statistics a few images at a time and merge: memory stays at a few
                    # images' activations instead of the whole set's (onnxruntime otherwise keeps
                    # every intermediate output of every image until the end).
                    "CalibStridedMinMax": _calibration_stride(calibration.count),
                    "OpTypesToExcludeOutputQuantization": (
                        [] if flavour.quantize_outputs else list(flavour.op_types or ())
                    ),
                },
            )
    except Exception as exc:  # onnxruntime raises ValueError/RuntimeError/its pybind types
        raise ExportError(f"INT8 quantization ({flavour.name}) of {src} failed: {exc}") from exc
    finally:
        for line in sink.getvalue().splitlines():
            logger.debug("onnxruntime: %s", line)
