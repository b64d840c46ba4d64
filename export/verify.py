"""Numerical verification of an exported artifact against a reference (PyTorch or another artifact).

Every export runs the artifact and its reference on the same images at several shapes, some of
them not multiples of 16 (the deploy graph resizes internally, where a baked constant would show),
and compares the `logits` (max abs difference against `atol + rtol * max|ref|`) and the `mask`
(share of pixels with the same class). The result is stored in spec.json `verification`, one entry
per artifact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cosa.errors import ExportError
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME

logger = logging.getLogger(__name__)

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 224, 224), (2, 333, 517), (1, 200, 250))
"""(N, H, W) checked by default: a multiple of 16, then two sizes that are not."""

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(N, 3, H, W) float32 0-255 -> (logits (N, K, H, W) float32, mask (N, H, W) int)."""


@dataclass(frozen=True)
class Tolerance:
    """Pass criteria: max |logits diff| <= `atol + rtol * max|reference logits|` (if
    `check_logits`) and mask agreement >= `min_mask_agreement`, at every shape.

    `fatal`: a miss raises `ExportError` (an exported graph that computes something else is a bug);
    otherwise it is recorded (`passed: false`) and logged as a warning. INT8 misses are not fatal:
    how far a quantized segmenter may drift is the user's call, made on its reported numbers.
    """

    atol: float
    rtol: float
    min_mask_agreement: float
    check_logits: bool = True  # INT8 logits shift by design; only its masks are held to a bound
    fatal: bool = True


FP32_TOLERANCE = Tolerance(atol=1e-4, rtol=1e-4, min_mask_agreement=0.999)
"""onnxruntime FP32 vs torch: kernels differ in summation order only (measured ~2e-6 on ViTs)."""
FP16_TOLERANCE = Tolerance(atol=2e-2, rtol=1e-2, min_mask_agreement=0.98)
"""FP16 weights/activations vs the FP32 ONNX: ~3 significant digits through the whole network."""
INT8_TOLERANCE = Tolerance(
    atol=0.0, rtol=0.0, min_mask_agreement=0.90, check_logits=False, fatal=False
)
"""INT8 vs the FP32 ONNX: below 90% pixel agreement a quantized segmenter has likely collapsed
(an untrained network, whose logits are near ties everywhere, also lands there)."""
TENSORRT_TOLERANCES = {
    # TensorRT vs the ONNX it was built from, in onnxruntime. FP32 engines may use TF32 (on by
    # default on Ampere and later: 10-bit mantissa), hence 1e-2 rather than FP32_TOLERANCE.
    "fp32": Tolerance(atol=1e-2, rtol=1e-2, min_mask_agreement=0.99),
    "fp16": Tolerance(atol=5e-2, rtol=2e-2, min_mask_agreement=0.98),
    # Q/DQ placement and fusion differ between TensorRT and onnxruntime's CPU kernels.
    "int8": Tolerance(atol=0.0, rtol=0.0, min_mask_agreement=0.90, check_logits=False, fatal=False),
}


@dataclass(frozen=True)
class ShapeResult:
    """Comparison at one input shape."""

    shape: tuple[int, int, int, int]  # (N, 3, H, W)
    max_abs_diff: float  # max |logits - reference logits|
    mask_agreement: float  # share of pixels where mask == reference mask, in [0, 1]


@dataclass(frozen=True)
class VerificationReport:
    """Comparison of one artifact against its reference at several shapes."""

    artifact: str
    reference: str
    images: str
    tolerance: Tolerance
    results: tuple[ShapeResult, ...] = field(default_factory=tuple)
    failures: tuple[str, ...] = ()  # why it missed `tolerance` (non-fatal tolerances only)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.results)

    @property
    def min_mask_agreement(self) -> float:
        return min(r.mask_agreement for r in self.results)

    def to_json_dict(self) -> dict[str, Any]:
        """The spec.json `verification` entry of this artifact."""
        return {
            "reference": self.reference,
            "images": self.images,
            "tolerance": asdict(self.tolerance),
            "max_abs_diff": self.max_abs_diff,
            "min_mask_agreement": self.min_mask_agreement,
            "passed": self.passed,
            "failures": list(self.failures),
            "shapes": [
                {
                    "shape": list(r.shape),
                    "max_abs_diff": r.max_abs_diff,
                    "mask_agreement": r.mask_agreement,
                }
                for r in self.results
            ],
        }


def random_images(shapes: Iterable[Sequence[int]], seed: int = 0) -> list[np.ndarray]:
    """Uniform random float32 images in [0, 255], one (N, 3, H, W) array per (N, H, W) shape."""
    rng = np.random.default_rng(seed)
    return [
        (rng.random((n, 3, h, w), dtype=np.float32) * 255.0).astype(np.float32)
        for n, h, w in shapes
    ]


