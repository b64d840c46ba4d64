"""Structural ONNX checks, numerical verification and FP16 conversion on small hand-built graphs.

The dynamo export of the real network is exercised end to end in test_export_pipeline.py; here the
graphs are built with `onnx.helper` so that every check can be made to fail on purpose, fast.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cosa.errors import ExportError
from cosa.export.fp16 import convert_to_fp16
from cosa.export.onnx_export import (
    MAX_OPSET,
    MIN_OPSET,
    check_graph,
    is_generated_name,
    validate_opset,
)
from cosa.export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    INT8_TOLERANCE,
    Runner,
    Tolerance,
    VerificationReport,
    compare,
    onnxruntime_runner,
    random_images,
)

K = 3  # classes incl. background


def deploy_graph(
    input_name: str = "images",
    outputs: tuple[str, str] = ("logits", "mask"),
    fixed_hw: bool = False,
    opset: int = 18,
) -> onnx.ModelProto:
    """images (N,3,H,W) -> normalise -> conv3x3 -> relu -> 1x1 classifier -> logits -> argmax."""
    rng = np.random.default_rng(0)
    h, w = (32, 32) if fixed_hw else ("H", "W")
    inits = [
        numpy_helper.from_array(np.full((1, 3, 1, 1), 120.0, np.float32), "mean"),
        numpy_helper.from_array(np.full((1, 3, 1, 1), 60.0, np.float32), "std"),
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (K, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros((K,), np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Sub", [input_name, "mean"], ["centred"], name="sub"),
        helper.make_node("Div", ["centred", "std"], ["x"], name="div"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["f"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["f"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], [outputs[0]], name="classifier"),
        helper.make_node("ArgMax", [outputs[0]], ["ids"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["ids"], [outputs[1]], name="to_int32", to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 3, h, w])],
        [
            helper.make_tensor_value_info(outputs[0], TensorProto.FLOAT, ["N", K, h, w]),
            helper.make_tensor_value_info(outputs[1], TensorProto.INT32, ["N", h, w]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_check_graph_accepts_a_deploy_graph() -> None:
    check_graph(deploy_graph(), opset=18)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_name": "input.1"}, "generated inputs names ['input.1']"),
        ({"outputs": ("logits", "308")}, "generated outputs names ['308']"),
        ({"input_name": "rgb"}, "has inputs ['rgb']; the deploy graph needs exactly ['images']"),
        ({"outputs": ("mask", "logits")}, "has outputs ['mask', 'logits']"),
        ({"fixed_hw": True}, "images has fixed dims [2, 3]"),
    ],
)
def test_check_graph_rejects_wrong_names_and_fixed_dims(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=re.escape(message)):
        check_graph(deploy_graph(**kwargs))


def test_check_graph_rejects_an_opset_other_than_requested() -> None:
    with pytest.raises(ExportError, match="has opset 18, 20 was requested"):
        check_graph(deploy_graph(opset=18), opset=20)


def test_check_graph_rejects_an_invalid_graph() -> None:
    model = deploy_graph()
    model.graph.node[2].input[1] = "missing_weight"
    with pytest.raises(ExportError, match="fails onnx.checker"):
        check_graph(model)


@pytest.mark.parametrize("name", ["308", "input.1", "onnx::Conv_5", "val_12", "x.3"])
def test_generated_names_are_recognised(name: str) -> None:
    assert is_generated_name(name)


@pytest.mark.parametrize("name", ["images", "logits", "mask", "conv_out"])
def test_declared_names_are_not_generated(name: str) -> None:
    assert not is_generated_name(name)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, MAX_OPSET + 1, 0])
def test_opset_out_of_range_is_an_error(opset: int) -> None:
    with pytest.raises(ExportError, match=f"--opset {opset} is not supported.*between 18 and"):
        validate_opset(opset)


def test_opset_range_bounds_are_accepted() -> None:
    assert validate_opset(MIN_OPSET) == MIN_OPSET
    assert validate_opset(MAX_OPSET) == MAX_OPSET


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _numpy_reference(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tiny graph computed by hand in numpy: the reference an ONNX runtime must match."""
    w = {t.name: numpy_helper.to_array(t) for t in deploy_graph().graph.initializer}
    x = (images - w["mean"]) / w["std"]
    _, _, height, width = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack(
        [padded[:, :, i : i + height, j : j + width] for i in range(3) for j in range(3)], axis=2
    )  # (N, 3, 9, H, W)
    features = np.einsum("ocq,ncqhw->nohw", w["w1"].reshape(8, 3, 9), patches)
    features = np.maximum(features + w["b1"][None, :, None, None], 0.0)
    logits = np.einsum("oc,nchw->nohw", w["w2"][:, :, 0, 0], features)
    logits = logits + w["b2"][None, :, None, None]
    return logits.astype(np.float32), logits.argmax(1).astype(np.int32)


