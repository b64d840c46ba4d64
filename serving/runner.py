"""The `Runner` interface every backend implements, and what the local runners share.

Every runner takes the deploy graph's input, `images` float32 (N, 3, H, W) raw RGB 0-255, and
returns `{"mask": int32 (N, H, W)}` plus `"logits"` float32 (N, K, H, W) when asked. The local
runners live in `runners` (onnxruntime, torch) and `tensorrt_runner`; the Triton client in
`triton_client`; `runners.open_runner` opens any of them. This module imports none of them, so
they can all import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np

from cosa.errors import InputError
from cosa.export.spec import ModelSpec

__all__ = ["ClosingRunner", "Runner", "check_images", "images_to_batch"]


@runtime_checkable
class Runner(Protocol):
    """What the batch and stream pipelines need from a backend (the Triton client included).

    A runner may also have `parallel_calls: int`, the number of concurrent `infer` calls it
    serves better than one call at a time (`OnnxRuntimeRunner` on CPU); the segment pipeline
    keeps that many calls running. Without it, calls are made one at a time.
    """

    @property
    def spec(self) -> ModelSpec:
        """Class names, palette and tensor names of the model."""
        ...

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Segment one batch.

        Args:
            images: float32 (N, 3, H, W), raw RGB 0-255.

        Returns:
            {"mask": int32 (N, H, W)} and, if the runner was asked for them, "logits" float32
            (N, K, H, W).
        """
        ...

    def close(self) -> None:
        """Release sessions, engines, connections. Idempotent."""
        ...


def images_to_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """Stack same-size uint8 RGB images (H, W, 3) into the deploy input float32 (N, 3, H, W), 0-255.

    Raises:
        ValueError: empty sequence or images of different sizes.
    """
    if not images:
        raise ValueError("images_to_batch needs at least one image")
    stacked = np.stack(images)  # (N, H, W, 3); raises on size mismatch
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2), dtype=np.float32)


def check_images(images: np.ndarray, one: bool = False) -> None:
    """Validate a deploy-graph input batch (raw RGB 0-255).

    Args:
        one: the batch must hold exactly one image (a stream frame).

    Raises:
        InputError: not float32 (N, 3, H, W) with N, H, W >= 1 (N = 1 when `one`).
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.float32:
        got = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
        raise InputError(f"images must be a float32 numpy array (raw RGB 0-255), got {got}")
    if (
        images.ndim != 4
        or images.shape[1] != 3
        or min(images.shape) < 1
        or (one and len(images) != 1)
    ):
        want = "(1, 3, H, W)" if one else "(N, 3, H, W) with N, H, W >= 1"
        raise InputError(f"images must be {want} RGB, got shape {images.shape}")


class ClosingRunner:
    """Base of the runners (local ones and the Triton client): `with runner:` closes it on the
    way out."""

    def close(self) -> None:  # overridden
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