def torch_runner(model: nn.Module) -> Runner:
    """Wrap a deploy network (on the CPU, eval mode) as a numpy runner."""
    model = model.eval()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, mask = model(torch.from_numpy(images))
        return logits.float().numpy(), mask.numpy()

    return run


def onnxruntime_runner(path: Path, threads: int = 0, optimize: bool = True) -> Runner:
    """Wrap an ONNX file as a numpy runner on onnxruntime's CPU provider.

    Args:
        path: a deploy-graph ONNX (any precision; inputs/outputs stay float32/int32).
        threads: intra-op threads, 0 = onnxruntime's default (one per physical core).
        optimize: False turns graph optimisations off. For a Q/DQ model this evaluates every
            QuantizeLinear/DequantizeLinear exactly as written ("fake quantization"), which is
            the arithmetic TensorRT implements. With optimisations on, onnxruntime fuses Q/DQ into
            int8 kernels whose u8 x s8 products saturate in 16 bits on x86 CPUs without VNNI
            (AVX2), an error of the CPU kernel, not of the quantized model.

    Raises:
        ExportError: onnxruntime cannot load the file.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        raise ExportError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from exc

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = session.run([LOGITS_NAME, MASK_NAME], {INPUT_NAME: images})
        return logits, mask

    return run


def compare(
    candidate: Runner,
    reference: Runner,
    images: Sequence[np.ndarray],
    *,
    artifact: str,
    reference_name: str,
    images_name: str,
    tolerance: Tolerance,
) -> VerificationReport:
    """Run both on every batch of `images` and compare.

    Args:
        candidate: the artifact under test.
        reference: what it must agree with.
        images: float32 (N, 3, H, W) batches in [0, 255], any N/H/W.
        artifact: file name reported (e.g. "model.onnx").
        reference_name: e.g. "torch eager fp32" or "model.onnx".
        images_name: a description of the images, stored with the numbers.
        tolerance: pass criteria.

    Returns:
        The report (also when it passes: callers store it).

    Raises:
        ExportError: a shape/dtype mismatch or a result outside `tolerance`, naming the shape.
    """
    results = []
    failures: list[str] = []
    for batch in images:
        ref_logits, ref_mask = reference(batch)
        logits, mask = candidate(batch)
        n, _, h, w = batch.shape
        if logits.shape != ref_logits.shape or mask.shape != (n, h, w):
            raise ExportError(
                f"{artifact} returns logits {logits.shape} / mask {mask.shape} for input "
                f"{batch.shape}; {reference_name} returns {ref_logits.shape} / {ref_mask.shape}"
            )
        if logits.dtype != np.float32 or mask.dtype != np.int32:
            raise ExportError(
                f"{artifact} returns {logits.dtype}/{mask.dtype}; the deploy graph's outputs are "
                "float32 logits and an int32 mask"
            )
        result = ShapeResult(
            shape=(n, 3, h, w),
            max_abs_diff=float(np.abs(logits - ref_logits).max()),
            mask_agreement=float(np.mean(mask == ref_mask)),
        )
        results.append(result)
        logger.info(
            "%s vs %s at %s: max |diff| %.3g, mask agreement %.5f",
            artifact,
            reference_name,
            "x".join(map(str, result.shape)),
            result.max_abs_diff,
            result.mask_agreement,
        )
        missed = _misses(
            result, float(np.abs(ref_logits).max()), tolerance, artifact, reference_name
        )
        if missed and tolerance.fatal:
            raise ExportError(missed[0])
        for message in missed:
            logger.warning("%s", message)
        failures += missed
    return VerificationReport(
        artifact=artifact,
        reference=reference_name,
        images=images_name,
        tolerance=tolerance,
        results=tuple(results),
        failures=tuple(failures),
    )


def _misses(
    result: ShapeResult, ref_scale: float, tol: Tolerance, artifact: str, reference: str
) -> list[str]:
    """Messages for every criterion of `tol` that `result` misses."""
    shape = "x".join(map(str, result.shape))
    bound = tol.atol + tol.rtol * ref_scale
    messages = []
    if tol.check_logits and not result.max_abs_diff <= bound:  # `not <=` also catches NaN
        messages.append(
            f"{artifact} disagrees with {reference} at {shape}: max |logits diff| "
            f"{result.max_abs_diff:.3g} > {bound:.3g} (atol {tol.atol}, rtol {tol.rtol}); the "
            "exported graph does not compute what the network computes"
        )
    if not result.mask_agreement >= tol.min_mask_agreement:
        messages.append(
            f"{artifact} disagrees with {reference} at {shape}: mask agreement "
            f"{result.mask_agreement:.4f} < {tol.min_mask_agreement}; for INT8 try another "
            "--calib-method, more calibration images, or exclude sensitive nodes"
        )
    return messages
