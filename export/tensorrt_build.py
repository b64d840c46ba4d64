"""TensorRT engines from the deploy-graph ONNX, and a runner to check them (TensorRT 10.x and 11.x).

TensorRT is optional and imported lazily: without it (or without a CUDA GPU) every entry point
raises `MissingDependencyError` with one line naming what is missing. Only the documented API common
to 10 and 11 is used (DEPLOYMENT.md): `Builder(logger)`, `create_network(0)`,
`OnnxParser.parse_from_file` (every `get_error(i)` reported), `set_memory_pool_limit(WORKSPACE)`,
one optimization profile, a timing cache, `build_serialized_network`; at run time
`deserialize_cuda_engine`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`.

Precision, by major version (`int(trt.__version__.split('.')[0])`):
  * 10: networks are weakly typed unless created STRONGLY_TYPED; the builder flags say which reduced
    precisions TensorRT may choose. An FP16 ONNX is built with `FP16`; an INT8 Q/DQ ONNX with
    `INT8` (needed for explicit quantization in weakly typed networks) plus `FP16` so that the
    layers left in float may run in half precision. No calibrator: the scales are in the Q/DQ nodes.
  * 11: weak typing, the precision flags and the INT8 calibrators are gone; every network is
    strongly typed and the precision is the ONNX's (FP16 casts from `cosa.export.fp16`, Q/DQ from
    `cosa.export.int8`). No flag is set.
The engine is written as a plain `model.plan` (never with metadata in front: Triton rejects that);
the TensorRT version and GPU go into spec.json.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cosa.choices import Precision
from cosa.errors import ExportError
from cosa.export import tensorrt_engine
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ShapeProfile
from cosa.export.tensorrt_engine import Engine, cuda_device, make_logger, tensorrt_major
from cosa.files import write_bytes_atomic

logger = logging.getLogger(__name__)

# Wording of the missing-dependency messages of `cosa export --trt`.
_PURPOSE = "--trt"
_FALLBACK = "export without --trt here and build the engine on the GPU machine"

DEFAULT_WORKSPACE_MIB = 4096
PRECISIONS: tuple[str, ...] = tuple(Precision)

# TensorRT 10 builder flags per ONNX precision (see the module docstring); 11 takes none.
_TRT10_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, version 10.x or 11.x, for `--trt` (see `tensorrt_engine`).

    Raises:
        MissingDependencyError: not installed, or a major version below 10.
    """
    return tensorrt_engine.import_tensorrt(_PURPOSE, _FALLBACK)


def cuda_device_name() -> str:
    """Name of CUDA device 0, the GPU an engine is built for.

    Raises:
        MissingDependencyError: no CUDA GPU visible to torch.
    """
    import torch

    return str(torch.cuda.get_device_name(cuda_device(0, _PURPOSE, _FALLBACK)))


def require_tensorrt() -> tuple[ModuleType, str]:
    """Import TensorRT and find the GPU: `(tensorrt module, GPU name)`.

    Raises:
        MissingDependencyError: TensorRT or a CUDA GPU is missing (one line saying which).
    """
    trt = import_tensorrt()
    return trt, cuda_device_name()


def validate_profile(profile: ShapeProfile) -> None:
    """Check that min <= opt <= max per dim and every dim is positive.

    Raises:
        ExportError: naming the first dim that violates it.
    """
    for label, shape in (("min", profile.min), ("opt", profile.opt), ("max", profile.max)):
        if len(shape) != 3 or any(int(v) < 1 for v in shape):
            raise ExportError(
                f"--{label}-shape {_fmt(shape)} is invalid; pass NxHxW with three positive integers"
            )
    for axis, dim in enumerate(("N", "H", "W")):
        low, mid, high = profile.min[axis], profile.opt[axis], profile.max[axis]
        if not low <= mid <= high:
            raise ExportError(
                f"shape profile needs min <= opt <= max in every dim, but {dim} is min {low}, "
                f"opt {mid}, max {high} (--min-shape {_fmt(profile.min)}, --opt-shape "
                f"{_fmt(profile.opt)}, --max-shape {_fmt(profile.max)})"
            )


def precision_flags(major: int, precision: str) -> tuple[str, ...]:
    """`trt.BuilderFlag` names to set for an ONNX of `precision` on TensorRT `major`."""
    if precision not in PRECISIONS:
        raise ExportError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return _TRT10_FLAGS[precision] if major == 10 else ()


