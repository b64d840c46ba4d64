"""`TensorRTRunner`: a serialized TensorRT engine (`model.plan`) behind the `Runner` interface.

Written against TensorRT's name-based tensor API of 10.x and 11.x; `tensorrt` is imported when a
runner opens, so this module imports on machines without it. torch owns the CUDA buffers and
stream. The parts that need no GPU (import errors, profile checks, tensor names, dtype mapping)
are tested with a fake `tensorrt` module; running an engine needs a GPU.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from cosa.errors import ConfigError, InputError, MissingDependencyError, ServingError
from cosa.export.layout import Runtime, open_artifact
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, ModelSpec
from cosa.serving.runners import LocalRunner, check_images

if TYPE_CHECKING:
    import torch

__all__ = ["TensorRTRunner", "check_profile"]


def _import_tensorrt() -> ModuleType:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise MissingDependencyError(
            "TensorRT is not installed (python package 'tensorrt' from NVIDIA, or the TensorRT "
            "container); on this machine use --backend onnxruntime"
        ) from exc


def _cuda_device(index: int) -> torch.device:
    """The CUDA device TensorRT runs on; torch manages its memory and stream."""
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "TensorRT needs a CUDA GPU and none is visible to torch; use --backend onnxruntime"
        )
    if index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"CUDA device {index} does not exist ({count} visible)")
    return torch.device("cuda", index)


def _stream_handle(device: torch.device) -> int:
    """Raw handle of the current CUDA stream (0 off CUDA, i.e. with the test doubles)."""
    import torch

    return int(torch.cuda.current_stream(device).cuda_stream) if device.type == "cuda" else 0


class TensorRTRunner(LocalRunner):
    """A serialized TensorRT engine (`model.plan`) on a CUDA GPU; torch owns buffers and stream.

    Works with TensorRT 10 and 11 (name-based tensor API: `set_input_shape`, `set_tensor_address`,
    `execute_async_v3`). Inputs must lie inside the engine's optimization profile 0.
    """

    def __init__(self, model: Path, *, device_index: int = 0, return_logits: bool = False) -> None:
        """Deserialize the engine.

        Args:
            model: export folder whose spec names a `.plan`, or the `.plan` file itself.
            device_index: CUDA device.
            return_logits: also return "logits".

        Raises:
            MissingDependencyError: TensorRT or a CUDA GPU is missing.
            ConfigError, ExportError: see `cosa.export.layout.open_artifact`.
            ServingError: the engine does not deserialize (other TensorRT version or GPU) or its
                tensor names disagree with spec.json.
        """
        import torch

        self._torch = torch
        self.artifact, self._spec = open_artifact(Path(model), Runtime.TENSORRT)
        self.path = self.artifact.path
        trt = _import_tensorrt()
        self._device = _cuda_device(device_index)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._trt_logger)
        self._engine: Any = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ServingError(
                f"TensorRT {trt.__version__} cannot deserialize {self.path} (built with "
                f"TensorRT {self._spec.tensorrt_version or '?'} on {self._spec.gpu_name or '?'}); "
                "engines are tied to the TensorRT version and GPU: rebuild it on this machine "
                "with cosa export --trt"
            )
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._outputs = [MASK_NAME, LOGITS_NAME] if return_logits else [MASK_NAME]
        if INPUT_NAME not in names or any(n not in names for n in (MASK_NAME, LOGITS_NAME)):
            raise ServingError(
                f"{self.path} has tensors {names}; expected '{INPUT_NAME}', '{LOGITS_NAME}', "
                f"'{MASK_NAME}'; rebuild the engine from a cosa export"
            )
        self._io_names = names
        self._torch_dtypes = {
            name: _torch_dtype(trt, self._engine.get_tensor_dtype(name)) for name in names
        }
        shapes = self._engine.get_tensor_profile_shape(INPUT_NAME, 0)
        self._profile = tuple(tuple(int(d) for d in s) for s in shapes)  # (min, opt, max) NCHW
        self._context: Any = self._engine.create_execution_context()

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def profile(self) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) input shapes (N, 3, H, W) of optimization profile 0."""
        return self._profile

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See `Runner.infer`.

        Raises:
            InputError: images not float32 (N, 3, H, W), or outside the engine's shape profile.
            ServingError: TensorRT failed to execute.
        """
        check_images(images)
        check_profile(images.shape, self._profile)
        torch = self._torch
        ctx = self._context
        buffers = {
            INPUT_NAME: torch.from_numpy(images).to(self._device, self._torch_dtypes[INPUT_NAME])
        }
        ctx.set_input_shape(INPUT_NAME, tuple(images.shape))
        for name in self._io_names:
            if name != INPUT_NAME:
                shape = tuple(ctx.get_tensor_shape(name))
                dtype = self._torch_dtypes[name]
                buffers[name] = torch.empty(shape, dtype=dtype, device=self._device)
        for name, tensor in buffers.items():
            ctx.set_tensor_address(name, tensor.data_ptr())
        if not ctx.execute_async_v3(_stream_handle(self._device)):
            raise ServingError(
                f"TensorRT failed to run {self.path} on a batch of shape {images.shape}"
            )
        # .cpu() is queued on the same (current) stream after the engine, then waits for it.
        result = {MASK_NAME: buffers[MASK_NAME].cpu().numpy().astype(np.int32, copy=False)}
        if LOGITS_NAME in self._outputs:
            result[LOGITS_NAME] = buffers[LOGITS_NAME].float().cpu().numpy()
        return result

    def close(self) -> None:
        self._context = None
        self._engine = None


def check_profile(shape: tuple[int, ...], profile: tuple[tuple[int, ...], ...]) -> None:
    """Refuse an input shape outside a TensorRT profile (min, opt, max), naming the limits.

    Raises:
        InputError: some dimension is below min or above max.
    """
    lo, _, hi = profile
    if all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        return
    raise InputError(
        f"input of shape {tuple(shape)} is outside the TensorRT engine's profile (min {tuple(lo)}, "
        f"max {tuple(hi)} as N, 3, H, W); rebuild the engine with a larger profile or use "
        "--backend onnxruntime"
    )


def _torch_dtype(trt: ModuleType, trt_dtype: Any) -> torch.dtype:
    import torch

    np_dtype = np.dtype(trt.nptype(trt_dtype))
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype
