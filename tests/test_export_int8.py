"""Calibration sets and explicit INT8 quantization on a small hand-built deploy graph."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cosa.errors import ExportError
from cosa.export.calibration import (
    MIN_CALIBRATION_IMAGES,
    CalibrationSet,
    load_calibration_set,
    read_calibration_set,
    save_calibration_set,
)
from cosa.export.int8 import (
    CALIBRATION_METHODS,
    default_nodes_to_exclude,
    quantize_int8,
    zero_points,
)
from cosa.export.onnx_export import check_graph
from cosa.export.verify import onnxruntime_runner

K = 3
SIZE = (24, 32)  # calibration (H, W)


def deploy_graph() -> onnx.ModelProto:
    """images -> normalise -> conv -> relu -> conv -> relu -> classifier -> resize -> logits,
    logits -> argmax -> mask; dynamic N, H, W."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.full((1, 3, 1, 1), 120.0, np.float32), "mean"),
        numpy_helper.from_array(np.full((1, 3, 1, 1), 60.0, np.float32), "std"),
        numpy_helper.from_array(rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (K, 8, 1, 1)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.ones(4, np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Sub", ["images", "mean"], ["centred"], name="sub"),
        helper.make_node("Div", ["centred", "std"], ["x"], name="div"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["f1"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["f1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["f2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["f2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["seg"], name="classifier"),
        helper.make_node(
            "Resize", ["seg", "", "scales"], ["logits"], name="upsample", mode="linear"
        ),
        helper.make_node("ArgMax", ["logits"], ["ids"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["ids"], ["mask"], name="to_int32", to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K, "H", "W"]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, ["N", "H", "W"]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth random colour images of varied sizes, half of them in a sub-folder, PNG and JPEG."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((40 + 3 * i, 30 + 2 * i), Image.Resampling.BILINEAR)
        sub = folder / "nested" if i % 2 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / (f"img{i}.png" if i % 3 else f"img{i}.JPG")
        image.save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    onnx.save(deploy_graph(), str(path))
    return path


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> CalibrationSet:
    folder = tmp_path_factory.mktemp("calib")
    write_images(folder, 10)
    return load_calibration_set(folder, SIZE, max_images=10)


# ----------------------------------------------------------------------------- calibration set


def test_calibration_set_reads_recursively_and_fits_size(tmp_path: Path) -> None:
    write_images(tmp_path, 9)
    calib = load_calibration_set(tmp_path, SIZE, max_images=50)
    assert calib.images.shape == (9, 3, *SIZE) and calib.images.dtype == np.uint8
    assert sum(f.startswith("nested/") for f in calib.files) == 4
    assert len(set(calib.files)) == 9 and calib.skipped == ()
    assert calib.images.std() > 5  # real pixels, not a blank fill


def test_calibration_set_is_capped_and_deterministic(tmp_path: Path) -> None:
    write_images(tmp_path, 12)
    first = load_calibration_set(tmp_path, SIZE, max_images=8)
    second = load_calibration_set(tmp_path, SIZE, max_images=8)
    assert first.count == 8
    assert first.files == second.files and first.sha256() == second.sha256()
    other_seed = load_calibration_set(tmp_path, SIZE, max_images=8, seed=1)
    assert other_seed.files != first.files  # the draw follows the seed, not the file order


def test_broken_images_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_images(tmp_path, MIN_CALIBRATION_IMAGES)
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "nested" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cosa.export.calibration"):
        calib = load_calibration_set(tmp_path, SIZE, max_images=100)
    assert calib.count == MIN_CALIBRATION_IMAGES
    assert sorted(calib.skipped) == ["nested/empty.jpg", "truncated.png"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("skipping calibration image" in m for m in warned)
    assert calib.summary()["skipped"] == 2


def test_too_few_readable_images_is_an_error(tmp_path: Path) -> None:
    write_images(tmp_path, MIN_CALIBRATION_IMAGES - 2)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(
        ExportError,
        match=r"only 6 readable images \(1 unreadable skipped\); INT8 "
        r"calibration needs at least 8",
    ):
        load_calibration_set(tmp_path, SIZE)


def test_folder_without_images_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ExportError, match="holds no images"):
        load_calibration_set(tmp_path, SIZE)


def test_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="is not a folder"):
        load_calibration_set(tmp_path / "absent", SIZE)


def test_calib_size_below_minimum_is_an_error(tmp_path: Path) -> None:
    write_images(tmp_path, 10)
    with pytest.raises(ExportError, match="--calib-size 4 is below the minimum of 8"):
        load_calibration_set(tmp_path, SIZE, max_images=4)


def test_calibration_set_round_trips_through_npz(
    tmp_path: Path, calibration: CalibrationSet
) -> None:
    path = save_calibration_set(calibration, tmp_path / "calib.npz")
    loaded = read_calibration_set(path)
    np.testing.assert_array_equal(loaded.images, calibration.images)
    assert loaded.files == calibration.files
    assert loaded.sha256() == calibration.sha256()
    assert [p.name for p in tmp_path.iterdir()] == ["calib.npz"]  # no temp file left


def test_read_calibration_set_rejects_other_files(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ExportError, match="is not a calibration archive"):
        read_calibration_set(path)


# ----------------------------------------------------------------------------- quantization


def test_default_exclusion_is_the_classifier_tail() -> None:
    assert default_nodes_to_exclude(deploy_graph()) == ["upsample", "classifier"]


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_int8_is_symmetric_per_channel_qdq(
    tmp_path: Path, fp32_model: Path, calibration: CalibrationSet, method: str
) -> None:
    result = quantize_int8(fp32_model, tmp_path / "model.int8.onnx", calibration, method, tmp_path)
    model = onnx.load(str(result.path))
    check_graph(model)  # names, dynamic dims, checker

    points = zero_points(model)
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes and result.quantized_nodes == len(quantize_nodes)
    for node in quantize_nodes:  # every QuantizeLinear zero-point initializer: int8 zeros
        assert points[node.name].dtype == np.int8
        assert not np.any(points[node.name])
    assert all(zp.dtype == np.int8 and not np.any(zp) for zp in points.values())  # DQ too
    conv_biases = {n.input[2] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2}
    assert conv_biases == {"b1", "b2"}  # float initializers: TensorRT rejects int32 bias DQ

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dequant = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    conv1 = next(n for n in model.graph.node if n.name.startswith("conv1"))
    weight_dq = dequant[conv1.input[1]]
    assert inits[weight_dq.input[1]].shape == (8,)  # one scale per output channel
    assert inits[weight_dq.input[0]].dtype == np.int8

    classifier = next(n for n in model.graph.node if n.name == "classifier")
    assert classifier.input[1] == "w3"  # excluded: float weight, no DequantizeLinear
    assert result.excluded_nodes == ("upsample", "classifier")


def test_int8_agrees_with_fp32_and_cpu_flavour_runs(
    tmp_path: Path, fp32_model: Path, calibration: CalibrationSet
) -> None:
    result = quantize_int8(
        fp32_model,
        tmp_path / "model.int8.onnx",
        calibration,
        "entropy",
        tmp_path,
        cpu_dst=tmp_path / "model.int8_cpu.onnx",
    )
    cpu = result.cpu_path
    assert cpu is not None
    cpu_ops = {n.op_type for n in onnx.load(str(cpu)).graph.node}
    assert "QLinearConv" in cpu_ops  # the QOperator format onnxruntime fuses on x86
    images = [
        calibration.images[:2].astype(np.float32),
        calibration.images[2:3, :, :17, :29].astype(np.float32),
    ]
    fp32 = onnxruntime_runner(fp32_model)
    reference = [fp32(batch) for batch in images]
    scale = max(float(np.abs(logits).max()) for logits, _ in reference)
    # The Q/DQ model evaluated exactly (what TensorRT computes), the CPU flavour with
    # onnxruntime's fused int8 kernels. Agreement is counted here, pixel by pixel, against the
    # FP32 model's argmax (not with the exporter's `compare`).
    for runner in (onnxruntime_runner(result.path, optimize=False), onnxruntime_runner(cpu)):
        for batch, (want_logits, _) in zip(images, reference, strict=True):
            logits, mask = runner(batch)
            assert mask.shape == want_logits.shape[:1] + want_logits.shape[2:]
            assert (mask == want_logits.argmax(axis=1)).mean() >= 0.97
            assert (
                0.0 < float(np.abs(logits - want_logits).max()) < 0.05 * scale
            )  # quantized, close


def test_extra_exclusions_are_added_and_unknown_ones_rejected(
    tmp_path: Path, fp32_model: Path, calibration: CalibrationSet
) -> None:
    result = quantize_int8(
        fp32_model, tmp_path / "a.onnx", calibration, "minmax", tmp_path, exclude_nodes=["conv2"]
    )
    assert result.excluded_nodes == ("upsample", "classifier", "conv2")
    conv2 = next(n for n in onnx.load(str(result.path)).graph.node if n.name == "conv2")
    assert conv2.input[1] == "w2"
    with pytest.raises(ExportError, match="'conv3' is not a node.*did you mean conv"):
        quantize_int8(
            fp32_model,
            tmp_path / "b.onnx",
            calibration,
            "minmax",
            tmp_path,
            exclude_nodes=["conv3"],
        )


def test_unknown_calibration_method_is_an_error(
    tmp_path: Path, fp32_model: Path, calibration: CalibrationSet
) -> None:
    with pytest.raises(ExportError, match="--calib-method 'kl' is not one of entropy"):
        quantize_int8(fp32_model, tmp_path / "a.onnx", calibration, "kl", tmp_path)


def test_zero_points_reads_initializers_constants_and_the_onnx_default() -> None:
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp_init = numpy_helper.from_array(np.array(3, np.int8), "zp_init")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale"], ["q0"], name="no_zp"),
        helper.make_node(
            "Constant",
            [],
            ["zp_const"],
            name="c",
            value=numpy_helper.from_array(np.array(0, np.int8)),
        ),
        helper.make_node("QuantizeLinear", ["x", "scale", "zp_const"], ["q1"], name="const_zp"),
        helper.make_node("DequantizeLinear", ["q1", "scale", "zp_init"], ["y"], name="init_zp"),
    ]
    graph = helper.make_graph(
        nodes,
        "zp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [scale, zp_init],
    )
    points = zero_points(helper.make_model(graph))
    assert points["no_zp"].dtype == np.uint8 and points["no_zp"] == 0  # ONNX default: uint8 0
    assert points["const_zp"].dtype == np.int8 and points["const_zp"] == 0
    assert points["init_zp"].dtype == np.int8 and points["init_zp"] == 3
