"""Local runners of the deploy graph (onnxruntime, torch; TensorRT in `tensorrt_runner`) and
`open_runner`, which also opens the Triton client, so that `cosa segment` and `cosa stream` see one
interface.

Every runner takes the deploy graph's input, `images` float32 (N, 3, H, W) raw RGB 0-255 (any H, W
the artifact accepts), and returns `{"mask": int32 (N, H, W)}` plus `"logits"` float32 (N, K, H, W)
when built with `return_logits=True`. Runners are used from one thread at a time.

Heavy or optional runtimes (onnxruntime, torch, tensorrt, tritonclient) are imported by the runner
that needs them, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cosa.choices import Backend, WireProtocol, parse_choice
from cosa.errors import ConfigError, MissingDependencyError, ServingError
from cosa.export.layout import ArtifactChoice, Machine, Runtime, open_artifact
from cosa.export.spec import INPUT_NAME, LOGITS_NAME, MASK_NAME, SPEC_FILENAME, ModelSpec, read_spec
from cosa.images import voc_palette
from cosa.serving.runner import ClosingRunner, Runner, check_images, images_to_batch
from cosa.serving.triton_names import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_TRITON_MODEL",
    "ClosingRunner",
    "OnnxRuntimeRunner",
    "Runner",
    "TorchRunner",
    "check_images",
    "default_spec",
    "describe_runner",
    "images_to_batch",
    "logits_predictor",
    "open_runner",
]

log = logging.getLogger(__name__)

DEFAULT_TRITON_MODEL = DEFAULT_MODEL_NAME  # `cosa triton repo`'s default model name


# ------------------------------------------------------------------------------------- onnxruntime


class OnnxRuntimeRunner(ClosingRunner):
    """The ONNX deploy graph in onnxruntime (CUDA provider when available, else CPU)."""

    def __init__(
        self,
        model: Path,
        *,
        precision: str | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        parallel_calls: int = 1,
        allow_spinning: bool = False,
        return_logits: bool = False,
        fused: bool = True,
    ) -> None:
        """Open a session.

        Args:
            model: export folder (spec.json + model.onnx) or a .onnx file with spec.json beside it.
            precision: precision to run, from a folder (`cosa.export.layout.choose_artifact`
                picks the file for it on this device); default the export's.
            providers: onnxruntime execution providers in priority order; default CUDA then CPU
                when the CUDA provider is installed, else CPU.
            intra_op_threads: threads inside one operator; 0: one per physical core
                (onnxruntime's default) when `parallel_calls` is 1, else the CPUs divided
                among the parallel calls.
            parallel_calls: concurrent `infer` calls this runner is meant to serve (its
                `parallel_calls` attribute; the segment pipeline keeps that many running). On
                CPU, two calls of half the threads each beat one call of all threads (see
                `default_parallel_calls`). With the CUDA provider it is 1 whatever is asked (the
                calls would share one stream).
            allow_spinning: let idle onnxruntime threads busy-wait for the next operator. Off by
                default: the segment pipeline's decoder and encoder threads need those cores
                (on 2 shared cores, spinning halved both model-only and end-to-end images/s of
                the tiny test model).
            return_logits: also return "logits" (costs a (N, K, H, W) copy per batch).
            fused: when `model` is a folder and FP32 is run, allow its onnxruntime-fused
                graph (spec.json role "fp32_ort", model.ort.onnx) if the export wrote one: the
                same network verified against PyTorch, faster in onnxruntime
                (benchmarks/results/inference.md). A file path runs as given.

        Raises:
            ConfigError, ExportError: see `cosa.export.layout.open_artifact`; unknown
                provider.
            ServingError: the file is not a loadable ONNX model or its tensor names disagree with
                spec.json.
        """
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        available = ort.get_available_providers()
        if providers is None:
            preferred = ("CUDAExecutionProvider", "CPUExecutionProvider")
            providers = [p for p in preferred if p in available]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ConfigError(
                f"onnxruntime providers {unknown} are not installed; available: {available}"
            )
        # The file depends on where it runs (INT8: the CPU file on a CPU, Q/DQ on a GPU).
        device = "cuda" if list(providers)[:1] == ["CUDAExecutionProvider"] else "cpu"
        self.artifact: ArtifactChoice
        self.artifact, self._spec = open_artifact(
            Path(model), Runtime.ONNXRUNTIME, precision, Machine(device), fused=fused
        )
        self.path = self.artifact.path
        if self.artifact.warning:
            log.warning("%s", self.artifact.warning)
        if parallel_calls < 1:
            raise ConfigError(f"parallel_calls must be at least 1, got {parallel_calls}")
        if parallel_calls > 1 and intra_op_threads == 0:
            intra_op_threads = max(1, (os.cpu_count() or 1) // parallel_calls)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if allow_spinning else "0"
        )
        self._errors: tuple[type[Exception], ...] = (
            ort_state.Fail,
            ort_state.InvalidArgument,
            ort_state.InvalidGraph,
            ort_state.InvalidProtobuf,
            ort_state.NoSuchFile,
            ort_state.NotImplemented,
            ort_state.RuntimeException,
            ort_state.EPFail,
        )
        try:
            self._session: Any = ort.InferenceSession(
                str(self.path), sess_options=options, providers=list(providers)
            )
        except self._errors as exc:
            raise ServingError(
                f"onnxruntime cannot load {self.path}: {str(exc).splitlines()[0]}; "
                "re-export the model"
            ) from exc
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        self._outputs = [MASK_NAME, LOGITS_NAME] if return_logits else [MASK_NAME]
        if inputs != [INPUT_NAME] or any(name not in outputs for name in self._outputs):
            raise ServingError(
                f"{self.path} has inputs {inputs} and outputs {outputs}; the deploy graph has "
                f"input '{INPUT_NAME}' and outputs '{LOGITS_NAME}', '{MASK_NAME}'; re-export "
                "with cosa export"
            )
        on_cuda = self._session.get_providers()[0] == "CUDAExecutionProvider"
        self.parallel_calls = 1 if on_cuda else parallel_calls
        log.info(
            "onnxruntime %s on %s, %d parallel call(s)",
            self.path,
            self._session.get_providers(),
            self.parallel_calls,
        )

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses."""
        return list(self._session.get_providers())

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See `Runner.infer`.

        Raises:
            InputError: images not float32 (N, 3, H, W).
            ServingError: onnxruntime failed on this input.
        """
        check_images(images)
        try:
            values = self._session.run(self._outputs, {INPUT_NAME: images})
        except self._errors as exc:
            raise ServingError(
                f"onnxruntime failed on a batch of shape {images.shape}: {str(exc).splitlines()[0]}"
            ) from exc
        result = dict(zip(self._outputs, values, strict=True))
        result[MASK_NAME] = result[MASK_NAME].astype(np.int32, copy=False)
        return result

    def close(self) -> None:
        self._session = None


# ------------------------------------------------------------------------------------------- torch


class TorchRunner(ClosingRunner):
    """The deploy network in PyTorch (a checkpoint, or any module with the deploy contract)."""

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ModelSpec,
        *,
        device: str | None = None,
        return_logits: bool = False,
    ) -> None:
        """Wrap a deploy module.

        Args:
            module: maps float32 (N, 3, H, W) 0-255 to (logits (N, K, H, W), mask (N, H, W)).
            spec: its class names and palette.
            device: torch device; default "cuda" when available, else "cpu".
            return_logits: also return "logits".
        """
        import torch

        self._torch = torch
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._module: Any = module.eval().to(self._device)
        self._spec = spec
        self._return_logits = return_logits

    @classmethod
    def from_checkpoint(
        cls, path: Path, *, device: str | None = None, return_logits: bool = False
    ) -> TorchRunner:
        """The teacher's deploy network of a `cosa train` checkpoint, its BatchNorms folded into
        its convolutions (`cosa.model.folding`; the same masks, fewer passes over memory).

        Raises:
            CheckpointError: missing, corrupt or incompatible checkpoint.
        """
        from cosa.checkpoint import load_deploy_model
        from cosa.model.folding import FoldedNetwork

        module, ckpt = load_deploy_model(Path(path))
        module.net = FoldedNetwork(module.net.eval()).refreshed()
        spec = ModelSpec(
            class_names=tuple(ckpt.class_names),
            palette=tuple((int(r), int(g), int(b)) for r, g, b in ckpt.palette),
            precision="fp32",
            artifact=Path(path).name,
            source_checkpoint=str(path),
            backbone=ckpt.config.model.backbone,
        )
        return cls(module, spec, device=device, return_logits=return_logits)

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def device(self) -> torch.device:
        return self._device

    def infer(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """See `Runner.infer`.

        Raises:
            InputError: images not float32 (N, 3, H, W).
        """
        check_images(images)
        torch = self._torch
        with torch.inference_mode():
            logits, mask = self._module(torch.from_numpy(images).to(self._device))
        result = {MASK_NAME: mask.to(torch.int32).cpu().numpy()}
        if self._return_logits:
            result[LOGITS_NAME] = logits.float().cpu().numpy()
        return result

    def close(self) -> None:
        self._module = None


# ----------------------------------------------------------------------------------------- factory


def open_runner(
    model: Path | None,
    backend: str = "auto",
    url: str | None = None,
    protocol: str = "grpc",
    *,
    precision: str | None = None,
    triton_model: str = DEFAULT_TRITON_MODEL,
    threads: int = 0,
    parallel_calls: int = 1,
    return_logits: bool = False,
) -> Runner:
    """Open the runner `cosa segment` / `cosa stream` use.

    Args:
        model: export folder, .onnx/.plan file, or checkpoint .pt; with backend "triton" optional
            (an export folder or spec.json, for class names and palette; else the client asks the
            server).
        backend: a `cosa.choices.Backend`. "auto": .pt -> torch, .plan (or a folder whose spec
            names one) -> tensorrt, otherwise onnxruntime.
        url: Triton "HOST:PORT" (backend "triton" only).
        protocol: "grpc" or "http" (backend "triton" only).
        precision: artifact precision inside an export folder (onnxruntime only).
        triton_model: model name in the Triton repository.
        threads: onnxruntime intra-op threads (0: onnxruntime's default).
        parallel_calls: concurrent calls an onnxruntime runner serves (see `OnnxRuntimeRunner`;
            `default_parallel_calls()` for throughput); other backends ignore it.
        return_logits: runners also return "logits" (local backends).

    Returns:
        An open `Runner`; the caller closes it.

    Raises:
        ConfigError: unknown backend or protocol (the message lists the choices), missing --model
            or --url, a model of the wrong kind for the backend, options that do not apply.
        CheckpointError, ExportError: unreadable checkpoint or spec.json.
        MissingDependencyError: TensorRT, CUDA or tritonclient missing.
        ServingError: the artifact does not load, or the Triton server is not reachable / ready.
    """
    backend = parse_choice(Backend, backend, "backend").value
    if backend != "triton" and url is not None:
        raise ConfigError(f"--url is for --backend triton; backend {backend!r} runs locally")
    if backend == "triton":
        return _open_triton(model, url, protocol, triton_model)
    if model is None:
        raise ConfigError(
            f"backend {backend!r} needs --model: an export folder (spec.json + model.onnx) or a "
            "checkpoint .pt written by `cosa train`"
        )
    model = Path(model)
    if not model.exists():
        raise ConfigError(
            f"model {model} does not exist; pass an export folder or a checkpoint .pt"
        )
    if backend == "auto":
        backend = _guess_backend(model)
    if precision is not None and backend != "onnxruntime":
        raise ConfigError(f"--precision selects an ONNX file; backend {backend!r} does not use it")
    if backend == "torch":
        if model.is_dir() or model.suffix.lower() != ".pt":
            raise ConfigError(
                f"backend torch runs a checkpoint .pt; {model} is not one (an export folder runs "
                "with --backend onnxruntime or tensorrt)"
            )
        return TorchRunner.from_checkpoint(model, return_logits=return_logits)
    if backend == "tensorrt":
        from cosa.serving.tensorrt_runner import TensorRTRunner  # lazy: imports torch

        return TensorRTRunner(model, return_logits=return_logits)
    if model.is_file() and model.suffix.lower() == ".pt":
        raise ConfigError(
            f"{model} is a checkpoint; run it with --backend torch, or export it first "
            "(cosa export CKPT --out DIR) and pass DIR"
        )
    return OnnxRuntimeRunner(
        model,
        precision=precision,
        intra_op_threads=threads,
        parallel_calls=parallel_calls,
        return_logits=return_logits,
    )


def logits_predictor(runner: Runner) -> Callable[[np.ndarray], np.ndarray]:
    """`runner` as an evaluation predictor: one uint8 image (H, W, 3) -> float32 logits
    (K, H, W). The runner must have been opened with `return_logits=True`."""

    def predict(image: np.ndarray) -> np.ndarray:
        return runner.infer(images_to_batch([image]))[LOGITS_NAME][0]

    return predict


def describe_runner(runner: Runner) -> dict[str, Any]:
    """What a runner runs, for `--json` reports: `ArtifactChoice.to_json()` for a file of an
    export folder; the checkpoint for torch; the server, model and protocol for Triton."""
    artifact: ArtifactChoice | None = getattr(runner, "artifact", None)
    if artifact is not None:
        return artifact.to_json()
    if isinstance(runner, TorchRunner):
        return {
            "file": runner.spec.source_checkpoint,
            "role": "checkpoint",
            "precision": "fp32",
            "runtime": "torch",
            "device": str(runner.device),
        }
    url = getattr(runner, "url", None)
    if url is not None:
        return {
            "runtime": "triton",
            "url": url,
            "protocol": str(getattr(runner, "protocol", "")),
            "model": getattr(runner, "model_name", None),
            "file": None,  # the server's: `cosa triton repo --json` reports it
        }
    return {"runtime": type(runner).__name__}


def default_parallel_calls() -> int:
    """Concurrent calls for throughput on this machine: 2 with two CPUs or more, else 1.

    On 2 CPUs two single-thread calls ran the model faster than one two-thread call (most at
    batch 1: no operator waits for its slowest thread; benchmarks/results/serving.md) and made
    `cosa segment` faster end to end (benchmarks/results/segment_ab_parallel.md).
    """
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _guess_backend(model: Path) -> str:
    if model.is_file():
        return {".pt": "torch", ".plan": "tensorrt"}.get(model.suffix.lower(), "onnxruntime")
    if (model / SPEC_FILENAME).is_file() and read_spec(model).artifact.endswith(".plan"):
        return "tensorrt"
    return "onnxruntime"


def _open_triton(model: Path | None, url: str | None, protocol: str, triton_model: str) -> Runner:
    if not url:
        raise ConfigError("--backend triton needs --url HOST:PORT (e.g. localhost:8001 for gRPC)")
    protocol = parse_choice(WireProtocol, protocol, "protocol").value
    spec = None
    if model is not None:
        model = Path(model)
        if not model.exists():
            raise ConfigError(
                f"--model {model} does not exist; with triton it names the export folder"
            )
        if model.is_file() and model.name != SPEC_FILENAME:
            raise ConfigError(
                f"with --backend triton, --model names the export folder (for its "
                f"{SPEC_FILENAME}); {model} is a file"
            )
        spec = read_spec(model)
    try:
        from cosa.serving.triton_client import TritonSegmentationClient

        client = TritonSegmentationClient(
            url=url, protocol=protocol, model_name=triton_model, spec=spec
        )
    except ImportError as exc:  # tritonclient is imported when the client connects
        raise MissingDependencyError(
            f"the Triton client is not available ({exc}); pip install 'tritonclient[http,grpc]'"
        ) from exc
    if client.spec is None:
        # No export folder given: the server told the client K; names and colours are generic.
        num_classes = int(client.num_classes)
        log.warning(
            "no --model export folder: using generic class names and the VOC colour map for "
            "%d classes; pass the export folder for the model's own",
            num_classes,
        )
        client.spec = default_spec(num_classes)
    runner: Runner = client
    return runner


def default_spec(num_classes: int) -> ModelSpec:
    """A spec with generic names ("class_0" = background, ...) and the PASCAL VOC colour map.

    Used for a Triton model when no export folder names its classes.
    """
    return ModelSpec(
        class_names=tuple(f"class_{i}" for i in range(num_classes)),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in voc_palette(num_classes)),
    )
