"""Triton python-backend model: int32 class ids (N, H, W) -> palette PNG bytes (N, 1).

The ids also pass through unchanged as a second output, which is how the ensemble returns raw ids
(see ensemble.pbtxt); each output is only produced when requested.

The last step of the ensemble that lets thin clients send files. Runs inside Triton's
python-backend stub, not inside cosa: it imports only numpy (< 2), Pillow and
triton_python_backend_utils. Palette index i is class i; the palette comes from spec.json
through config.pbtxt (parameter "palette": flat r,g,b list).
"""

import io
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image


def _require_numpy_1() -> None:
    # The python backend of Triton 2.51 loads models READY under numpy 2 but returns every
    # output empty; refuse to load instead.
    if int(np.__version__.split(".")[0]) >= 2:
        raise pb_utils.TritonModelException(
            f"numpy {np.__version__} is on the python backend's path but it needs numpy < 2; "
            "run `cosa triton setup` and start the server with `cosa triton serve`"
        )


def encode_png(mask: np.ndarray, palette: list[int]) -> bytes:
    """Encodes int (H, W) class ids in [0, 255] as a palette PNG."""
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"class ids must lie in [0, 255], got [{mask.min()}, {mask.max()}]")
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class TritonPythonModel:
    """Encodes every mask of every request."""

    def initialize(self, args: dict) -> None:
        _require_numpy_1()
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.png_name, self.ids_name = (output["name"] for output in config["output"])
        self.palette = [int(v) for v in config["parameters"]["palette"]["string_value"].split(",")]

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            masks = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            requested = set(request.requested_output_names()) or {self.png_name, self.ids_name}
            tensors = []
            if self.png_name in requested:
                try:
                    encoded = [encode_png(mask, self.palette) for mask in masks]
                except ValueError as exc:
                    error = pb_utils.TritonError(str(exc))
                    responses.append(pb_utils.InferenceResponse(error=error))
                    continue
                pngs = np.array(encoded, dtype=np.object_).reshape(len(encoded), 1)
                tensors.append(pb_utils.Tensor(self.png_name, pngs))
            if self.ids_name in requested:
                tensors.append(pb_utils.Tensor(self.ids_name, masks))
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
