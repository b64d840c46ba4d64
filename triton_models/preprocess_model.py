"""Triton python-backend model: encoded image bytes -> float32 (N, 3, H, W) raw RGB 0-255.

The first step of the ensemble that lets thin clients send files. Runs inside Triton's
python-backend stub, not inside cosa: it imports only numpy (< 2), Pillow,
triton_python_backend_utils and `cosa_image_decode`, a copy of `cosa/image_decode.py` that
`cosa triton repo` writes beside this file (the stub puts this folder on `sys.path`). So an image
decodes here exactly as in `cosa segment`, training and evaluation: the policy of `cosa.images`
(EXIF orientation, alpha composited onto black, palette, grey, CMYK, 16-bit scaled, bombs
refused), and the same reasons when it cannot. All images of one request must have the same
displayed size, since they form one tensor.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from cosa_image_decode import DecodeError, decode_image

DECODE_ERROR = "cannot decode image {index} of the request: {reason}"
"""Error of a request with an undecodable image; the client maps it back to the file's name."""


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
        DecodeError: empty, not an image, truncated, unsupported mode, too many pixels.
    """
    rgb = decode_image(data)  # uint8 (H, W, 3)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)


def decode_request(encoded: np.ndarray) -> np.ndarray:
    """(N, 1) encoded images of one request -> float32 (N, 3, H, W).

    Raises:
        ValueError: an image does not decode (`DECODE_ERROR`), or the sizes differ.
    """
    images = []
    for index, item in enumerate(encoded.reshape(-1)):
        try:
            images.append(decode_rgb(bytes(item)))
        except DecodeError as exc:
            raise ValueError(DECODE_ERROR.format(index=index, reason=exc.reason)) from None
    sizes = sorted({image.shape[1:] for image in images})
    if len(sizes) > 1:
        raise ValueError(
            f"images of one request must share a size, got {sizes}; send one image per request"
        )
    return np.stack(images)


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
                batch = decode_request(encoded).astype(self.output_dtype, copy=False)
                tensor = pb_utils.Tensor(self.output_name, batch)
                responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
            except ValueError as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
            except Exception as exc:  # noqa: BLE001 - report anything else, keep serving
                error = pb_utils.TritonError(f"cannot decode image: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
        return responses
