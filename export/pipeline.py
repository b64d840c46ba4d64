"""`cosa export`: checkpoint -> verified artifact folder (ONNX FP32 [+ FP16 | INT8] [+ TensorRT]).

Folder written (file names and roles: `cosa.export.layout`; spec.json `artifact` names the primary
file, `extra_artifacts` maps every role to its file):

    role          file                   written when
    fp32          model.onnx             always (the verified reference graph)
    fp32_ort      model.ort.onnx         ort_fusion "on", or "auto" with a ViT backbone (verified
                                         against PyTorch too; `cosa.export.fusion`)
    fp16          model.fp16.onnx        --precision fp16
    int8          model.int8.onnx        --precision int8
    int8_cpu      model.int8_cpu.onnx    --precision int8 (unless `int8_cpu` is off)
    calibration   calib.npz              --precision int8
    tensorrt      model.plan             --trt (built from the ONNX of --precision)
                  spec.json              always

Primary artifact: model.plan with --trt, else the ONNX of --precision.

Atomicity: the options are validated when `ExportOptions` is built; then the output folder is
checked and a hidden temporary folder is created beside it (`.NAME.XXXX.partial`, which proves it
writable); then come the other checks that need no export (TensorRT/CUDA, calibration images,
checkpoint), then the artifacts, built in the temporary folder and renamed into place at the end.
Any failure removes the temporary folder, so `out` is either untouched or complete.

An existing `out`: an empty folder or a previous export (spec.json plus only the file names above)
is replaced; any other content is refused, because replacing it would delete the user's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cosa.checkpoint import Checkpoint, load_deploy_model
from cosa.choices import CalibrationMethod, OrtFusion, Precision
from cosa.errors import ExportError
from cosa.export.calibration import (
    CALIB_FILENAME,
    DEFAULT_CALIBRATION_IMAGES,
    MIN_CALIBRATION_IMAGES,
    CalibrationSet,
    load_calibration_set,
    save_calibration_set,
)
from cosa.export.fp16 import convert_to_fp16
from cosa.export.fusion import NothingToFuseError, fuse_vit, vit_attention_shape
from cosa.export.int8 import QUANTIZED_OP_TYPES, quantize_int8
from cosa.export.layout import EXPORT_FILES, FILES, Role, onnx_role
from cosa.export.onnx_export import DEFAULT_OPSET, export_onnx, validate_opset
from cosa.export.spec import SPEC_FILENAME, ModelSpec, ShapeProfile, write_spec
from cosa.export.tensorrt_build import (
    DEFAULT_WORKSPACE_MIB,
    EngineInfo,
    EngineRunner,
    build_engine,
    profile_check_shapes,
    require_tensorrt,
    validate_profile,
)
from cosa.export.verify import (
    DEFAULT_SHAPES,
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    TENSORRT_TOLERANCES,
    Tolerance,
    VerificationReport,
    compare,
    onnxruntime_runner,
    random_images,
    torch_runner,
)
from cosa.files import new_staging_folder, replace_folder

logger = logging.getLogger(__name__)

FP32_ONNX = FILES[Role.FP32]
FUSED_ONNX = FILES[Role.FP32_ORT]
FP16_ONNX = FILES[Role.FP16]
INT8_ONNX = FILES[Role.INT8]
INT8_CPU_ONNX = FILES[Role.INT8_CPU]
PLAN = FILES[Role.TENSORRT]
ROLES = {name: role for role, name in FILES.items()}  # file name -> role

_RANDOM_IMAGES = "uniform random RGB in [0, 255], seed 0"


def parse_shape(text: str, option: str = "shape") -> tuple[int, int, int]:
    """Parse "NxHxW" (e.g. "1x448x448") into (N, H, W).

    Args:
        text: three positive integers joined by "x" (case-insensitive, spaces ignored).
        option: the option name used in the error message (e.g. "--min-shape").

    Raises:
        ExportError: not three positive integers.
    """
    parts = text.lower().replace(" ", "").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise ExportError(
            f"{option} {text!r} is not NxHxW with three positive integers; e.g. 1x448x448"
        )
    return values  # type: ignore[return-value]


@dataclass(frozen=True)
class ExportOptions:
    """What `cosa export` was asked for; validated on construction.

    Attributes:
        precision: "fp32" | "fp16" | "int8": the primary artifact's precision (FP32 ONNX always).
        calib_dir: folder of calibration images (recursive); required for int8, unused otherwise.
        calib_size: at most this many calibration images (>= MIN_CALIBRATION_IMAGES).
        calib_method: "entropy" | "percentile" | "minmax".
        trt: also build a TensorRT engine from the ONNX of `precision`.
        min_shape, opt_shape, max_shape: (N, H, W) optimization profile; calibration images are
            fitted to opt's H x W.
        opset: ONNX opset (onnx_export.MIN_OPSET..MAX_OPSET).
        exclude_nodes: node names kept in float by INT8 quantization, added to the default
            exclusion of the classifier tail.
        int8_cpu: with int8, also write model.int8_cpu.onnx (onnxruntime's faster x86 flavour).
        workspace_mib: TensorRT builder workspace limit.
        timing_cache: TensorRT timing cache file (None: per version/GPU under ~/.cache/cosa).
        verify_shapes: (N, H, W) shapes of the PyTorch-vs-onnxruntime check.
        ort_fusion: "off" | "auto" | "on": also write model.ort.onnx, the FP32 graph with
            onnxruntime's fused transformer ops (MultiHeadAttention, SkipLayerNormalization,
            BiasGelu), verified against PyTorch at `verify_shapes`. "auto": for ViT backbones
            only, skipped with a warning when no attention sub-graph matches; "on": both are
            errors. A fused graph that disagrees with PyTorch is always an error. onnxruntime
            runners and Triton's onnxruntime / python platforms prefer it over model.onnx
            (serving.runners, serving.triton_repo); TensorRT, FP16 and INT8 use model.onnx.
            Default "auto": a CNN backbone (EfficientNet) is skipped by a module scan, silently
            and without exporting anything more; a ViT gets model.ort.onnx (ViT-S in
            onnxruntime: 2.6x / 1.11x torch eager at batch 1 / 8 against 2.34x / 1.04x unfused,
            benchmarks/results/inference.md).
    """

    precision: str = "fp32"
    calib_dir: Path | None = None
    calib_size: int = DEFAULT_CALIBRATION_IMAGES
    calib_method: str = "entropy"
    trt: bool = False
    min_shape: tuple[int, int, int] = ShapeProfile().min
    opt_shape: tuple[int, int, int] = ShapeProfile().opt
    max_shape: tuple[int, int, int] = ShapeProfile().max
    opset: int = DEFAULT_OPSET
    exclude_nodes: tuple[str, ...] = ()
    int8_cpu: bool = True
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Path | None = None
    verify_shapes: tuple[tuple[int, int, int], ...] = DEFAULT_SHAPES
    ort_fusion: str = "auto"

    def __post_init__(self) -> None:
        """Raises: ExportError for any invalid or inconsistent option."""
        if self.precision not in set(Precision):
            raise ExportError(
                f"--precision {self.precision!r} is not one of {', '.join(Precision)}"
            )
        if self.precision == "int8" and self.calib_dir is None:
            raise ExportError(
                "--precision int8 needs calibration images: pass --calib DIR with a few hundred "
                "representative images (there is no default calibration set)"
            )
        if self.precision != "int8" and self.calib_dir is not None:
            raise ExportError(f"--calib is only used with --precision int8, not {self.precision}")
        if self.precision != "int8" and self.exclude_nodes:
            raise ExportError("--exclude-node only applies to --precision int8")
        if self.calib_method not in set(CalibrationMethod):
            choices = ", ".join(CalibrationMethod)
            raise ExportError(f"--calib-method {self.calib_method!r} is not one of {choices}")
        if self.calib_size < MIN_CALIBRATION_IMAGES:
            raise ExportError(
                f"--calib-size {self.calib_size} is below the minimum of {MIN_CALIBRATION_IMAGES} "
                "calibration images"
            )
        validate_opset(self.opset)
        validate_profile(self.profile)
        if self.workspace_mib < 1:
            raise ExportError(
                f"workspace {self.workspace_mib} MiB is invalid; pass a positive size in MiB"
            )
        if self.ort_fusion not in set(OrtFusion):
            raise ExportError(
                f"ort_fusion {self.ort_fusion!r} is not one of {', '.join(OrtFusion)}"
            )
        if not self.verify_shapes or any(len(s) != 3 or min(s) < 1 for s in self.verify_shapes):
            raise ExportError(f"verify_shapes {self.verify_shapes} must be (N, H, W) triples >= 1")

    @property
    def profile(self) -> ShapeProfile:
        return ShapeProfile(min=self.min_shape, opt=self.opt_shape, max=self.max_shape)


@dataclass(frozen=True)
class ExportResult:
    """What `export_artifacts` wrote.

    Attributes:
        out: the export folder.
        primary: the primary artifact (spec.json `artifact`).
        files: role (see module docstring) -> path, spec.json under "spec".
        spec: the written spec (verification numbers in `spec.verification`).
        replaced_previous: `out` held a previous export that was replaced.
        seconds: wall time of the whole export.
        warnings: one line each, for the user: skipped calibration images, INT8 agreement below
            its tolerance (also in spec.json `verification.<file>.failures`).
    """

    out: Path
    primary: Path
    files: dict[str, Path]
    spec: ModelSpec
    replaced_previous: bool = False
    seconds: float = 0.0
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def onnx_path(self) -> Path:
        """The verified FP32 ONNX (always written)."""
        return self.files["fp32"]

    def to_json_dict(self) -> dict[str, Any]:
        """Plain dict for `cosa export --json`."""
        return {
            "out": str(self.out),
            "primary": str(self.primary),
            "precision": self.spec.precision,
            "files": {role: str(path) for role, path in self.files.items()},
            "verification": self.spec.verification,
            "calibration": self.spec.calibration,
            "tensorrt_version": self.spec.tensorrt_version,
            "gpu_name": self.spec.gpu_name,
            "replaced_previous": self.replaced_previous,
            "seconds": round(self.seconds, 2),
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        """`to_json_dict` as one line of JSON."""
        return json.dumps(self.to_json_dict())


def export_artifacts(checkpoint: Path, out: Path, options: ExportOptions) -> ExportResult:
    """Export a checkpoint's deploy network to a verified artifact folder.

    Args:
        checkpoint: a `.pt` written by `cosa train`.
        out: destination folder: new, empty, or a previous export (replaced as a whole).
        options: validated export options.

    Returns:
        Paths, the written spec (with verification numbers) and timing.

    Raises:
        CheckpointError: the checkpoint is missing or corrupt.
        ExportError: `out` is not writable or holds other files, bad calibration folder, an export,
            conversion or verification failure.
        MissingDependencyError: `--trt` without TensorRT or a CUDA GPU.
    """
    started = time.perf_counter()
    previous = _check_output_folder(out)
    stage = _make_stage(out)  # proves the destination writable before any slow step
    try:
        # Every check that needs no network runs before the export, which takes minutes.
        if options.trt:
            require_tensorrt()
        calibration = None
        if options.precision == "int8" and options.calib_dir is not None:  # the latter always holds
            calibration = load_calibration_set(
                options.calib_dir, size=options.opt_shape[1:], max_images=options.calib_size
            )
        model, ckpt = load_deploy_model(checkpoint)
        spec, warnings = _build(stage, model, ckpt, checkpoint, options, calibration)
        write_spec(spec, stage)
        _install(stage, out, previous)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    files = {role: out / name for role, name in spec.extra_artifacts.items()}
    files["spec"] = out / SPEC_FILENAME
    result = ExportResult(
        out=out,
        primary=out / spec.artifact,
        files=files,
        spec=spec,
        replaced_previous=previous,
        seconds=time.perf_counter() - started,
        warnings=warnings,
    )
    logger.info("export finished in %.1f s: %s", result.seconds, result.primary)
    return result


def _build(
    stage: Path,
    model: nn.Module,
    ckpt: Checkpoint,
    checkpoint: Path,
    options: ExportOptions,
    calibration: CalibrationSet | None,
) -> tuple[ModelSpec, tuple[str, ...]]:
    """Write every artifact into `stage`; return the spec and user-facing warnings."""
    work = stage / ".work"
    work.mkdir()
    written = [FP32_ONNX]
    reports: list[VerificationReport] = []
    warnings: list[str] = []
    attention = vit_attention_shape(model) if options.ort_fusion != "off" else None
    if options.ort_fusion == "on" and attention is None:  # checked before the slow export
        raise ExportError(
            f"ort_fusion 'on' needs a ViT backbone; {ckpt.config.model.backbone} has no attention "
            "blocks to fuse (use 'auto' or 'off')"
        )

    fp32 = export_onnx(model, stage / FP32_ONNX, opset=options.opset)
    images = random_images(options.verify_shapes)
    reports.append(
        compare(
            onnxruntime_runner(fp32),
            torch_runner(model),
            images,
            artifact=FP32_ONNX,
            reference_name="torch eager fp32",
            images_name=_RANDOM_IMAGES,
            tolerance=FP32_TOLERANCE,
        )
    )

    fusion_summary = None
    if attention is not None:
        try:
            fusion_summary, report = _fused_artifact(stage, fp32, model, images, attention)
        except NothingToFuseError as exc:
            if options.ort_fusion == "on":
                raise
            # "auto": an attention variant the fusion does not know; model.onnx still serves.
            warnings.append(f"ort_fusion auto: no {FUSED_ONNX} written ({exc})")
        else:
            written.append(FUSED_ONNX)
            reports.append(report)

    calibration_summary = None
    if options.precision == "fp16":
        fp16 = convert_to_fp16(fp32, stage / FP16_ONNX)
        written.append(FP16_ONNX)
        reports.append(_compare_onnx(fp16, fp32, images, _RANDOM_IMAGES, FP16_TOLERANCE))
    elif calibration is not None:  # --precision int8
        files, int8_reports, calibration_summary = _int8_artifacts(
            stage, fp32, calibration, options, work
        )
        written += files
        reports += int8_reports
        if calibration.skipped:
            warnings.append(
                f"{len(calibration.skipped)} unreadable calibration images skipped "
                f"(e.g. {calibration.skipped[0]})"
            )

    engine = None
    if options.trt:
        engine, report = _tensorrt_artifact(stage, options)
        written.append(PLAN)
        reports.append(report)

    shutil.rmtree(work)
    warnings += [message for report in reports for message in report.failures]
    primary = PLAN if options.trt else FILES[onnx_role(options.precision)]
    spec = ModelSpec(
        class_names=tuple(ckpt.class_names),
        palette=tuple(tuple(int(c) for c in rgb) for rgb in ckpt.palette),
        precision=options.precision,
        artifact=primary,
        opset=options.opset,
        profile=options.profile,
        calibration=calibration_summary,
        fusion=fusion_summary,
        verification={r.artifact: r.to_json_dict() for r in reports},
        source_checkpoint=str(checkpoint),
        source_checkpoint_sha256=_sha256(checkpoint),
        backbone=ckpt.config.model.backbone,
        tensorrt_version=engine.tensorrt_version if engine else None,
        gpu_name=engine.gpu_name if engine else None,
        extra_artifacts={str(ROLES[name]): name for name in written},
    )
    return spec, tuple(warnings)


def _fused_artifact(
    stage: Path,
    fp32: Path,
    model: nn.Module,
    images: list[np.ndarray],
    attention: tuple[int, int],
) -> tuple[dict[str, Any], VerificationReport]:
    """model.ort.onnx from model.onnx, checked against PyTorch: (spec summary, report)."""
    num_heads, hidden_size = attention
    summary = fuse_vit(fp32, stage / FUSED_ONNX, num_heads=num_heads, hidden_size=hidden_size)
    report = compare(
        onnxruntime_runner(stage / FUSED_ONNX),
        torch_runner(model),
        images,
        artifact=FUSED_ONNX,
        reference_name="torch eager fp32",
        images_name=_RANDOM_IMAGES,
        tolerance=FP32_TOLERANCE,
    )
    return {
        **asdict(summary),
        "source": FP32_ONNX,
        "num_heads": num_heads,
        "hidden_size": hidden_size,
        "runtime": "onnxruntime only (com.microsoft ops)",
    }, report


def _int8_artifacts(
    stage: Path, fp32: Path, calibration: CalibrationSet, options: ExportOptions, work: Path
) -> tuple[list[str], list[VerificationReport], dict[str, Any]]:
    """calib.npz, the Q/DQ INT8 ONNX (+ the CPU flavour): (file names, reports, spec summary)."""
    save_calibration_set(calibration, stage / CALIB_FILENAME)
    cpu_dst = stage / INT8_CPU_ONNX if options.int8_cpu else None
    int8 = quantize_int8(
        fp32,
        stage / INT8_ONNX,
        calibration,
        options.calib_method,
        work,
        exclude_nodes=options.exclude_nodes,
        cpu_dst=cpu_dst,
    )
    images = _calibration_check_images(calibration)
    label = "calibration images (in-sample), full size and an odd-size crop"
    # The Q/DQ file is checked with exact Q/DQ arithmetic (what TensorRT computes), the CPU
    # flavour with onnxruntime's fused int8 kernels (what a CPU user runs).
    reports = [
        compare(
            onnxruntime_runner(int8.path, optimize=False),
            onnxruntime_runner(fp32),
            images,
            artifact=INT8_ONNX,
            reference_name=f"{FP32_ONNX} (Q/DQ evaluated exactly)",
            images_name=label,
            tolerance=INT8_TOLERANCE,
        )
    ]
    if int8.cpu_path is not None:
        reports.append(_compare_onnx(int8.cpu_path, fp32, images, label, INT8_TOLERANCE))
    summary = {
        **calibration.summary(),
        "method": int8.method,
        "source": str(options.calib_dir),
        "scheme": "symmetric int8 Q/DQ, per-channel weights, zero-points 0",
        "quantized_op_types": list(QUANTIZED_OP_TYPES),
        "quantized_tensors": int8.quantized_nodes,
        "excluded_nodes": list(int8.excluded_nodes),
    }
    files = [CALIB_FILENAME, INT8_ONNX] + ([INT8_CPU_ONNX] if cpu_dst else [])
    return files, reports, summary


def _tensorrt_artifact(
    stage: Path, options: ExportOptions
) -> tuple[EngineInfo, VerificationReport]:
    """model.plan from the ONNX of `options.precision`, compared with it in onnxruntime."""
    source = stage / FILES[onnx_role(options.precision)]
    engine = build_engine(
        source,
        stage / PLAN,
        options.profile,
        options.precision,
        workspace_mib=options.workspace_mib,
        timing_cache=options.timing_cache,
    )
    # An INT8 engine is compared with its Q/DQ graph evaluated exactly, not with onnxruntime's
    # saturating x86 int8 kernels (see verify.onnxruntime_runner).
    exact = options.precision == "int8"
    reference = f"{source.name} in onnxruntime"
    if exact:
        reference += " (Q/DQ evaluated exactly)"
    report = compare(
        EngineRunner(engine.path),
        onnxruntime_runner(source, optimize=not exact),
        random_images(profile_check_shapes(options.profile)),
        artifact=PLAN,
        reference_name=reference,
        images_name=_RANDOM_IMAGES,
        tolerance=TENSORRT_TOLERANCES[options.precision],
    )
    return engine, report


def _compare_onnx(
    candidate: Path, reference: Path, images: list[np.ndarray], label: str, tol: Tolerance
) -> VerificationReport:
    return compare(
        onnxruntime_runner(candidate),
        onnxruntime_runner(reference),
        images,
        artifact=candidate.name,
        reference_name=reference.name,
        images_name=label,
        tolerance=tol,
    )


def _calibration_check_images(calibration: CalibrationSet) -> list[np.ndarray]:
    """Up to two calibration images at full size, and one cropped to an odd size."""
    images = calibration.images.astype(np.float32)
    _, _, height, width = images.shape
    crop = images[-1:, :, : max(1, height * 3 // 4) | 1, : max(1, width * 3 // 4) | 1]
    return [images[:2], np.ascontiguousarray(crop)]


def _check_output_folder(out: Path) -> bool:
    """True if `out` is a previous export to replace; False if it is new or empty.

    Raises:
        ExportError: `out` is a file, or a folder with other content.
    """
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; pass a folder for the artifacts")
    if not out.is_dir():
        return False
    names = sorted(entry.name for entry in out.iterdir())
    if not names:
        return False
    foreign = [n for n in names if n not in EXPORT_FILES]
    if foreign or SPEC_FILENAME not in names:
        example = foreign[0] if foreign else names[0]
        raise ExportError(
            f"--out {out} already holds files that are not a cosa export (e.g. {example!r}); pass "
            "a new or empty folder (a previous export folder is replaced)"
        )
    return True


def _make_stage(out: Path) -> Path:
    """Create the hidden temporary folder beside `out`.

    Raises:
        ExportError: the parent folder cannot be created or written.
    """
    parent = out.absolute().parent
    try:
        return new_staging_folder(out.absolute())
    except OSError as exc:
        raise ExportError(
            f"--out {out}: cannot write to {parent} ({exc.strerror or exc}); pass a writable folder"
        ) from exc


def _install(stage: Path, out: Path, previous: bool) -> None:
    """Move `stage` to `out`. A previous export is moved aside first and deleted after."""
    replace_folder(stage, out)
    if previous:
        logger.info("replaced the previous export in %s", out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
