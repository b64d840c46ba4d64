"""Names shared by the Triton repository writer and the Triton client, declared once.

The writer (`triton_repo`) puts them into config.pbtxt files; the client (`triton_client`) sends
requests to them. Both import them from here, so neither imports the other. Standard library only.
"""

from __future__ import annotations

from typing import NamedTuple

from cosa.errors import ServingError

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ENSEMBLE_INPUT_NAME",
    "PNG_OUTPUT_NAME",
    "ensemble_model_name",
    "postprocess_model_name",
    "preprocess_model_name",
    "triton_dtype",
]

DEFAULT_MODEL_NAME = "cosa_seg"
"""Name of the segmentation model in a repository written by `cosa triton repo`."""

ENSEMBLE_INPUT_NAME = "image_bytes"
"""Ensemble input: (N, 1) encoded JPEG/PNG/... bytes."""

PNG_OUTPUT_NAME = "mask_png"
"""Ensemble output: (N, 1) palette PNG bytes."""

# numpy dtype name (spec.json) -> Triton datatype (config.pbtxt uses "TYPE_" + this).
_TRITON_DTYPES = {
    "float32": "FP32",
    "float16": "FP16",
    "int32": "INT32",
    "int64": "INT64",
    "uint8": "UINT8",
    "bool": "BOOL",
}


def ensemble_model_name(model_name: str) -> str:
    """Name of the bytes-in ensemble that belongs to segmentation model `model_name`."""
    return f"{model_name}_ensemble"


def preprocess_model_name(model_name: str) -> str:
    """Name of the ensemble's decoding step (bytes -> float32 images)."""
    return f"{model_name}_preprocess"


def postprocess_model_name(model_name: str) -> str:
    """Name of the ensemble's encoding step (mask -> palette PNG bytes)."""
    return f"{model_name}_postprocess"


def triton_dtype(numpy_dtype: str) -> str:
    """Triton's datatype name ("FP32") for a numpy dtype name ("float32") from spec.json.

    Raises:
        ServingError: a dtype Triton configs cannot express.
    """
    try:
        return _TRITON_DTYPES[numpy_dtype]
    except KeyError:
        raise ServingError(
            f"dtype {numpy_dtype!r} in spec.json has no Triton equivalent "
            f"(supported: {', '.join(_TRITON_DTYPES)}); re-export the model"
        ) from None


class ServerPorts(NamedTuple):
    """Ports of one Triton server: Triton's own defaults unless told otherwise."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002
