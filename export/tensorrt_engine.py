"""Running a serialized TensorRT engine (`model.plan`): the one engine session of the project.

Used by export verification (`tensorrt_build.EngineRunner`) and by the serving runner
(`cosa.serving.tensorrt_runner`), so it depends only on numpy, `cosa.errors` and `export.spec`;
`tensorrt` and torch are imported when an engine opens, so this module imports on any machine.

One import guard (`import_tensorrt`, TensorRT 10.x or 11.x) and one CUDA check (`cuda_device`).
Only the name-based API common to 10 and 11 is used: `Runtime.deserialize_cuda_engine`,
`get_tensor_name/dtype/shape`, `get_tensor_profile_shape`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`. torch owns the CUDA buffers and the stream (no pycuda or
cuda-python). Three facts of TensorRT execution are handled here once (DEPLOYMENT.md):
  * `set_tensor_address` takes a raw pointer, so the input is made C-contiguous on the device;
  * `execute_async_v3` on the legacy default stream (handle 0) makes TensorRT warn and synchronise
    on every call, so each engine has its own CUDA stream, on which the copies run too;
  * the engine is deserialised, and its memory allocated, on the CUDA device it runs on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from cosa.errors import ConfigError, EngineError, MissingDependencyError
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME

if TYPE_CHECKING:
    import torch

__all__ = [
    "SUPPORTED_MAJORS",
    "Engine",
    "cuda_device",
    "import_tensorrt",
    "make_logger",
    "tensorrt_major",
]

logger = logging.getLogger(__name__)

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = "install NVIDIA's `tensorrt` Python package on a machine with an NVIDIA GPU"


def import_tensorrt(purpose: str = "TensorRT", fallback: str = "") -> ModuleType:
    """The `tensorrt` module, version 10.x or 11.x.

    Args:
        purpose: what needs it, for the message ("--trt", "--backend tensorrt").
        fallback: what the user can do instead, appended to the message ("export without --trt").

    Raises:
        MissingDependencyError: not installed, or a major version below 10 (one line).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT 10.x or 11.x, which is not installed ({exc}); "
            f"{INSTALL_HINT}{_or(fallback)}"
        ) from exc
    major = tensorrt_major(trt)
    if major < SUPPORTED_MAJORS[0]:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT 10.x or 11.x, found {trt.__version__}; upgrade TensorRT"
            f"{_or(fallback)}"
        )
    if major > SUPPORTED_MAJORS[-1]:
        logger.warning("TensorRT %s is newer than 11.x; using it like 11.x", trt.__version__)
    return trt


def tensorrt_major(trt: ModuleType) -> int:
    """Major version of an imported `tensorrt` module (`"10.13.0.35"` -> 10)."""
    return int(str(trt.__version__).split(".")[0])