def _against_reference(
    run: Runner,
    tolerance: Tolerance,
    artifact: str = "a",
    reference_name: str = "ref",
    images: list[np.ndarray] | None = None,
) -> VerificationReport:
    """`compare` of `run` with the numpy reference on one random 16 x 24 image (or `images`)."""
    return compare(
        run,
        _numpy_reference,
        random_images([(1, 16, 24)]) if images is None else images,
        artifact=artifact,
        reference_name=reference_name,
        images_name="random",
        tolerance=tolerance,
    )


def test_onnxruntime_matches_reference_at_odd_shapes(tmp_path: Path) -> None:
    path = _save(deploy_graph(), tmp_path / "model.onnx")
    images = random_images([(1, 32, 32), (2, 21, 37), (1, 17, 50)])
    report = compare(
        onnxruntime_runner(path),
        _numpy_reference,
        images,
        artifact="model.onnx",
        reference_name="numpy",
        images_name="random",
        tolerance=FP32_TOLERANCE,
    )
    assert [r.shape for r in report.results] == [(1, 3, 32, 32), (2, 3, 21, 37), (1, 3, 17, 50)]
    assert report.max_abs_diff < 1e-3
    assert report.min_mask_agreement > 0.999
    entry = report.to_json_dict()
    assert entry["reference"] == "numpy" and entry["passed"] is True
    assert entry["tolerance"]["atol"] == FP32_TOLERANCE.atol
    assert len(entry["shapes"]) == 3 and entry["shapes"][1]["shape"] == [2, 3, 21, 37]


