"""The export folder: its file names and roles, and which file a runtime runs on a given machine.

One folder written by `cosa export` holds up to five networks. Their file names are fixed; spec.json
`artifact` names the primary one and `extra_artifacts` maps every role to its file:

    role          file                   precision   what it is for
    fp32          model.onnx             fp32        the verified reference graph, portable
    fp32_ort      model.ort.onnx         fp32        model.onnx with onnxruntime's fused transformer
                                                     ops (ViT backbones): faster, onnxruntime only
    fp16          model.fp16.onnx        fp16        FP16 weights and activations
    int8          model.int8.onnx        int8        symmetric s8 Q/DQ: TensorRT's explicit INT8
    int8_cpu      model.int8_cpu.onnx    int8        u8 activations x 7-bit s8 weights as fused
                                                     QLinear* operators: onnxruntime on a CPU
    tensorrt      model.plan             (export's)  engine built from the ONNX of the export's
                                                     precision, for one TensorRT version and GPU
    calibration   calib.npz              -           the INT8 calibration images (not a network)

`choose_artifact` is the one place that decides which of them a runtime runs for a requested
precision on the machine it runs on; `cosa segment`, `cosa stream`, `cosa eval DIR`, `cosa triton
repo` and `cosa benchmark` all ask it. For INT8 the answer depends on the machine: the Q/DQ file
is TensorRT's input, and in onnxruntime on an x86 CPU without VNNI its u8 x s8 products can
saturate (onnxruntime's quantization guide says so; one demo network lost 5.1 mIoU points) and it
runs 4-10x slower than the CPU file (benchmarks/results/cosa_benchmark_demo.md), so onnxruntime on
a CPU runs `model.int8_cpu.onnx`. onnxruntime's CUDA provider has no QLinearConv kernel (those nodes
would fall back to the CPU), so on a GPU it runs the Q/DQ file, which computes there what TensorRT
computes.

Standard library only (and `cosa.export.spec`, itself light), so that serving imports it freely.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from cosa.choices import Precision, parse_choice
from cosa.errors import ConfigError
from cosa.export.spec import SPEC_FILENAME, ModelSpec, read_spec

__all__ = [
    "EXPORT_FILES",
    "FILES",
    "ArtifactChoice",
    "ArtifactMissingError",
    "Machine",
    "Role",
    "Runtime",
    "choose_artifact",
    "describe_role",
    "listed_roles",
    "onnx_role",
    "open_artifact",
    "present_networks",
    "role_precision",
]

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What a file of an export folder is (the keys of spec.json `extra_artifacts`)."""

    FP32 = "fp32"
    FP32_ORT = "fp32_ort"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_CPU = "int8_cpu"
    TENSORRT = "tensorrt"
    CALIBRATION = "calibration"


FILES: dict[Role, str] = {
    Role.FP32: "model.onnx",
    Role.FP32_ORT: "model.ort.onnx",
    Role.FP16: "model.fp16.onnx",
    Role.INT8: "model.int8.onnx",
    Role.INT8_CPU: "model.int8_cpu.onnx",
    Role.TENSORRT: "model.plan",
    Role.CALIBRATION: "calib.npz",
}
"""The file name of every role."""

EXPORT_FILES = frozenset([*FILES.values(), SPEC_FILENAME])
"""Every file name an export folder may hold (what makes a folder safe to replace)."""

_ONNX_ROLE = {Precision.FP32: Role.FP32, Precision.FP16: Role.FP16, Precision.INT8: Role.INT8}

_SUMMARIES = {
    Role.FP32: "FP32 graph",
    Role.FP32_ORT: "FP32 graph with onnxruntime's fused ops",
    Role.FP16: "FP16 graph",
    Role.INT8: "INT8 Q/DQ graph (TensorRT's input)",
    Role.INT8_CPU: "INT8 graph for onnxruntime on a CPU (u8s8 QLinear ops)",
    Role.TENSORRT: "TensorRT engine",
}


class Runtime(StrEnum):
    """What executes an artifact."""

    ONNXRUNTIME = "onnxruntime"  # CPU or CUDA provider (Machine.device says which)
    ONNXRUNTIME_TENSORRT = "onnxruntime+tensorrt"  # TensorRT as onnxruntime's accelerator
    TENSORRT = "tensorrt"


