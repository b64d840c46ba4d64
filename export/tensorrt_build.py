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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cosa.choices import Precision
from cosa.errors import ExportError, MissingDependencyError
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ShapeProfile

logger = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10, 11)
DEFAULT_WORKSPACE_MIB = 4096
PRECISIONS: tuple[str, ...] = tuple(Precision)

# TensorRT 10 builder flags per ONNX precision (see the module docstring); 11 takes none.
_TRT10_FLAGS = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module, version 10.x or 11.x.

    Raises:
        MissingDependencyError: not installed, or a major version other than 10/11.
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            f"--trt needs TensorRT 10.x or 11.x, which is not installed ({exc}); install NVIDIA's "
            "`tensorrt` Python package on a machine with an NVIDIA GPU, or export without --trt"
        ) from exc
    major = tensorrt_major(trt)
    if major < SUPPORTED_MAJORS[0]:
        raise MissingDependencyError(
            f"--trt needs TensorRT 10.x or 11.x, found {trt.__version__}; upgrade TensorRT"
        )
    if major > SUPPORTED_MAJORS[-1]:
        logger.warning("TensorRT %s is newer than 11.x; building it like 11.x", trt.__version__)
    return trt


def tensorrt_major(trt: ModuleType) -> int:
    """Major version of an imported `tensorrt` module (`"10.13.0.35"` -> 10)."""
    return int(str(trt.__version__).split(".")[0])


def cuda_device_name() -> str:
    """Name of CUDA device 0, the GPU an engine is built for.

    Raises:
        MissingDependencyError: no CUDA GPU visible to torch.
    """
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "--trt needs a CUDA GPU and driver; none is visible on this machine "
            "(torch.cuda.is_available() is False). Export without --trt here and build the engine "
            "on the GPU machine"
        )
    return str(torch.cuda.get_device_name(0))


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
    trt_logger = _make_logger(trt)
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
    _write_atomic(plan_path, serialized)
    try:
        _write_atomic(cache_path, config.get_timing_cache().serialize())
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
    """Runs a `model.plan` on CUDA device 0; a numpy-in, numpy-out `verify.Runner`.

    Buffers are torch CUDA tensors (torch is a dependency anyway, so no pycuda/cuda-python).
    """

    def __init__(self, plan_path: Path) -> None:
        """Deserialize the engine.

        Raises:
            MissingDependencyError: TensorRT or CUDA missing.
            ExportError: the plan was built by another TensorRT version or is corrupt.
        """
        trt, _ = require_tensorrt()
        self._trt_logger = _make_logger(trt)
        self._runtime = trt.Runtime(self._trt_logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise ExportError(
                f"TensorRT {trt.__version__} cannot load {plan_path} (built by another TensorRT "
                "version or GPU, or corrupt); rebuild it with `cosa export --trt`"
            )
        self._context = self._engine.create_execution_context()
        self._path = plan_path

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, H, W) float32 0-255 -> (logits (N, K, H, W) float32, mask (N, H, W) int32).

        Raises:
            ExportError: the shape is outside the engine's profile or execution failed.
        """
        import torch

        device = torch.device("cuda", 0)
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device)
        if not self._context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise ExportError(
                f"input shape {tuple(x.shape)} is outside the optimization profile of {self._path}"
            )
        self._context.set_tensor_address(INPUT_NAME, x.data_ptr())
        outputs = {}
        for name, dtype in ((LOGITS_NAME, torch.float32), (MASK_NAME, torch.int32)):
            shape = tuple(self._context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device=device)
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise ExportError(f"TensorRT execution of {self._path} failed; see the TensorRT log")
        stream.synchronize()
        return outputs[LOGITS_NAME].cpu().numpy(), outputs[MASK_NAME].cpu().numpy()


def _make_logger(trt: ModuleType) -> Any:
    """A `trt.ILogger` that forwards to Python logging and keeps the errors for messages."""

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            levels = trt.ILogger.Severity
            if severity in (levels.INTERNAL_ERROR, levels.ERROR):
                self.errors.append(msg)
                logger.error("TensorRT: %s", msg)
            elif severity == levels.WARNING:
                logger.warning("TensorRT: %s", msg)
            else:
                logger.debug("TensorRT: %s", msg)

    return _Logger()


def _attach_timing_cache(config: Any, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s is from another TensorRT/GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    elif data:
        logger.info("reusing timing cache %s", path)


def _nchw(shape: tuple[int, int, int]) -> tuple[int, int, int, int]:
    n, h, w = shape
    return (int(n), 3, int(h), int(w))


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or any buffer, e.g. `trt.IHostMemory`) to `path` via a temp file + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