def test_compare_raises_when_logits_drift_beyond_tolerance() -> None:
    def drifted(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = _numpy_reference(images)
        return logits + 0.5, mask

    with pytest.raises(ExportError, match=r"at 1x3x16x24: max \|logits diff\| 0.5 >"):
        _against_reference(drifted, FP32_TOLERANCE, artifact="a.onnx")


def test_compare_checks_only_masks_for_int8_tolerance() -> None:
    def shifted(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = _numpy_reference(images)
        return logits + 0.5, mask  # same argmax

    report = _against_reference(shifted, INT8_TOLERANCE)
    assert report.max_abs_diff == pytest.approx(0.5, abs=1e-5)
    assert report.min_mask_agreement == 1.0


def _half_flipped(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference with the class of the top half of every mask changed."""
    logits, mask = _numpy_reference(images)
    mask = mask.copy()
    mask[:, : mask.shape[1] // 2] = (mask[:, : mask.shape[1] // 2] + 1) % K
    return logits, mask


def test_compare_raises_on_mask_disagreement() -> None:
    tol = Tolerance(atol=1.0, rtol=0.0, min_mask_agreement=0.9)
    with pytest.raises(ExportError, match=r"mask agreement 0.5000 < 0.9"):
        _against_reference(_half_flipped, tol)


def test_int8_tolerance_records_a_miss_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    report = _against_reference(
        _half_flipped, INT8_TOLERANCE, artifact="model.int8.onnx", reference_name="model.onnx"
    )
    assert not report.passed
    assert report.failures == (
        "model.int8.onnx disagrees with model.onnx at 1x3x16x24: mask agreement 0.5000 < 0.9; "
        "for INT8 try another --calib-method, more calibration images, or exclude sensitive "
        "nodes",
    )
    assert report.to_json_dict()["passed"] is False
    assert any(
        r.levelname == "WARNING" and "0.5000 < 0.9" in r.getMessage() for r in caplog.records
    )


def test_compare_raises_on_wrong_output_shape_or_dtype() -> None:
    def wrong_dtype(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = _numpy_reference(images)
        return logits, mask.astype(np.int64)

    def wrong_size(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, mask = _numpy_reference(images)
        return logits[..., :-1], mask[..., :-1]

    with pytest.raises(ExportError, match="returns float32/int64"):
        _against_reference(wrong_dtype, FP32_TOLERANCE)
    with pytest.raises(ExportError, match=r"returns logits \(1, 3, 16, 23\)"):
        _against_reference(wrong_size, FP32_TOLERANCE)


def test_onnxruntime_runner_reports_an_unloadable_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="onnxruntime cannot load .*broken.onnx"):
        onnxruntime_runner(path)


def test_fp16_has_half_weights_float_io_and_matches_fp32(tmp_path: Path) -> None:
    fp32 = _save(deploy_graph(), tmp_path / "model.onnx")
    fp16 = convert_to_fp16(fp32, tmp_path / "model.fp16.onnx")

    model = onnx.load(str(fp16))
    check_graph(model)  # names, dynamic dims and onnx.checker survive the conversion
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["w1"] == TensorProto.FLOAT16 and weights["w2"] == TensorProto.FLOAT16
    io_types = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    assert io_types == [TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.INT32]

    images = random_images([(1, 32, 32), (2, 21, 37)])
    report = compare(
        onnxruntime_runner(fp16),
        onnxruntime_runner(fp32),
        images,
        artifact=fp16.name,
        reference_name=fp32.name,
        images_name="random",
        tolerance=FP16_TOLERANCE,
    )
    assert 0.0 < report.max_abs_diff < 0.05  # really half precision, and close
    assert report.min_mask_agreement >= FP16_TOLERANCE.min_mask_agreement


def test_fp16_keeps_requested_nodes_in_fp32(tmp_path: Path) -> None:
    fp32 = _save(deploy_graph(), tmp_path / "model.onnx")
    fp16 = convert_to_fp16(fp32, tmp_path / "model.fp16.onnx", keep_fp32_nodes=["classifier"])
    weights = {t.name: t.data_type for t in onnx.load(str(fp16)).graph.initializer}
    assert weights["w2"] == TensorProto.FLOAT
    assert weights["w1"] == TensorProto.FLOAT16


def _transformer_like_graph() -> onnx.ModelProto:
    """images -> 1x1 conv (8 ch) -> LayerNormalization -> Softmax over channels -> 1x1 conv."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.05, (8, 3, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (K, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.ones(8, np.float32), "ln_scale"),
        numpy_helper.from_array(np.zeros(8, np.float32), "ln_bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["images", "w1"], ["f"], name="embed"),
        helper.make_node("Transpose", ["f"], ["f_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node(
            "LayerNormalization",
            ["f_nhwc", "ln_scale", "ln_bias"],
            ["normed"],
            name="norm",
            axis=-1,
        ),
        helper.make_node("Softmax", ["normed"], ["attn"], name="attention", axis=-1),
        helper.make_node("Transpose", ["attn"], ["a_nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["a_nchw", "w2"], ["logits"], name="classifier"),
        helper.make_node("ArgMax", ["logits"], ["ids"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["ids"], ["mask"], name="to_int32", to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "transformer_like",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", K, "H", "W"]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, ["N", "H", "W"]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_keeps_layer_norm_and_softmax_in_fp32(tmp_path: Path) -> None:
    # TensorRT 11 builds every network strongly typed: an op runs in the precision its inputs
    # have in the ONNX. LayerNorm's variance and Softmax's exponentials overflow FP16 (65504).
    fp32 = _save(_transformer_like_graph(), tmp_path / "model.onnx")
    fp16 = convert_to_fp16(fp32, tmp_path / "model.fp16.onnx")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    by_name = {n.name: n for n in model.graph.node}
    for name in ("norm", "attention"):
        assert [types[i] for i in by_name[name].input] == [TensorProto.FLOAT] * len(
            by_name[name].input
        ), name
        assert types[by_name[name].output[0]] == TensorProto.FLOAT, name
    assert types["w1"] == TensorProto.FLOAT16 and types["w2"] == TensorProto.FLOAT16
    report = compare(
        onnxruntime_runner(fp16),
        onnxruntime_runner(fp32),
        random_images([(1, 24, 40)]),
        artifact=fp16.name,
        reference_name=fp32.name,
        images_name="random",
        tolerance=FP16_TOLERANCE,
    )
    assert report.min_mask_agreement >= FP16_TOLERANCE.min_mask_agreement


def test_spec_import_stays_light() -> None:
    """Serving imports `cosa.export.spec`: the package door must not pull torch or onnx."""
    code = (
        "import sys, cosa.export.spec\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_door_resolves_public_names_lazily() -> None:
    import cosa.export
    from cosa.export import pipeline

    assert cosa.export.export_artifacts is pipeline.export_artifacts
    assert set(cosa.export.__all__) >= {"ExportOptions", "ExportResult", "export_artifacts"}
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        cosa.export.no_such_name  # noqa: B018