@dataclass(frozen=True)
class Machine:
    """Where a runtime runs.

    Attributes:
        device: "cpu", "cuda", or "any" when it is not known beforehand (a Triton instance of
            KIND_AUTO runs on the server's GPU if it has one, else on its CPU).
        arch: the CPU architecture as `platform.machine()` names it; default this machine's.
    """

    device: Literal["cpu", "cuda", "any"] = "cpu"
    arch: str = field(default_factory=lambda: platform.machine().lower())

    @property
    def x86(self) -> bool:
        """An x86 CPU (where onnxruntime's u8 x s8 kernels may saturate without VNNI)."""
        return self.arch in {"x86_64", "amd64", "x64", "i386", "i686", "x86"}

    def describe(self) -> str:
        """e.g. "cpu (x86_64)"."""
        return f"{self.device} ({self.arch})" if self.device != "cuda" else "cuda"


@dataclass(frozen=True)
class ArtifactChoice:
    """The file a runtime runs, and why.

    Attributes:
        path: the file.
        role: its role in the export folder.
        precision: the precision it computes in.
        runtime: what runs it.
        machine: where (for the reason).
        reason: one line for users: why this file.
        warning: set when the file is accurate or fast elsewhere but not here (an old export
            without the file this machine wants).
    """

    path: Path
    role: Role
    precision: Precision
    runtime: Runtime
    machine: Machine
    reason: str
    warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The `--json` form: file, role, precision, runtime, device, reason, warning."""
        return {
            "file": str(self.path),
            "role": str(self.role),
            "precision": str(self.precision),
            "runtime": str(self.runtime),
            "device": self.machine.describe(),
            "reason": self.reason,
            "warning": self.warning,
        }


class ArtifactMissingError(ConfigError):
    """The export folder lacks the file a runtime needs.

    Attributes:
        folder: the export folder.
        file: the file name the runtime would run (the first choice).
        fix: how to get it, one clause ("build one with `cosa export ... --trt`").
        available: the networks the folder lists, e.g. "fp32 (model.onnx), int8 (...)".
    """

    def __init__(self, message: str, folder: Path, file: str, fix: str, available: str) -> None:
        super().__init__(message)
        self.folder = folder
        self.file = file
        self.fix = fix
        self.available = available


def onnx_role(precision: str) -> Role:
    """The role of the portable ONNX graph of `precision` (fp32, fp16, int8 Q/DQ)."""
    return _ONNX_ROLE[Precision(precision)]


def role_precision(role: Role, spec: ModelSpec) -> Precision:
    """The precision `role` computes in; an engine has the export's precision.

    Raises:
        ValueError: the calibration set, which is no network.
    """
    if role is Role.CALIBRATION:
        raise ValueError("calib.npz is calibration data, not a network")
    if role is Role.TENSORRT:
        return Precision(spec.precision)
    return Precision(str(role).split("_")[0])


def listed_roles(spec: ModelSpec) -> dict[Role, str]:
    """Role -> file name of every network spec.json lists, the primary first.

    Unknown roles are skipped (an export of a later version may write more). A primary missing
    from `extra_artifacts` (hand-written or old specs) gets the role of its suffix: "tensorrt" for a
    .plan, else the ONNX role of `spec.precision`.
    """
    extras = {
        Role(key): name
        for key, name in spec.extra_artifacts.items()
        if key in set(Role) and key != Role.CALIBRATION
    }
    primary = {name: role for role, name in extras.items()}.get(spec.artifact)
    if primary is None and spec.artifact.endswith(".plan"):
        primary = Role.TENSORRT
    elif primary is None and spec.artifact.endswith(".onnx") and spec.precision in set(Precision):
        primary = onnx_role(spec.precision)
    roles = {primary: spec.artifact} if primary is not None else {}
    for role, name in extras.items():
        roles.setdefault(role, name)
    return roles


def choose_artifact(
    folder: Path,
    spec: ModelSpec,
    runtime: Runtime | str,
    precision: str | None = None,
    machine: Machine | None = None,
    *,
    fused: bool = True,
) -> ArtifactChoice:
    """The file of export folder `folder` that `runtime` runs for `precision` on `machine`.

    Preference, first present file wins (a file listed in spec.json but missing on disk is skipped
    with a warning in the log):
        tensorrt                  model.plan (its precision is the export's: asking another fails)
        fp32, onnxruntime         model.ort.onnx (unless `fused` is off), model.onnx
        fp32, onnxruntime+trt     model.onnx (TensorRT takes no onnxruntime contrib ops)
        fp16                      model.fp16.onnx
        int8, onnxruntime, cpu    model.int8_cpu.onnx, then model.int8.onnx (with a warning on
                                  x86: it loses accuracy there)
        int8, onnxruntime, cuda   model.int8.onnx, then model.int8_cpu.onnx
        int8, onnxruntime, any    model.int8_cpu.onnx (accurate on either device), model.int8.onnx
        int8, onnxruntime+trt     model.int8.onnx

    Args:
        folder: the export folder (holding spec.json).
        spec: its spec.
        runtime: a `Runtime`.
        precision: "fp32", "fp16" or "int8"; None: the export's precision (`spec.precision`).
        machine: where the runtime runs; default this machine's CPU for onnxruntime, a GPU
            for TensorRT.
        fused: allow the onnxruntime-fused FP32 graph.

    Raises:
        ArtifactMissingError: no file of that precision for that runtime (the message lists the
            folder's networks and says how to get it), or its file is missing.
        ConfigError: unknown precision or runtime; a TensorRT engine of another precision asked.
    """
    runtime = parse_choice(Runtime, runtime, "runtime")
    want = parse_choice(Precision, precision or spec.precision, "precision")
    machine = machine or _default_machine(runtime)
    roles = listed_roles(spec)
    ranked = _ranked(spec, runtime, want, machine, fused)
    first = ranked[0][0]
    fix = (
        f"build one with `cosa export CHECKPOINT --precision {spec.precision} --trt` on the "
        "serving GPU"
        if first is Role.TENSORRT
        else f"export with `cosa export CHECKPOINT --precision {want}`"
    )
    if runtime is Runtime.TENSORRT and Role.TENSORRT in roles and want != spec.precision:
        raise ConfigError(
            f"the TensorRT engine in {folder} is {spec.precision}, not {want}; "
            f"build a {want} engine with `cosa export CHECKPOINT --precision {want} --trt`"
        )
    listed = [(role, reason, warning) for role, reason, warning in ranked if role in roles]
    available = ", ".join(f"{role} ({name})" for role, name in roles.items()) or "none"
    if not listed:
        raise ArtifactMissingError(
            f"{folder} has no {want} artifact; available: {available} ({runtime} runs "
            f"{FILES[first]} for {want}: {fix})",
            folder,
            FILES[first],
            fix,
            available,
        )
    for role, reason, warning in listed:
        path = folder / roles[role]
        if path.is_file():
            if role is not listed[0][0]:
                log.warning(
                    "%s lists %s but it is missing; using %s",
                    folder / SPEC_FILENAME,
                    roles[listed[0][0]],
                    path.name,
                )
            return ArtifactChoice(path, role, want, runtime, machine, reason, warning)
    missing = folder / roles[listed[0][0]]
    raise ArtifactMissingError(
        f"{missing} named by {folder / SPEC_FILENAME} is missing; {fix}",
        folder,
        missing.name,
        fix,
        available,
    )


def open_artifact(
    model: Path,
    runtime: Runtime | str,
    precision: str | None = None,
    machine: Machine | None = None,
    *,
    fused: bool = True,
) -> tuple[ArtifactChoice, ModelSpec]:
    """`choose_artifact` for an export folder, or a file of one given directly.

    Args:
        model: an export folder, or an artifact file with spec.json beside it (run as given).
        runtime, precision, machine, fused: see `choose_artifact`; `precision` only with a folder.

    Raises:
        ConfigError: missing path, a file of the wrong kind for the runtime, `precision` with a
            file, no spec.json beside a file; see `choose_artifact`.
        ExportError: spec.json missing or invalid.
    """
    runtime = parse_choice(Runtime, runtime, "runtime")
    machine = machine or _default_machine(runtime)
    suffix = ".plan" if runtime is Runtime.TENSORRT else ".onnx"
    if not model.exists():
        raise ConfigError(
            f"model {model} does not exist; pass an export folder written by `cosa export`"
        )
    if model.is_dir():
        spec = read_spec(model)
        return choose_artifact(model, spec, runtime, precision, machine, fused=fused), spec
    if model.suffix.lower() != suffix:
        raise ConfigError(f"model {model} is not a {suffix} file; pass the export folder instead")
    if precision is not None:
        raise ConfigError(
            f"--precision picks a file inside an export folder; pass {model.parent} instead of "
            f"{model.name}, or drop --precision"
        )
    if not (model.parent / SPEC_FILENAME).is_file():
        raise ConfigError(
            f"{model} has no {SPEC_FILENAME} beside it (class names and palette come from it); "
            "pass the folder written by `cosa export`"
        )
    spec = read_spec(model.parent)
    named = {name: role for role, name in listed_roles(spec).items()}
    role = named.get(model.name) or (
        Role.TENSORRT if suffix == ".plan" else onnx_role(spec.precision)
    )
    choice = ArtifactChoice(
        model, role, role_precision(role, spec), runtime, machine, "the file given"
    )
    return choice, spec


def present_networks(folder: Path, spec: ModelSpec) -> list[tuple[Role, Path]]:
    """The networks of an export folder that are on disk, in `Role` order."""
    roles = listed_roles(spec)
    return [
        (role, folder / roles[role])
        for role in Role
        if role in roles and (folder / roles[role]).is_file()
    ]


def describe_role(role: Role) -> str:
    """A few words on what the file of `role` is, for tables."""
    return _SUMMARIES.get(role, str(role))


def _ranked(
    spec: ModelSpec, runtime: Runtime, want: Precision, machine: Machine, fused: bool
) -> list[tuple[Role, str, str | None]]:
    """(role, reason, warning) in order of preference."""
    if runtime is Runtime.TENSORRT:
        return [(Role.TENSORRT, f"TensorRT engine built from the {spec.precision} ONNX", None)]
    if want is Precision.FP32:
        plain = (Role.FP32, "FP32 graph", None)
        if runtime is Runtime.ONNXRUNTIME_TENSORRT:
            return [(Role.FP32, "FP32 graph (TensorRT takes no onnxruntime contrib ops)", None)]
        fused_graph = (
            Role.FP32_ORT,
            "FP32 graph with onnxruntime's fused ops (same network)",
            None,
        )
        return [fused_graph, plain] if fused else [plain]
    if want is Precision.FP16:
        return [(Role.FP16, "FP16 graph", None)]
    qdq_tensorrt = (Role.INT8, "INT8 Q/DQ graph: what TensorRT computes", None)
    if runtime is Runtime.ONNXRUNTIME_TENSORRT:
        return [qdq_tensorrt]
    cpu_file = (
        Role.INT8_CPU,
        "INT8 graph for onnxruntime on a CPU: accurate and fast there",
        None,
    )
    if machine.device == "cuda":
        return [
            (Role.INT8, "INT8 Q/DQ graph: runs on the GPU as TensorRT computes it", None),
            (Role.INT8_CPU, "INT8 CPU graph (its QLinear ops fall back to the CPU)", None),
        ]
    qdq_on_cpu = (
        Role.INT8,
        "INT8 Q/DQ graph (the export has no CPU INT8 file)",
        (
            "model.int8.onnx is TensorRT's INT8 file; onnxruntime's x86 INT8 kernels can saturate "
            "on it (5 mIoU points lost on one demo model) and run it slowly: re-export with this "
            "cosa for model.int8_cpu.onnx, or run --precision fp32"
        )
        if machine.x86
        else None,
    )
    if machine.device == "any":
        any_file = (
            Role.INT8_CPU,
            "INT8 graph for onnxruntime on a CPU: accurate on a CPU or a GPU",
            None,
        )
        return [any_file, qdq_on_cpu]
    return [cpu_file, qdq_on_cpu]


def _default_machine(runtime: Runtime) -> Machine:
    """This machine's CPU for onnxruntime, its GPU for TensorRT."""
    return Machine("cpu" if runtime is Runtime.ONNXRUNTIME else "cuda")
