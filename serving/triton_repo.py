"""Writes a Triton model repository for one exported artifact folder (`cosa triton repo`).

Everything comes from two places: the templates checked in under `cosa.triton_models` and the
artifact's `spec.json` (tensor names, dtypes, dims, classes, palette, shape profile). Layout:

    OUT/
      cosa_repository.json            what was written (read by `cosa triton serve` and the client)
      <name>/config.pbtxt             segmentation model, dynamic batching, warmup
      <name>/spec.json                copy of the artifact's spec
      <name>/1/model.onnx | model.plan | model.py + model.onnx
      <name>_preprocess/{config.pbtxt,1/model.py}    bytes -> float32 images (python backend)
      <name>_postprocess/{config.pbtxt,1/model.py}   mask -> palette PNG bytes (python backend)
      <name>_ensemble/{config.pbtxt,1/}               bytes in, PNG bytes + raw ids out

Platforms and where their instances run (`instance_group.kind`):
    onnxruntime  platform onnxruntime_onnx, KIND_AUTO: GPU when the server has one, else CPU.
    tensorrt     platform tensorrt_plan, KIND_GPU: engines only run on the GPU they were built for.
    python       backend python running onnxruntime's CPU provider, KIND_CPU: for servers without
                 the onnxruntime backend, such as the embedded one of `cosa triton serve`.

Which file a platform serves is `cosa.export.layout.choose_artifact`'s answer, the one `cosa
segment` gets, for the precision asked (default the export's) and the device the instances run on:
tensorrt the export's model.plan; onnxruntime and python for FP32 the onnxruntime-fused graph
model.ort.onnx when the export wrote one (the plain model.onnx with TensorRT as onnxruntime's
accelerator, `ort_tensorrt`: TensorRT takes no contrib ops), for INT8 model.int8_cpu.onnx on CPU
instances (python, KIND_CPU) and on KIND_AUTO ones (accurate on either device), the Q/DQ
model.int8.onnx on KIND_GPU instances and under `ort_tensorrt`. The file is always named
model.onnx in the version folder; `RepositoryLayout.artifact` records which it was.

Sizes: the model accepts any (H, W) but Triton only batches requests whose shapes match, so clients
bucket images by size. The ensemble takes the images of one request as one tensor, so they must
share a size; thin clients send one image per request and the segmentation model's dynamic batcher
batches concurrent requests of equal size.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from cosa.choices import InstanceKind, Platform, parse_choice
from cosa.errors import ConfigError, ServingError
from cosa.export.layout import (
    ArtifactChoice,
    ArtifactMissingError,
    Machine,
    Runtime,
    choose_artifact,
)
from cosa.export.spec import (
    INPUT_NAME,
    LOGITS_NAME,
    MASK_NAME,
    SPEC_FILENAME,
    ModelSpec,
    TensorSpec,
    read_spec,
)
from cosa.files import new_staging_folder, replace_folder
from cosa.serving.triton_names import (
    DEFAULT_MODEL_NAME,
    ENSEMBLE_INPUT_NAME,
    PNG_OUTPUT_NAME,
    ensemble_model_name,
    postprocess_model_name,
    preprocess_model_name,
    triton_dtype,
)
from cosa.triton_models import read_template

if TYPE_CHECKING:
    import onnx

__all__ = [
    "LAYOUT_FILENAME",
    "RepositoryLayout",
    "read_layout",
    "write_repository",
]

logger = logging.getLogger(__name__)


LAYOUT_FILENAME = "cosa_repository.json"
DECODER_MODULE = "cosa_image_decode"  # cosa/image_decode.py as preprocess_model.py imports it
VERSION = "1"
MAX_PNG_CLASSES = 256  # a palette PNG holds 256 colours

_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class _Runtime:
    """What differs between the segmentation model's platforms."""

    template: str  # runtime_*.pbtxt
    suffix: str  # artifact file the platform serves
    model_file: str  # its name in the version folder
    default_kind: InstanceKind
    kinds: tuple[InstanceKind, ...]  # allowed instance kinds


_AUTO, _CPU, _GPU = InstanceKind.AUTO, InstanceKind.CPU, InstanceKind.GPU
_RUNTIMES = {
    Platform.ONNXRUNTIME: _Runtime(
        "runtime_onnxruntime.pbtxt", ".onnx", "model.onnx", _AUTO, (_AUTO, _CPU, _GPU)
    ),
    Platform.TENSORRT: _Runtime("runtime_tensorrt.pbtxt", ".plan", "model.plan", _GPU, (_GPU,)),
    Platform.PYTHON: _Runtime("runtime_python.pbtxt", ".onnx", "model.onnx", _CPU, (_CPU,)),
}
_DEVICES = {_AUTO: "any", _CPU: "cpu", _GPU: "cuda"}  # instance kind -> `Machine.device`


