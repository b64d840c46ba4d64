"""Checked-in templates of the Triton model repository; `cosa.serving.triton_repo` fills them in.

config.pbtxt templates (`string.Template`, `${name}` placeholders, values from spec.json):
    segmentation.pbtxt        the segmentation model, with one of
    runtime_onnxruntime.pbtxt   platform onnxruntime_onnx (model.onnx)
    runtime_tensorrt.pbtxt      platform tensorrt_plan (model.plan)
    runtime_python.pbtxt        backend python (onnxruntime_model.py + model.onnx, CPU)
    warmup.pbtxt              model_warmup block (one zero image of the spec's opt shape)
    extras_python.pbtxt       parameters of the python variant
    extras_ort_tensorrt.pbtxt TensorRT execution accelerator for onnxruntime_onnx
    preprocess.pbtxt          ensemble step: encoded image bytes -> float32 images
    postprocess.pbtxt         ensemble step: int32 mask -> palette PNG bytes
    ensemble.pbtxt            bytes in -> PNG bytes + raw ids out

python-backend models (copied to `<model>/1/model.py`; they run inside Triton's stub with its own
numpy < 2 environment and are never imported by cosa):
    onnxruntime_model.py, preprocess_model.py, postprocess_model.py
preprocess_model.py decodes with `cosa/image_decode.py`, which the writer copies beside it as
`cosa_image_decode.py`: one decoder on every path.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["read_template"]


def read_template(name: str) -> str:
    """Returns the text of one template file of this package, e.g. "segmentation.pbtxt".

    Raises:
        FileNotFoundError: no such template (a packaging error, not a user error).
    """
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
