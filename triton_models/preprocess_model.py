"""Triton python-backend model: encoded image bytes -> float32 (N, 3, H, W) raw RGB 0-255.

The first step of the ensemble that lets thin clients send files. Runs inside Triton's
python-backend stub, not inside cosa: it imports only numpy (< 2), Pillow and
triton_python_backend_utils.

Decoding: EXIF orientation is applied (the mask matches the image as displayed); grayscale,
palette, RGBA (alpha dropped), CMYK and 16-bit images become 8-bit RGB. All images of one request
must have the same displayed size, since they form one tensor.
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image, ImageOps


def _require_numpy_1() -> None:
    # The python backend of Triton 2.51 loads models READY under numpy 2 but returns every
    # output empty; refuse to load instead.
    if int(np.__version__.split(".")[0]) >= 2:
        raise pb_utils.TritonModelException(
            f"numpy {np.__version__} is on the python backend's path but it needs numpy < 2; "
            "run `cosa triton setup` and start the server with `cosa triton serve`"
        )


def decode_rgb(data: bytes) -> np.ndarray:
    """Decodes one encoded image to float32 (3, H, W) in [0, 255] at its displayed size.

    Raises:
        ValueError: empty data.
        OSError: not an image Pillow can read (truncated, unknown format).
    """
    if not data:
        raise ValueError("empty image bytes")
    with Image.open(io.BytesIO(data)) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit: keep the top 8 bits rather than clipping everything above 255 to white.
            gray = (np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8)
            image = Image.fromarray(gray, mode="L")
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


class TritonPythonModel:
    """Decodes each request's images; a bad image fails its own request only."""

    def initialize(self, args: dict) -> None:
        _require_numpy_1()
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.output_dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            try:
                images = [decode_rgb(bytes(item)) for item in encoded.reshape(-1)]
                sizes = sorted({image.shape[1:] for image in images})
                if len(sizes) > 1:
                    raise ValueError(
                        f"images of one request must share a size, got {sizes}; "
                        "send one image per request"
                    )
                batch = np.stack(images).astype(self.output_dtype, copy=False)
                tensor = pb_utils.Tensor(self.output_name, batch)
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            except Exception as exc:  # noqa: BLE001 - Pillow raises many types; report, keep serving
                error = pb_utils.TritonError(f"cannot decode image: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