@dataclass(frozen=True)
class RepositoryLayout:
    """Names and paths of a written repository (also stored as OUT/cosa_repository.json)."""

    root: Path
    platform: str
    segmentation: str  # model that takes float32 images (N, 3, H, W)
    preprocess: str | None  # None when written without the ensemble
    postprocess: str | None
    ensemble: str | None  # model that takes encoded image bytes
    max_batch: int
    artifact: dict[str, object] | None = None  # `ArtifactChoice.to_json()` of the served file

    @property
    def models(self) -> tuple[str, ...]:
        """Every model folder, segmentation model first."""
        names = (self.segmentation, self.preprocess, self.postprocess, self.ensemble)
        return tuple(name for name in names if name is not None)

    def config_path(self, model: str) -> Path:
        """`root/<model>/config.pbtxt`."""
        return self.root / model / "config.pbtxt"

    def to_json_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["root"] = str(self.root)
        return data


def read_layout(repo: Path) -> RepositoryLayout:
    """Reads `repo/cosa_repository.json`.

    Raises:
        ServingError: `repo` was not written by `write_repository`.
    """
    path = repo / LAYOUT_FILENAME
    try:
        data = json.loads(path.read_text())
        return RepositoryLayout(
            root=repo,
            platform=str(data["platform"]),
            segmentation=str(data["segmentation"]),
            preprocess=data.get("preprocess"),
            postprocess=data.get("postprocess"),
            ensemble=data.get("ensemble"),
            max_batch=int(data["max_batch"]),
            artifact=data.get("artifact"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ServingError(
            f"{path} is missing or invalid ({exc}); build the repository with `cosa triton repo`"
        ) from exc


def write_repository(
    artifact_dir: Path,
    out: Path,
    platform: Platform | str = Platform.ONNXRUNTIME,
    max_batch: int = 8,
    instances: int = 1,
    preferred_batch: Sequence[int] = (),
    max_queue_delay_us: int = 100,
    model_name: str = DEFAULT_MODEL_NAME,
    *,
    instance_kind: InstanceKind | str | None = None,
    precision: str | None = None,
    ensemble: bool = True,
    warmup: bool = True,
    ort_threads: int = 0,
    ort_tensorrt: bool = False,
    overwrite: bool = False,
) -> RepositoryLayout:
    """Writes a Triton model repository for the artifact in `artifact_dir`.

    The repository is assembled in a temporary folder beside `out` and renamed into place, so
    `out` is never left half written.

    Args:
        artifact_dir: folder with `spec.json` and the artifact the platform serves (`model.onnx`
            for onnxruntime and python, or its fused `model.ort.onnx` when the export wrote one
            and `ort_tensorrt` is off; `model.plan` for tensorrt).
        out: repository folder to create.
        platform: "onnxruntime" (onnxruntime_onnx), "tensorrt" (tensorrt_plan) or "python"
            (python backend running onnxruntime on the CPU).
        max_batch: `max_batch_size` of every model, >= 1; for tensorrt at most the engine
            profile's max batch.
        instances: instances per model (`instance_group.count`), >= 1. With the python platform
            each instance is a process with its own onnxruntime pool: set `ort_threads` to
            cores / instances.
        preferred_batch: dynamic batching's preferred batch sizes, each in [1, max_batch].
        max_queue_delay_us: how long the dynamic batcher waits to fill a batch, microseconds.
        model_name: name of the segmentation model; the other models get suffixes.
        instance_kind: "auto", "cpu" or "gpu"; default by platform (see module docstring).
        precision: "fp32", "fp16" or "int8": the network to serve (the file is the artifact
            chooser's for the platform and instance kind); default the export's precision.
        ensemble: also write the bytes-in / PNG-out ensemble and its two python models.
        warmup: warm the segmentation model up with one zero image of the spec's opt shape.
        ort_threads: onnxruntime intra-op threads of the python platform (0 = one per core).
        ort_tensorrt: onnxruntime platform only: use TensorRT as execution accelerator.
        overwrite: replace `out` if it is a repository written by this function.

    Returns:
        The layout that was written.

    Raises:
        ServingError: invalid option, missing artifact file (or none of `precision`), an ONNX
            whose inputs/outputs disagree with spec.json, or `out` exists.
        ExportError: `spec.json` missing or invalid.
    """
    platform = parse_choice(Platform, platform, "platform", ServingError).value
    if instance_kind is not None:
        instance_kind = parse_choice(
            InstanceKind, instance_kind, "instance kind", ServingError
        ).value
    runtime = _check_options(
        platform,
        max_batch,
        instances,
        preferred_batch,
        max_queue_delay_us,
        model_name,
        instance_kind,
        ort_threads,
        ort_tensorrt,
    )
    _check_out(out, overwrite)
    spec = read_spec(artifact_dir)
    _check_spec(spec, platform, max_batch, ensemble)
    kind = parse_choice(InstanceKind, instance_kind or runtime.default_kind, "instance kind")
    choice = _choose(artifact_dir, spec, platform, kind, precision, ort_tensorrt)
    artifact = choice.path
    if choice.warning:
        logger.warning("%s", choice.warning)
    companions = _check_onnx(artifact, spec) if runtime.suffix == ".onnx" else ()

    layout = RepositoryLayout(
        root=out,
        platform=platform,
        segmentation=model_name,
        preprocess=preprocess_model_name(model_name) if ensemble else None,
        postprocess=postprocess_model_name(model_name) if ensemble else None,
        ensemble=ensemble_model_name(model_name) if ensemble else None,
        max_batch=max_batch,
        artifact=choice.to_json(),
    )
    values = _template_values(spec, layout, max_queue_delay_us, instances)
    seg_config = _segmentation_config(
        values,
        spec,
        runtime,
        preferred_batch,
        kind,
        warmup,
        ort_threads,
        ort_tensorrt,
    )

    tmp = new_staging_folder(out)
    try:
        seg_dir = tmp / layout.segmentation
        _write_model(seg_dir, seg_config)
        shutil.copy2(artifact, seg_dir / VERSION / runtime.model_file)
        for extra in companions:  # ONNX external data, referenced by file name
            shutil.copy2(artifact.parent / extra, seg_dir / VERSION / extra)
        shutil.copy2(artifact_dir / SPEC_FILENAME, seg_dir / SPEC_FILENAME)
        if platform == "python":
            _copy_template("onnxruntime_model.py", seg_dir / VERSION / "model.py")
        if ensemble:
            _write_ensemble(tmp, values)
        (tmp / LAYOUT_FILENAME).write_text(json.dumps(layout.to_json_dict(), indent=2) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if platform == "tensorrt":
        logger.info(
            "model.plan only loads on TensorRT %s and a %s-class GPU (from spec.json); the "
            "server's TensorRT must match",
            spec.tensorrt_version or "?",
            spec.gpu_name or "?",
        )
    logger.info("wrote Triton repository %s (%s)", out, ", ".join(layout.models))
    return layout


def _check_options(
    platform: str,
    max_batch: int,
    instances: int,
    preferred_batch: Sequence[int],
    max_queue_delay_us: int,
    model_name: str,
    instance_kind: str | None,
    ort_threads: int,
    ort_tensorrt: bool,
) -> _Runtime:
    """Validates the options that do not need the artifact; returns the platform's runtime."""
    runtime = _RUNTIMES[parse_choice(Platform, platform, "platform", ServingError)]
    if max_batch < 1:
        raise ServingError(
            f"max batch {max_batch} must be >= 1: dynamic batching needs a batch dimension"
        )
    if instances < 1:
        raise ServingError(f"instances {instances} must be >= 1")
    if max_queue_delay_us < 0:
        raise ServingError(f"max queue delay {max_queue_delay_us} us must be >= 0")
    bad = [size for size in preferred_batch if not 1 <= size <= max_batch]
    if bad:
        raise ServingError(
            f"preferred batch sizes {bad} lie outside [1, max batch {max_batch}]; Triton refuses "
            "such a model: lower them or raise --max-batch"
        )
    if len(set(preferred_batch)) != len(preferred_batch):
        raise ServingError(f"preferred batch sizes {list(preferred_batch)} repeat a size")
    if not _MODEL_NAME.match(model_name):
        raise ServingError(
            f"model name {model_name!r} must start with a letter or digit and contain only "
            "letters, digits, '_', '.' and '-'"
        )
    if instance_kind is not None and instance_kind not in runtime.kinds:
        raise ServingError(
            f"instance kind {instance_kind!r} does not fit platform {platform!r} "
            f"(allowed: {', '.join(runtime.kinds)})"
        )
    if ort_threads < 0:
        raise ServingError(f"onnxruntime threads {ort_threads} must be >= 0 (0 = one per core)")
    if ort_tensorrt and platform != "onnxruntime":
        raise ServingError(
            f"the TensorRT accelerator is an onnxruntime_onnx option; platform is {platform!r}"
        )
    return runtime


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses to replace anything but a repository this module wrote."""
    if not out.exists():
        return
    if not overwrite:
        raise ServingError(f"{out} already exists; choose another --out or pass --overwrite")
    if not out.is_dir() or not ((out / LAYOUT_FILENAME).is_file() or not any(out.iterdir())):
        raise ServingError(
            f"{out} exists and is not a repository written by `cosa triton repo`; refusing to "
            "replace it: choose another --out"
        )


def _check_spec(spec: ModelSpec, platform: str, max_batch: int, ensemble: bool) -> None:
    k = spec.num_classes
    if len(spec.palette) < k:
        raise ServingError(
            f"spec.json has {k} classes but {len(spec.palette)} palette colours; "
            "re-export the model"
        )
    if ensemble and k > MAX_PNG_CLASSES:
        raise ServingError(
            f"{k} classes do not fit a palette PNG ({MAX_PNG_CLASSES} colours); write the "
            "repository without the ensemble and use raw ids"
        )
    if platform == "tensorrt" and max_batch > spec.profile.max[0]:
        raise ServingError(
            f"max batch {max_batch} exceeds the engine profile's max batch {spec.profile.max[0]} "
            "(spec.json); lower --max-batch or rebuild the engine with a larger profile"
        )


def _choose(
    artifact_dir: Path,
    spec: ModelSpec,
    platform: str,
    kind: InstanceKind,
    precision: str | None,
    ort_tensorrt: bool,
) -> ArtifactChoice:
    """The file the platform serves (`choose_artifact`, for the device its instances run on).

    Raises:
        ServingError: the export has no such file, or an unknown precision.
    """
    if platform == Platform.TENSORRT:
        runtime = Runtime.TENSORRT
    elif ort_tensorrt:
        runtime = Runtime.ONNXRUNTIME_TENSORRT
    else:
        runtime = Runtime.ONNXRUNTIME
    machine = Machine("cuda" if runtime is not Runtime.ONNXRUNTIME else _DEVICES[kind])
    try:
        return choose_artifact(artifact_dir, spec, runtime, precision, machine)
    except ArtifactMissingError as exc:
        raise ServingError(
            f"{artifact_dir / exc.file} not found: platform {platform!r} serves a {exc.file}; "
            f"{exc.fix} (the export has: {exc.available})"
        ) from exc
    except ConfigError as exc:
        raise ServingError(str(exc)) from exc


def _check_onnx(path: Path, spec: ModelSpec) -> tuple[str, ...]:
    """Checks the ONNX graph's inputs/outputs against spec.json; returns its external data files.

    Raises:
        ServingError: unreadable ONNX, or names/dtypes/ranks that disagree with the spec.
    """
    import onnx  # heavy; only needed here

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ServingError(f"{path} is not a readable ONNX model ({exc}); re-export it") from exc

    def described(values: Sequence[onnx.ValueInfoProto]) -> list[tuple[str, str, int]]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            out.append((value.name, dtype, len(tensor.shape.dim)))
        return out

    def expected(specs: Sequence[TensorSpec]) -> list[tuple[str, str, int]]:
        return [(t.name, t.dtype, len(t.shape)) for t in specs]

    got_in, got_out = described(model.graph.input), described(model.graph.output)
    want_in, want_out = expected(spec.inputs), expected(spec.outputs)
    if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
        raise ServingError(
            f"{path} has inputs {got_in} and outputs {got_out} (name, dtype, rank) but spec.json "
            f"declares {want_in} and {want_out}; re-export the model so both agree"
        )
    locations = _external_data_files(model.graph)
    missing = sorted(name for name in locations if not (path.parent / name).is_file())
    if missing:
        raise ServingError(f"{path} references external data {missing} that is not beside it")
    return tuple(sorted(locations))


def _external_data_files(graph: onnx.GraphProto) -> set[str]:
    """File names of the external data that `graph` and its subgraphs reference."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = list(graph.initializer)
    files: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            tensors.extend([attribute.t] if attribute.HasField("t") else attribute.tensors)
            for subgraph in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                files |= _external_data_files(subgraph)
    files.update(ExternalDataInfo(t).location for t in tensors if uses_external_data(t))
    return files


def _template_values(
    spec: ModelSpec, layout: RepositoryLayout, max_queue_delay_us: int, instances: int
) -> dict[str, str]:
    """Placeholder values shared by every template, all derived from the spec and layout."""
    images = _tensor(spec.inputs, INPUT_NAME)
    logits = _tensor(spec.outputs, LOGITS_NAME)
    mask = _tensor(spec.outputs, MASK_NAME)
    palette = ",".join(str(c) for rgb in spec.palette[: spec.num_classes] for c in rgb)
    return {
        "max_batch": str(layout.max_batch),
        "max_queue_delay_us": str(max_queue_delay_us),
        "instances": str(instances),
        "input_name": images.name,
        "input_type": "TYPE_" + triton_dtype(images.dtype),
        "input_dims": _dims(images),
        "logits_name": logits.name,
        "logits_type": "TYPE_" + triton_dtype(logits.dtype),
        "logits_dims": _dims(logits),
        "mask_name": mask.name,
        "mask_type": "TYPE_" + triton_dtype(mask.dtype),
        "mask_dims": _dims(mask),
        # Ensemble steps reuse the segmentation model's tensor names.
        "images_name": images.name,
        "images_type": "TYPE_" + triton_dtype(images.dtype),
        "images_dims": _dims(images),
        "bytes_name": ENSEMBLE_INPUT_NAME,
        "png_name": PNG_OUTPUT_NAME,
        "palette": palette,
        "segmentation": layout.segmentation,
        "preprocess": layout.preprocess or "",
        "postprocess": layout.postprocess or "",
        "ensemble": layout.ensemble or "",
    }


def _segmentation_config(
    values: dict[str, str],
    spec: ModelSpec,
    runtime: _Runtime,
    preferred_batch: Sequence[int],
    instance_kind: InstanceKind,
    warmup: bool,
    ort_threads: int,
    ort_tensorrt: bool,
) -> str:
    """Renders segmentation.pbtxt for one platform."""
    _, warm_h, warm_w = spec.profile.opt
    channels = _tensor(spec.inputs, INPUT_NAME).shape[1]
    warmup_block = (
        _render(
            "warmup.pbtxt",
            {
                **values,
                "warmup_h": str(warm_h),
                "warmup_w": str(warm_w),
                "warmup_dims": f"{channels}, {warm_h}, {warm_w}",
            },
        )
        if warmup
        else ""
    )
    extras = ""
    if runtime.template == "runtime_python.pbtxt":
        extras = _render(
            "extras_python.pbtxt", {"model_file": runtime.model_file, "threads": str(ort_threads)}
        )
    elif ort_tensorrt:
        extras = _render(
            "extras_ort_tensorrt.pbtxt",
            {
                "precision_mode": "FP16" if spec.precision == "fp16" else "FP32",
                "workspace_bytes": str(1 << 30),
            },
        )
    preferred = (
        f"  preferred_batch_size: [ {', '.join(str(s) for s in preferred_batch)} ]\n"
        if preferred_batch
        else ""
    )
    return _render(
        "segmentation.pbtxt",
        {
            **values,
            "name": values["segmentation"],
            "runtime": _render(runtime.template, {"model_file": runtime.model_file}).strip(),
            "preferred_batch_size": preferred,
            "instance_kind": _KINDS[instance_kind],
            "warmup": warmup_block,
            "extras": extras,
        },
    )


def _write_ensemble(root: Path, values: dict[str, str]) -> None:
    """Writes the pre-processing, post-processing and ensemble models (names in `values`)."""
    for role, code in (
        ("preprocess", "preprocess_model.py"),
        ("postprocess", "postprocess_model.py"),
    ):
        name = values[role]
        _write_model(root / name, _render(f"{role}.pbtxt", {**values, "name": name}))
        _copy_template(code, root / name / VERSION / "model.py")
    # The pre-processing model decodes with the library's own decoder, shipped beside it.
    decoder = resources.files("cosa").joinpath("image_decode.py").read_text(encoding="utf-8")
    (root / values["preprocess"] / VERSION / f"{DECODER_MODULE}.py").write_text(decoder)
    # An ensemble needs an (empty) version folder like every other model.
    name = values["ensemble"]
    _write_model(root / name, _render("ensemble.pbtxt", {**values, "name": name}))


def _write_model(model_dir: Path, config: str) -> None:
    (model_dir / VERSION).mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config)


def _copy_template(name: str, dest: Path) -> None:
    dest.write_text(read_template(name))


def _render(template: str, values: dict[str, str]) -> str:
    return Template(read_template(template)).substitute(values)


def _tensor(tensors: Sequence[TensorSpec], name: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise ServingError(f"spec.json declares no tensor {name!r}; re-export the model")


def _dims(tensor: TensorSpec) -> str:
    """config.pbtxt dims: the spec's shape without the batch dimension (-1 = variable)."""
    return ", ".join(str(d) for d in tensor.shape[1:])
