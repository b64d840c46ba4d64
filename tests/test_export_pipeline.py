"""`export_artifacts` end to end on the real tiny network, and every bad input of issue 4.

One export runs for the whole module (the dynamo export dominates the time): INT8 with calibration,
`--trt` and the default `ort_fusion="auto"` (a ViT, so model.ort.onnx too), into a folder that
holds a previous export. TensorRT is replaced at the pipeline seam
(`require_tensorrt`, `build_engine`, `EngineRunner`) by a stand-in whose "engine" is the ONNX run in
onnxruntime; the builder itself is tested against a fake TensorRT in test_export_tensorrt.py.
For speed the ViT-Ti's 12 blocks are cut to 2 after loading the checkpoint (same code path, fewer
repeats of the same block).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import KEEP_BLOCKS, save_net_checkpoint, shallow_loader
from PIL import Image
from typer.testing import CliRunner

from cli import app
from cosa.config import ModelConfig
from cosa.errors import CheckpointError, ExportError, MissingDependencyError
from cosa.export import pipeline
from cosa.export.fp16 import convert_to_fp16
from cosa.export.int8 import zero_points
from cosa.export.onnx_export import check_graph
from cosa.export.pipeline import ExportOptions, ExportResult, export_artifacts, parse_shape
from cosa.export.spec import ShapeProfile, read_spec
from cosa.export.tensorrt_build import EngineInfo
from cosa.export.verify import (
    FP16_TOLERANCE,
    compare,
    onnxruntime_runner,
    random_images,
    torch_runner,
)
from cosa.model import DeployModel, build_model

CLASS_NAMES = ["background", "disc", "ring", "star"]
PALETTE = [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
PROFILE = ShapeProfile(min=(1, 32, 32), opt=(1, 48, 64), max=(2, 96, 96))
VERIFY_SHAPES = ((1, 48, 48), (2, 37, 53), (1, 50, 70))


def write_checkpoint(path: Path) -> Path:
    cfg = ModelConfig(backbone="vit_tiny_patch16", decoder_channels=16)
    torch.manual_seed(0)
    net = build_model(cfg, num_classes=len(CLASS_NAMES) - 1, load_pretrained=False)
    return save_net_checkpoint(net, cfg, CLASS_NAMES, PALETTE, path)


def write_images(folder: Path, count: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((70 + i, 50 + i), Image.Resampling.BILINEAR).save(
            folder / f"img{i}.jpg"
        )
    return folder


def fake_build_engine(
    onnx_path: Path,
    plan_path: Path,
    profile: ShapeProfile,
    precision: str,
    workspace_mib: int,
    timing_cache: Path | None,
) -> EngineInfo:
    shutil.copyfile(onnx_path, plan_path)  # the stand-in "engine" is the ONNX itself
    return EngineInfo(
        path=plan_path,
        tensorrt_version="10.13.0.35",
        gpu_name="Fake GPU",
        precision=precision,
        builder_flags=("INT8", "FP16"),
        timing_cache=Path("unused"),
        build_seconds=0.0,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[tuple[ExportResult, DeployModel]]:
    root = tmp_path_factory.mktemp("e2e")
    out = root / "artifacts"
    out.mkdir()  # a previous export, with a file the new one will not write
    (out / "spec.json").write_text("{}")
    (out / "model.fp16.onnx").write_bytes(b"stale")
    options = ExportOptions(
        precision="int8",
        calib_dir=write_images(root / "calib", 10),
        calib_size=8,
        calib_method="percentile",
        trt=True,
        min_shape=PROFILE.min,
        opt_shape=PROFILE.opt,
        max_shape=PROFILE.max,
        verify_shapes=VERIFY_SHAPES,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "load_deploy_model", shallow_loader)
        mp.setattr(pipeline, "require_tensorrt", lambda: (None, "Fake GPU"))
        mp.setattr(pipeline, "build_engine", fake_build_engine)
        mp.setattr(pipeline, "EngineRunner", onnxruntime_runner)
        result = export_artifacts(checkpoint, out, options)
    model, _ = shallow_loader(checkpoint)
    yield result, model


# ------------------------------------------------------------------------------ end to end


def test_folder_holds_exactly_the_artifacts_and_no_temp_folder(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, _ = exported
    names = sorted(p.name for p in result.out.iterdir())
    assert names == [
        "calib.npz",
        "model.int8.onnx",
        "model.int8_cpu.onnx",
        "model.onnx",
        "model.ort.onnx",
        "model.plan",
        "spec.json",
    ]
    assert sorted(p.name for p in result.out.parent.iterdir()) == ["artifacts", "calib"]
    assert result.replaced_previous  # the stale model.fp16.onnx went with the old export
    assert result.primary == result.out / "model.plan"
    assert oct(result.out.stat().st_mode & 0o777) == "0o755"
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in result.out.iterdir())  # readable


def test_spec_records_artifacts_profile_engine_and_source(
    exported: tuple[ExportResult, DeployModel], checkpoint: Path
) -> None:
    result, _ = exported
    spec = read_spec(result.out)
    assert spec.class_names == tuple(CLASS_NAMES)
    assert spec.palette == tuple(tuple(c) for c in PALETTE)
    assert (spec.precision, spec.artifact, spec.opset) == ("int8", "model.plan", 18)
    assert spec.profile == PROFILE
    assert (spec.tensorrt_version, spec.gpu_name) == ("10.13.0.35", "Fake GPU")
    assert spec.extra_artifacts == {
        "fp32": "model.onnx",
        "fp32_ort": "model.ort.onnx",
        "calibration": "calib.npz",
        "int8": "model.int8.onnx",
        "int8_cpu": "model.int8_cpu.onnx",
        "tensorrt": "model.plan",
    }
    assert (spec.fusion or {})["attention_layers"] == KEEP_BLOCKS  # default "auto" fused the ViT
    assert spec.backbone == "vit_tiny_patch16"
    assert spec.source_checkpoint_sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert set(spec.verification or {}) == {
        "model.onnx",
        "model.ort.onnx",
        "model.int8.onnx",
        "model.int8_cpu.onnx",
        "model.plan",
    }


def test_fp32_onnx_verification_covers_odd_shapes(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    entry = exported[0].spec.verification["model.onnx"]  # type: ignore[index]
    assert entry["reference"] == "torch eager fp32"
    assert [s["shape"] for s in entry["shapes"]] == [[1, 3, 48, 48], [2, 3, 37, 53], [1, 3, 50, 70]]
    assert entry["max_abs_diff"] < 1e-4
    assert entry["min_mask_agreement"] >= 0.999


def test_onnx_names_dims_and_round_trip(exported: tuple[ExportResult, DeployModel]) -> None:
    result, model = exported
    proto = onnx.load(str(result.out / "model.onnx"))
    check_graph(proto, opset=18)
    assert [v.name for v in proto.graph.input] == ["images"]
    assert [v.name for v in proto.graph.output] == ["logits", "mask"]
    dims = [d for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    assert dims[1].dim_value == 3
    # Independently of the pipeline's own check: other odd sizes, larger batch.
    images = random_images([(3, 29, 61), (1, 64, 17), (2, 45, 45)], seed=7)
    report = compare(
        onnxruntime_runner(result.out / "model.onnx"),
        torch_runner(model),
        images,
        artifact="model.onnx",
        reference_name="torch",
        images_name="random",
        tolerance=pipeline.FP32_TOLERANCE,
    )
    assert report.max_abs_diff < 1e-4 and report.min_mask_agreement >= 0.999


def test_int8_zero_points_calibration_archive_and_summary(
    exported: tuple[ExportResult, DeployModel],
) -> None:
    result, _ = exported
    quantized = onnx.load(str(result.out / "model.int8.onnx"))
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    quantize_nodes = [n for n in quantized.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) >= 8  # inputs of the patch conv, 4 MatMuls x 2 blocks, decoder
    for node in quantize_nodes:
        zero_point = initializers[node.input[2]]
        assert zero_point.dtype == np.int8 and not np.any(zero_point), node.name
    assert not any(np.any(z) for z in zero_points(quantized).values())

    with np.load(result.out / "calib.npz") as archive:
        assert archive["images"].shape == (8, 3, 48, 64)
        assert archive["images"].dtype == np.uint8
        assert len(archive["files"]) == 8
    summary = result.spec.calibration or {}
    assert summary["method"] == "percentile" and summary["count"] == 8
    assert summary["size"] == [48, 64] and summary["file"] == "calib.npz"
    assert summary["scheme"].startswith("symmetric int8 Q/DQ")
    assert summary["excluded_nodes"] and summary["quantized_tensors"] == len(quantize_nodes)
    assert len(summary["sha256"]) == 64
    # the excluded classifier keeps its float weight: no node named in the exclusion is quantized
    excluded = [n for n in quantized.graph.node if n.name in summary["excluded_nodes"]]
    assert any(n.op_type == "Conv" for n in excluded)


def test_int8_masks_agree_with_fp32(exported: tuple[ExportResult, DeployModel]) -> None:
    """Recomputed here from the artifacts' own outputs (onnxruntime sessions opened by the test,
    masks compared pixel by pixel), not read from the exporter's report: the report must agree."""
    import onnxruntime as ort

    result, _ = exported
    with np.load(result.out / "calib.npz") as archive:
        images = archive["images"].astype(np.float32)

    def masks(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits, mask = session.run(["logits", "mask"], {"images": images})
        np.testing.assert_array_equal(mask, logits.argmax(axis=1))
        return mask

    reference = masks(result.out / "model.onnx")
    verification = exported[0].spec.verification or {}
    for name in ("model.int8.onnx", "model.int8_cpu.onnx"):  # the mIoU proxy of the tiny model
        per_image = (masks(result.out / name) == reference).mean(axis=(1, 2))
        assert per_image.min() >= 0.9, name
        assert verification[name]["images"].startswith("calibration images")
        reported = verification[name]["min_mask_agreement"]
        assert reported == pytest.approx(per_image.min(), abs=0.02), name


def test_engine_was_compared_in_the_profile(exported: tuple[ExportResult, DeployModel]) -> None:
    entry = (exported[0].spec.verification or {})["model.plan"]
    assert entry["reference"] == "model.int8.onnx in onnxruntime (Q/DQ evaluated exactly)"
    shapes = [tuple(s["shape"]) for s in entry["shapes"]]
    assert shapes[:2] == [(1, 3, 32, 32), (1, 3, 48, 64)] and len(shapes) == 3


def test_result_json_is_machine_readable(exported: tuple[ExportResult, DeployModel]) -> None:
    data = json.loads(exported[0].to_json())
    assert data["precision"] == "int8" and data["primary"].endswith("model.plan")
    assert set(data["files"]) == {
        "fp32",
        "fp32_ort",
        "int8",
        "int8_cpu",
        "calibration",
        "tensorrt",
        "spec",
    }
    assert exported[0].onnx_path == exported[0].out / "model.onnx"
    assert data["verification"]["model.onnx"]["max_abs_diff"] < 1e-4
    assert data["tensorrt_version"] == "10.13.0.35"


def test_cli_passes_ort_fusion_default_auto_and_lists_the_fused_graph(
    exported: tuple[ExportResult, DeployModel],
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `cosa export` up to the library call, which returns the module's export (no second one).
    received: list[ExportOptions] = []

    def export_once(ckpt: Path, out: Path, options: ExportOptions) -> ExportResult:
        received.append(options)
        return exported[0]

    monkeypatch.setattr(pipeline, "export_artifacts", export_once)
    args = ["export", str(checkpoint), "--out", str(tmp_path / "out")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "verified model.ort.onnx against torch eager fp32" in res.output
    res = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(res.output)["files"]["fp32_ort"].endswith("model.ort.onnx")
    for mode in ("on", "off"):
        assert CliRunner().invoke(app, [*args, "--ort-fusion", mode, "--json"]).exit_code == 0
    assert [options.ort_fusion for options in received] == ["auto", "auto", "on", "off"]


def test_fp16_of_the_real_export_loads_and_matches(
    exported: tuple[ExportResult, DeployModel], tmp_path: Path
) -> None:
    fp32 = exported[0].out / "model.onnx"
    fp16 = convert_to_fp16(fp32, tmp_path / "model.fp16.onnx")
    check_graph(onnx.load(str(fp16)))
    report = compare(
        onnxruntime_runner(fp16),
        onnxruntime_runner(fp32),
        random_images([(1, 48, 48), (2, 37, 53)]),
        artifact="fp16",
        reference_name="fp32",
        images_name="random",
        tolerance=FP16_TOLERANCE,
    )
    assert report.max_abs_diff > 0.0 and report.min_mask_agreement >= 0.98


# ------------------------------------------------------------------------------ bad input


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        export_artifacts(tmp_path / "absent.pt", tmp_path / "out", ExportOptions())
    assert _entries(tmp_path) == []


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00 this is not a torch file")
    with pytest.raises(CheckpointError, match="corrupt"):
        export_artifacts(bad, tmp_path / "out", ExportOptions())
    assert _entries(tmp_path) == ["bad.pt"]


def test_out_under_a_file_is_not_writable(tmp_path: Path, checkpoint: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="cannot write to"):
        export_artifacts(checkpoint, blocker / "out", ExportOptions())
    assert _entries(tmp_path) == ["file"]


def test_read_only_parent_is_not_writable(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refusal a read-only folder gives, raised where the export first writes: root (as CI
    # runs) ignores directory permissions, so a real chmod would prove nothing there.
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(out: Path) -> Path:  # where the export first writes: its staging folder
        raise PermissionError(13, "Permission denied", str(out.parent))

    monkeypatch.setattr(pipeline, "new_staging_folder", refuse)
    with pytest.raises(ExportError, match=r"cannot write to .*locked \(Permission denied\)"):
        export_artifacts(checkpoint, locked / "out", ExportOptions())
    assert _entries(locked) == []


def test_out_that_is_a_file(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_artifacts(checkpoint, tmp_path / "out", ExportOptions())


def test_out_with_foreign_files_is_refused_and_kept(tmp_path: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a cosa export.*'notes.txt'"):
        export_artifacts(checkpoint, out, ExportOptions())
    assert _entries(out) == ["notes.txt", "spec.json"]
    assert _entries(tmp_path) == ["out"]


def test_empty_calibration_folder(tmp_path: Path, checkpoint: Path) -> None:
    (tmp_path / "calib").mkdir()
    options = ExportOptions(precision="int8", calib_dir=tmp_path / "calib")
    with pytest.raises(ExportError, match="holds no images"):
        export_artifacts(checkpoint, tmp_path / "out", options)
    assert _entries(tmp_path) == ["calib"]


def test_calibration_folder_below_minimum_after_skipping_broken(
    tmp_path: Path, checkpoint: Path
) -> None:
    calib = write_images(tmp_path / "calib", 5)
    (calib / "broken.jpg").write_bytes(b"garbage")
    options = ExportOptions(precision="int8", calib_dir=calib)
    with pytest.raises(ExportError, match=r"only 5 readable images \(1 unreadable skipped\)"):
        export_artifacts(checkpoint, tmp_path / "out", options)
    assert _entries(tmp_path) == ["calib"]


def test_trt_without_tensorrt_fails_before_writing(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="TensorRT 10.x or 11.x"):
        export_artifacts(checkpoint, tmp_path / "out", ExportOptions(trt=True))
    assert _entries(tmp_path) == []


def test_failure_mid_build_leaves_no_partial_folder(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_export(*args: object, **kwargs: object) -> Path:
        raise ExportError("simulated exporter failure")

    monkeypatch.setattr(pipeline, "export_onnx", failing_export)
    with pytest.raises(ExportError, match="simulated exporter failure"):
        export_artifacts(checkpoint, tmp_path / "out", ExportOptions())
    assert _entries(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "int8"}, "--precision int8 needs calibration images: pass --calib DIR"),
        ({"precision": "int4"}, "--precision 'int4' is not one of fp32, fp16, int8"),
        ({"calib_dir": Path("x")}, "--calib is only used with --precision int8"),
        (
            {"precision": "int8", "calib_dir": Path("x"), "calib_method": "kl"},
            "--calib-method 'kl' is not one of",
        ),
        (
            {"precision": "int8", "calib_dir": Path("x"), "calib_size": 3},
            "--calib-size 3 is below the minimum",
        ),
        ({"exclude_nodes": ("conv",)}, "--exclude-node only applies to --precision int8"),
        ({"opset": 17}, "--opset 17 is not supported"),
        ({"opset": 99}, "--opset 99 is not supported"),
        (
            {"min_shape": (1, 512, 512), "max_shape": (8, 448, 1024)},
            "H is min 512, opt 448, max 448",
        ),
        ({"opt_shape": (16, 448, 448)}, "N is min 1, opt 16, max 8"),
        ({"workspace_mib": 0}, "workspace 0 MiB is invalid"),
    ],
)
def test_invalid_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExportOptions(**kwargs)


@pytest.mark.parametrize(
    ("text", "shape"),
    [("1x448x448", (1, 448, 448)), ("8X1024x512", (8, 1024, 512)), (" 2 x 3 x 4 ", (2, 3, 4))],
)
def test_parse_shape(text: str, shape: tuple[int, int, int]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["448x448", "1x448x448x3", "axbxc", "1x0x448", "1x-2x448", ""])
def test_parse_shape_rejects_bad_text(text: str) -> None:
    with pytest.raises(ExportError, match="--min-shape .* is not NxHxW"):
        parse_shape(text, option="--min-shape")
