"""Triton python-backend model: the CoSA deploy graph (model.onnx) on onnxruntime's CPU provider.

For Triton servers without the onnxruntime backend, such as the one in the nvidia-pytriton wheel.
Runs inside Triton's python-backend stub, not inside cosa: it imports only numpy (< 2),
onnxruntime and triton_python_backend_utils. Names and dtypes come from config.pbtxt, which
`cosa triton repo` fills from spec.json.

Tensors: input float32 (N, 3, H, W) raw RGB 0-255; outputs logits float32 (N, K, H, W) and
mask int32 (N, H, W).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _require_numpy_1() -> None:
    # The python backend of Triton 2.51 loads models READY under numpy 2 but returns every
    # output empty; refuse to load instead of serving empty masks.
    if int(np.__version__.split(".")[0]) >= 2:
        raise pb_utils.TritonModelException(
            f"numpy {np.__version__} is on the python backend's path but it needs numpy < 2; "
            "run `cosa triton setup` and start the server with `cosa triton serve`"
        )


class TritonPythonModel:
    """One onnxruntime session per model instance; requests of equal (H, W) run as one batch."""

    def initialize(self, args: dict) -> None:
        _require_numpy_1()
        import onnxruntime as ort  # inside: a missing onnxruntime fails this model only

        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        path = os.path.join(args["model_repository"], args["model_version"], params["onnx_file"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params["intra_op_num_threads"])
        # No busy-waiting between operators: the server's own threads (gRPC, the stub's shared
        # memory hand-offs) and other instances need those cores (as in cosa.serving.runners).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            path, sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]

    def execute(self, requests: list) -> list:
        """Runs the requests the dynamic batcher grouped, one onnxruntime call per (H, W)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        inputs = []
        for index, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            inputs.append(images)
            groups.setdefault(images.shape[1:], []).append(index)

        responses: list = [None] * len(requests)
        for members in groups.values():
            wanted = [set(requests[i].requested_output_names()) for i in members]
            # Only compute what someone asked for: logits are K times larger than the mask.
            names = [name for name in self.output_names if any(name in w for w in wanted)]
            names = names or self.output_names
            batch = (
                np.concatenate([inputs[i] for i in members])
                if len(members) > 1
                else inputs[members[0]]
            )
            try:
                outputs = self.session.run(names, {self.input_name: batch})
            except Exception as exc:  # noqa: BLE001 - one bad batch must not take the model down
                error = pb_utils.TritonError(
                    f"onnxruntime failed on a batch of {batch.shape}: {exc}"
                )
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            start = 0
            for i, requested in zip(members, wanted, strict=True):
                stop = start + inputs[i].shape[0]
                tensors = [
                    # The view drops onnxruntime's dtype subclass (seen with int64 outputs), which
                    # pb_utils.Tensor would otherwise reject.
                    pb_utils.Tensor(
                        name, np.ascontiguousarray(out[start:stop]).view(np.dtype(out.dtype.str))
                    )
                    for name, out in zip(names, outputs, strict=True)
                    if name in requested or not requested
                ]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = stop
        return responses