def cuda_device(index: int = 0, purpose: str = "TensorRT", fallback: str = "") -> torch.device:
    """The CUDA device `index`, checked to exist.

    Raises:
        MissingDependencyError: no CUDA GPU visible to torch.
        ConfigError: fewer than `index + 1` GPUs visible (the message says how many).
    """
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"{purpose} needs a CUDA GPU and driver; none is visible on this machine "
            f"(torch.cuda.is_available() is False){_or(fallback)}"
        )
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ConfigError(
            f"CUDA device {index} does not exist: {count} GPU(s) visible (0..{count - 1}); "
            "pick one of them or set CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def make_logger(trt: ModuleType) -> Any:
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


class Engine:
    """A deserialised `model.plan` on one CUDA device, with its own CUDA stream.

    Not thread-safe: one execution context, used by one thread at a time.
    """

    def __init__(
        self,
        plan: Path,
        *,
        device_index: int = 0,
        purpose: str = "TensorRT",
        fallback: str = "",
        built_with: str = "",
    ) -> None:
        """Deserialise the engine on CUDA device `device_index`.

        Args:
            plan: a plain serialized engine.
            device_index: the GPU to run on (its memory holds the engine and the buffers).
            purpose, fallback: wording of the missing-dependency messages (`import_tensorrt`).
            built_with: where the plan was built ("TensorRT 10.3 on A100"), for the message
                when it does not load.

        Raises:
            MissingDependencyError: TensorRT or a CUDA GPU is missing.
            ConfigError: no GPU `device_index`.
            EngineError: the plan does not deserialise (another TensorRT version or GPU, or
                corrupt) or lacks the deploy graph's tensors.
        """
        import torch

        self._torch = torch
        trt = import_tensorrt(purpose, fallback)
        self.device = cuda_device(device_index, purpose, fallback)
        self.device_index = device_index
        self.path = Path(plan)
        self._trt_logger = make_logger(trt)
        # The CUDA context TensorRT allocates the engine in is the current device's: set it, or
        # every engine lands on GPU 0 whatever device the buffers are on.
        with torch.cuda.device(device_index):
            runtime = trt.Runtime(self._trt_logger)
            self._engine: Any = runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                where = f" (built with {built_with})" if built_with else ""
                raise EngineError(
                    f"TensorRT {trt.__version__} cannot deserialize {self.path}{where}; engines "
                    "are tied to the TensorRT version and GPU, or the file is corrupt: rebuild it "
                    "on this machine with `cosa export --trt`"
                )
            self._context: Any = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(device_index)
        count = int(self._engine.num_io_tensors)
        self.names = [str(self._engine.get_tensor_name(i)) for i in range(count)]
        missing = [n for n in (INPUT_NAME, LOGITS_NAME, MASK_NAME) if n not in self.names]
        if missing:
            raise EngineError(
                f"{self.path} has tensors {self.names}; expected '{INPUT_NAME}', "
                f"'{LOGITS_NAME}', '{MASK_NAME}'; rebuild the engine from a cosa export"
            )
        self.dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in self.names}
        shapes = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self.profile: tuple[tuple[int, ...], ...] = tuple(
            tuple(int(d) for d in s) for s in shapes
        )  # (min, opt, max) of (N, 3, H, W), optimization profile 0

    @property
    def stream_handle(self) -> int:
        """The raw `cudaStream_t` the engine runs on (never 0, the legacy default stream)."""
        return int(self._stream.cuda_stream)

    def run(
        self, images: np.ndarray, outputs: Sequence[str] = (LOGITS_NAME, MASK_NAME)
    ) -> dict[str, np.ndarray]:
        """Run one batch.

        Args:
            images: (N, 3, H, W) 0-255, any strides and float dtype; copied to the device
                C-contiguous in the engine's input dtype.
            outputs: names to return (all are computed).

        Returns:
            name -> host array in the engine's dtype ("logits" (N, K, H, W), "mask" (N, H, W)).

        Raises:
            EngineError: the shape is outside the engine's profile, or execution failed.
        """
        if self._context is None:
            raise EngineError(f"the TensorRT engine of {self.path} is closed")
        torch = self._torch
        ctx = self._context
        shape = tuple(int(d) for d in images.shape)
        with self._on_device():
            buffers = {
                INPUT_NAME: torch.from_numpy(np.asarray(images))
                .to(self.device, self.dtypes[INPUT_NAME])
                .contiguous()  # a raw pointer is handed over: strides would be ignored
            }
            if not ctx.set_input_shape(INPUT_NAME, shape):
                raise EngineError(
                    f"input shape {shape} is outside the optimization profile of {self.path} "
                    f"(min {self.profile[0]}, max {self.profile[-1]})"
                )
            for name in self.names:
                if name != INPUT_NAME:
                    out_shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                    buffers[name] = torch.empty(
                        out_shape, dtype=self.dtypes[name], device=self.device
                    )
            for name, tensor in buffers.items():
                ctx.set_tensor_address(name, tensor.data_ptr())
            if not ctx.execute_async_v3(self.stream_handle):
                raise EngineError(
                    f"TensorRT failed to run {self.path} on a batch of shape {shape}; see the "
                    "TensorRT log"
                )
            # Copies to the host are queued on the engine's stream after it and wait for it.
            result = {name: buffers[name].cpu().numpy() for name in outputs}
            self._stream.synchronize()
        return result

    def close(self) -> None:
        """Release the context and the engine. Idempotent."""
        self._context = None
        self._engine = None

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Current device and stream = the engine's, for the copies, buffers and execution."""
        torch = self._torch
        with torch.cuda.device(self.device_index), torch.cuda.stream(self._stream):
            yield


def _torch_dtype(trt: ModuleType, trt_dtype: Any) -> torch.dtype:
    import torch

    np_dtype = np.dtype(trt.nptype(trt_dtype))
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


def _or(fallback: str) -> str:
    return f", or {fallback}" if fallback else ""
