"""One export folder, every backend, one network: `cosa.export.layout.choose_artifact` is the only
place that decides which file runs, and every caller asks it.

The export folders are `serving_fixtures.make_export` stand-ins (one-Conv graphs, each with its own
weights, so a copied file is told apart by its bytes; `model.plan` is bytes: TensorRT does not run
here), with the synthetic benchmark's classes, so `cosa eval` scores them on a two-image split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving_fixtures import make_export
from typer.testing import CliRunner

from cli import app
from cosa.choices import Precision
from cosa.data import write_synthetic_dataset
from cosa.errors import ConfigError
from cosa.export.layout import (
    FILES,
    ArtifactMissingError,
    Machine,
    Role,
    Runtime,
    choose_artifact,
    listed_roles,
    open_artifact,
)
from cosa.export.spec import ModelSpec, read_spec
from cosa.serving.benchmark import BenchmarkOptions, benchmark_artifacts
from cosa.serving.runners import OnnxRuntimeRunner
from cosa.serving.triton_repo import write_repository

X86 = Machine("cpu", "x86_64")
ARM = Machine("cpu", "aarch64")

# The file onnxruntime on a CPU runs for the export's precision.
ON_CPU = {"fp32": Role.FP32_ORT, "fp16": Role.FP16, "int8": Role.INT8_CPU}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, 1, 2, 0, seed=0)
    return root


@pytest.mark.parametrize("plan", [False, True], ids=["onnx", "plan"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_backend_runs_the_same_network(
    tmp_path: Path, dataset: Path, precision: str, plan: bool
) -> None:
    folder = make_export(tmp_path / "export", precision, plan)
    expected = folder / FILES[ON_CPU[precision]]
    cli = CliRunner()

    # Local onnxruntime (cosa segment, cosa stream).
    with OnnxRuntimeRunner(folder) as runner:
        assert runner.path == expected
        assert runner.artifact.precision == precision
    image = tmp_path / "img.png"
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(image)
    res = cli.invoke(
        app,
        [
            "segment",
            str(image),
            "--model",
            str(folder),
            "--out",
            str(tmp_path / "masks"),
            "--backend",
            "onnxruntime",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    segment_model = json.loads(res.stdout)["model"]
    assert segment_model["file"] == str(expected) and segment_model["precision"] == precision

    # cosa eval DIR scores that file.
    res = cli.invoke(
        app,
        ["eval", str(folder), "--data", str(dataset), "--backend", "onnxruntime", "--json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["artifact"]["file"] == str(expected)

    # Triton: the CPU platforms serve it, byte for byte; --json names it.
    for platform, kind in (("python", None), ("onnxruntime", "cpu"), ("onnxruntime", "auto")):
        layout = write_repository(
            folder,
            tmp_path / f"repo_{platform}_{kind}",
            platform,
            instance_kind=kind,
            ensemble=False,
        )
        assert layout.artifact is not None and layout.artifact["file"] == str(expected)
        served = layout.root / layout.segmentation / "1" / "model.onnx"
        assert served.read_bytes() == expected.read_bytes()
    res = cli.invoke(
        app, ["triton", "repo", str(folder), "--out", str(tmp_path / "repo_cli"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["artifact"]["file"] == str(expected)

    # GPU-side runtimes run the same precision: an INT8 export stays INT8 everywhere.
    on_gpu = write_repository(
        folder, tmp_path / "repo_gpu", "onnxruntime", instance_kind="gpu", ensemble=False
    )
    assert on_gpu.artifact is not None and on_gpu.artifact["precision"] == precision
    if plan:
        engine, _ = open_artifact(folder, Runtime.TENSORRT)  # what TensorRTRunner opens
        assert engine.path == folder / "model.plan" and engine.precision == precision
        served = write_repository(folder, tmp_path / "repo_trt", "tensorrt", ensemble=False)
        assert served.artifact is not None and served.artifact["file"] == str(engine.path)
    else:
        with pytest.raises(ArtifactMissingError, match=r"--trt"):
            open_artifact(folder, Runtime.TENSORRT)

    # cosa benchmark marks that file as the one `cosa segment` runs.
    report = benchmark_artifacts(
        folder,
        BenchmarkOptions(
            backends=("onnxruntime",),
            batches=(1,),
            size=(8, 8),
            repeats=1,
            min_seconds=0.0,
            warmup=0,
        ),
    )
    chosen = {row.file for row in report.networks if row.chosen and row.precision == precision}
    assert chosen == {str(expected)}


@pytest.mark.parametrize(
    ("runtime", "machine", "expected"),
    [
        (Runtime.ONNXRUNTIME, X86, Role.INT8_CPU),
        (Runtime.ONNXRUNTIME, ARM, Role.INT8_CPU),
        (Runtime.ONNXRUNTIME, Machine("any"), Role.INT8_CPU),  # Triton KIND_AUTO
        (Runtime.ONNXRUNTIME, Machine("cuda"), Role.INT8),  # no QLinearConv on CUDA
        (Runtime.ONNXRUNTIME_TENSORRT, Machine("cuda"), Role.INT8),
    ],
)
def test_int8_file_depends_on_where_it_runs(
    tmp_path: Path, runtime: Runtime, machine: Machine, expected: Role
) -> None:
    folder = make_export(tmp_path / "export", "int8", plan=False)
    choice = choose_artifact(folder, read_spec(folder), runtime, None, machine)
    assert (choice.role, choice.precision, choice.warning) == (expected, Precision.INT8, None)


def test_old_int8_export_warns_on_x86_only(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "export", "int8", plan=False)
    spec = read_spec(folder)
    old = ModelSpec(
        class_names=spec.class_names,
        palette=spec.palette,
        precision="int8",
        artifact="model.int8.onnx",
        extra_artifacts={"fp32": "model.onnx", "int8": "model.int8.onnx"},  # no int8_cpu
    )
    on_x86 = choose_artifact(folder, old, Runtime.ONNXRUNTIME, None, X86)
    assert on_x86.role is Role.INT8
    assert on_x86.warning is not None and "model.int8_cpu.onnx" in on_x86.warning
    assert choose_artifact(folder, old, Runtime.ONNXRUNTIME, None, ARM).warning is None


def test_precision_asked_overrides_the_exports(tmp_path: Path) -> None:
    folder = make_export(tmp_path / "export", "int8", plan=True)
    spec = read_spec(folder)
    fp32 = choose_artifact(folder, spec, Runtime.ONNXRUNTIME, "fp32", X86)
    assert fp32.path.name == "model.ort.onnx"
    assert choose_artifact(folder, spec, "onnxruntime", "fp32", X86, fused=False).path.name == (
        "model.onnx"
    )
    with pytest.raises(ConfigError, match=r"TensorRT engine in .* is int8, not fp16"):
        choose_artifact(folder, spec, Runtime.TENSORRT, "fp16")
    with pytest.raises(
        ArtifactMissingError,
        match=r"has no fp16 artifact; available: tensorrt \(model.plan\), fp32 \(model.onnx\)",
    ):
        choose_artifact(folder, spec, Runtime.ONNXRUNTIME, "fp16", X86)
    with pytest.raises(ConfigError, match=r"unknown precision 'int4'; choose one of fp32"):
        choose_artifact(folder, spec, Runtime.ONNXRUNTIME, "int4", X86)


def test_listed_but_deleted_file_falls_back_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = make_export(tmp_path / "export", "int8", plan=False)
    (folder / "model.int8_cpu.onnx").unlink()
    with caplog.at_level(logging.WARNING, logger="cosa.export.layout"):
        choice = choose_artifact(folder, read_spec(folder), Runtime.ONNXRUNTIME, None, X86)
    assert choice.role is Role.INT8 and choice.warning is not None
    assert "model.int8_cpu.onnx but it is missing; using model.int8.onnx" in caplog.text
    (folder / "model.int8.onnx").unlink()
    with pytest.raises(ArtifactMissingError, match=r"model.int8_cpu.onnx named by .* is missing"):
        choose_artifact(folder, read_spec(folder), Runtime.ONNXRUNTIME, None, X86)


def test_roles_of_hand_written_specs(tmp_path: Path) -> None:
    spec = ModelSpec(class_names=("background", "a"), palette=((0, 0, 0), (1, 2, 3)))
    assert listed_roles(spec) == {Role.FP32: "model.onnx"}  # the primary, by its precision
    engine = ModelSpec(
        class_names=("background", "a"),
        palette=((0, 0, 0), (1, 2, 3)),
        precision="fp16",
        artifact="model.plan",
        extra_artifacts={"fp16": "model.fp16.onnx", "calibration": "calib.npz", "x": "y"},
    )
    assert listed_roles(engine) == {Role.TENSORRT: "model.plan", Role.FP16: "model.fp16.onnx"}