def default_timing_cache(tensorrt_version: str, gpu_name: str) -> Path:
    """Per-version, per-GPU timing cache file in `$XDG_CACHE_HOME/cosa/tensorrt` (or ~/.cache)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{tensorrt_version}-{gpu_name}").strip("-")
    return root / "cosa" / "tensorrt" / f"timing-{slug}.cache"


def profile_check_shapes(profile: ShapeProfile) -> list[tuple[int, int, int]]:
    """(N, H, W) shapes to compare an engine at: min, opt, and an odd size inside the profile."""

    def odd_mid(axis: int) -> int:
        low, high = profile.min[axis], profile.max[axis]
        mid = (low + high) // 2 | 1  # odd: not a multiple of 16
        return min(max(mid, low), high)

    batch = min(2, profile.max[0]) if profile.min[0] <= 2 else profile.min[0]
    shapes = [tuple(profile.min), tuple(profile.opt), (batch, odd_mid(1), odd_mid(2))]
    return list(dict.fromkeys(shapes))  # unique, in order


@dataclass(frozen=True)
class EngineInfo:
    """What `build_engine` produced."""

    path: Path
    tensorrt_version: str
    gpu_name: str
    precision: str
    builder_flags: tuple[str, ...]
    timing_cache: Path
    build_seconds: float


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: ShapeProfile,
    precision: str,
    workspace_mib: int = DEFAULT_WORKSPACE_MIB,
    timing_cache: Path | None = None,
) -> EngineInfo:
    """Build a serialized engine from a deploy-graph ONNX.

    Args:
        onnx_path: FP32, FP16 or INT8 (Q/DQ) deploy graph.
        plan_path: where the plain serialized engine is written (atomically).
        profile: the one optimization profile, (N, H, W) min/opt/max of `images`.
        precision: what `onnx_path` holds ("fp32" | "fp16" | "int8"); sets TensorRT 10 flags.
        workspace_mib: builder workspace limit in MiB.
        timing_cache: timing cache file, read if present and rewritten after the build; None uses
            `default_timing_cache`. A cache from another TensorRT version/GPU is ignored with a
            warning and replaced.

    Returns:
        The engine's path, TensorRT version, GPU, flags, cache path and build time.

    Raises:
        MissingDependencyError: TensorRT or CUDA missing.
        ExportError: invalid profile or workspace, parser errors (all of them listed), a graph whose
            input is not `images`, or a failed build.
    """
    validate_profile(profile)
    if workspace_mib < 1:
        raise ExportError(f"workspace {workspace_mib} MiB is invalid; pass a positive size in MiB")
    trt, gpu = require_tensorrt()
    major = tensorrt_major(trt)
    cache_path = timing_cache or default_timing_cache(str(trt.__version__), gpu)
    trt_logger = make_logger(trt)
    started = time.perf_counter()

    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # 10: weakly typed (flags below); 11: always strongly typed
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = parser_errors(parser)
        raise ExportError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path}: {len(errors)} error(s): "
            + " | ".join(errors or ["(the parser reported no details)"])
        )
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if inputs != [INPUT_NAME]:
        raise ExportError(
            f"{onnx_path} has inputs {inputs}; the deploy graph has only {INPUT_NAME!r}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    flags = precision_flags(major, precision)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if major != 10:
        logger.info("TensorRT %s: precision comes from the ONNX (%s)", trt.__version__, precision)

    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, _nchw(profile.min), _nchw(profile.opt), _nchw(profile.max))
    config.add_optimization_profile(opt_profile)
    _attach_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = trt_logger.errors[-1] if trt_logger.errors else "see the TensorRT log above"
        raise ExportError(
            f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} ({detail}); "
            "try a larger workspace or a smaller --max-shape"
        )
    write_bytes_atomic(plan_path, memoryview(serialized))
    try:
        write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    except OSError as exc:  # the cache only speeds up the next build; the engine is fine
        logger.warning("could not save the timing cache to %s: %s", cache_path, exc)
    seconds = time.perf_counter() - started
    logger.info(
        "built %s with TensorRT %s on %s in %.1f s", plan_path, trt.__version__, gpu, seconds
    )
    return EngineInfo(
        path=plan_path,
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu,
        precision=precision,
        builder_flags=flags,
        timing_cache=cache_path,
        build_seconds=seconds,
    )


def parser_errors(parser: Any) -> list[str]:
    """Every error an `OnnxParser` recorded, as text (`parser.get_error(i)` for all i)."""
    return [str(parser.get_error(i)) for i in range(parser.num_errors)]


class EngineRunner:
    """Runs a `model.plan` on CUDA device 0; a numpy-in, numpy-out `verify.Runner`."""

    def __init__(self, plan_path: Path) -> None:
        """Deserialize the engine.

        Raises:
            MissingDependencyError: TensorRT or CUDA missing.
            EngineError: (an `ExportError`) the plan was built by another TensorRT version or
                GPU, or is corrupt.
        """
        self._engine = Engine(plan_path, purpose=_PURPOSE, fallback=_FALLBACK)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) float32 0-255 -> (logits (N, K, H, W) float32, mask (N, H, W) int32).

        Raises:
            EngineError: (an `ExportError`) the shape is outside the engine's profile or
                execution failed.
        """
        out = self._engine.run(images, (LOGITS_NAME, MASK_NAME))
        return out[LOGITS_NAME], out[MASK_NAME]


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Give the builder the timing cache in `path`, or a fresh one when it cannot be used.

    TensorRT answers a corrupt or foreign cache either by `create_timing_cache` returning None
    (a file it cannot parse) or by `set_timing_cache` returning False (another version/GPU).

    Raises:
        ExportError: TensorRT cannot create even an empty cache.
    """
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            logger.info("reusing timing cache %s", path)
        return
    logger.warning(
        "timing cache %s is corrupt or from another TensorRT/GPU; starting a new one", path
    )
    fresh = config.create_timing_cache(b"")
    if fresh is None or not config.set_timing_cache(fresh, ignore_mismatch=False):
        raise ExportError("TensorRT cannot create an empty timing cache; see the TensorRT log")


def _nchw(shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    n, h, w = shape
    return (int(n), 3, int(h), int(w))


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)
