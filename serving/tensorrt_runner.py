"""`TensorRTRunner`: a serialized TensorRT engine (`model.plan`) behind the `Runner` interface.

The engine session itself (import guard, CUDA check, device, stream, buffers) is
`cosa.export.tensorrt_engine.Engine`, shared with export verification; this module adds what
serving needs: the export folder's spec, input checks and the `Runner` contract. `tensorrt` is
imported when a runner opens, so this module imports on machines without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cosa.errors import InputError
from cosa.export.layout import Runtime, open_artifact
from cosa.export.spec import LOGITS_NAME, MASK_NAME, ModelSpec
from cosa.export.tensorrt_engine import Engine
from cosa.serving.runner import ClosingRunner, check_images

__all__ = ["TensorRTRunner", "check_profile"]

_PURPOSE = "--backend tensorrt"
_FALLBACK = "use --backend onnxruntime"


class TensorRTRunner(ClosingRunner):
    """A serialized TensorRT engine (`model.plan`) on a CUDA GPU.

    Works with TensorRT 10 and 11. Inputs must lie inside the engine's optimization profile 0.
    """

    def __init__(
        self,
        model: Path,
        *,
        device_index: int = 0,
        return_logits: bool = False,
    ) -> None:
        """Deserialize the engine on GPU `device_index`.

        Args:
            model: an export folder (its engine is chosen by `cosa.export.layout`), or a `.plan`
                file with spec.json beside it.
            device_index: CUDA device the engine is loaded on and runs on.
            return_logits: also return "logits".

        Raises:
            MissingDependencyError: TensorRT or a CUDA GPU is missing.
            ConfigError, ExportError: see `cosa.export.layout.open_artifact`; no GPU
                `device_index`.
            EngineError: (a `ServingError`) the engine does not deserialize (other TensorRT
                version or GPU) or lacks the deploy graph's tensors.
        """
        self.artifact, self._spec = open_artifact(Path(model), Runtime.TENSORRT)
        self.path = self.artifact.path
        built = f"TensorRT {self._spec.tensorrt_version or '?'} on {self._spec.gpu_name or '?'}"
        self._engine = Engine(
            self.path,
            device_index=device_index,
            purpose=_PURPOSE,
            fallback=_FALLBACK,
            built_with=built,
        )
        self._profile = self._engine.profile
        self._outputs = (MASK_NAME, LOGITS_NAME) if return_logits else (MASK_NAME,)

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
            EngineError: (a `ServingError`) TensorRT failed to execute, or the runner is closed.
        """
        check_images(images)
        check_profile(images.shape, self._profile)
        out = self._engine.run(images, self._outputs)
        result = {MASK_NAME: out[MASK_NAME].astype(np.int32, copy=False)}
        if LOGITS_NAME in out:
            result[LOGITS_NAME] = out[LOGITS_NAME].astype(np.float32, copy=False)
        return result

    def close(self) -> None:
        self._engine.close()


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
