"""Triton repository writer: every generated config against Triton's own schema, options, errors.

No server here (see test_triton_server.py): configs are parsed with
`tritonclient.grpc.model_config_pb2`, which rejects unknown fields, bad enums and bad values, and
the ensemble's wiring is checked against the configs it references.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import sys
import types
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from tritonclient.grpc import model_config_pb2

from cosa import image_decode
from cosa.errors import ExportError, ServingError
from cosa.export.spec import (
    INPUT_NAME,
    LOGITS_NAME,
    MASK_NAME,
    ModelSpec,
    ShapeProfile,
    read_spec,
    write_spec,
)
from cosa.serving import triton_repo
from cosa.serving.triton_names import ENSEMBLE_INPUT_NAME, PNG_OUTPUT_NAME
from cosa.serving.triton_repo import (
    DECODER_MODULE,
    LAYOUT_FILENAME,
    read_layout,
    write_repository,
)
from cosa.triton_models import read_template

PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
PROFILE = ShapeProfile(min=(1, 16, 16), opt=(1, 48, 64), max=(8, 256, 256))


def make_artifact(
    folder: Path,
    classes: int = 4,
    *,
    output_names: tuple[str, str] = (LOGITS_NAME, MASK_NAME),
    external_data: bool = False,
    plan: bool = False,
    palette: tuple[tuple[int, int, int], ...] | None = None,
) -> Path:
    """A tiny deploy graph (1x1 conv + argmax) with dynamic N, H, W, and its spec.json."""
    folder.mkdir(parents=True, exist_ok=True)
    logits, mask = output_names
    weight = numpy_helper.from_array(
        np.random.default_rng(0).normal(size=(classes, 3, 1, 1)).astype(np.float32), "weight"
    )
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [INPUT_NAME, "weight"], [logits]),
            helper.make_node("ArgMax", [logits], ["ids"], axis=1, keepdims=0),
            helper.make_node("Cast", ["ids"], [mask], to=TensorProto.INT32),
        ],
        "tiny",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", classes, "H", "W"]),
            helper.make_tensor_value_info(mask, TensorProto.INT32, ["N", "H", "W"]),
        ],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=external_data,
        location="weights.bin",
        size_threshold=0,
    )
    if plan:
        (folder / "model.plan").write_bytes(b"engine bytes")
    colours = palette if palette is not None else (PALETTE * 100)[:classes]
    names = ("background",) + tuple(f"class{i}" for i in range(1, classes))
    extra = {"fp32": "model.onnx", "tensorrt": "model.plan"} if plan else {}
    spec = ModelSpec(class_names=names, palette=colours, profile=PROFILE, extra_artifacts=extra)
    write_spec(spec, folder)
    return folder


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture()
def artifact(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "artifact", plan=True)


CASES = [
    ("onnxruntime", {}),
    (
        "onnxruntime",
        dict(
            max_batch=16,
            preferred_batch=(4, 8, 16),
            instances=2,
            instance_kind="gpu",
            ort_tensorrt=True,
            max_queue_delay_us=500,
        ),
    ),
    ("onnxruntime", dict(instance_kind="cpu", warmup=False, ensemble=False)),
    ("tensorrt", {}),
    ("tensorrt", dict(max_batch=8, preferred_batch=(8,), instances=3, warmup=False)),
    ("python", {}),
    ("python", dict(max_batch=1, instances=2, ort_threads=1, model_name="seg.v2-b")),
]


@pytest.mark.parametrize(("platform", "options"), CASES)
def test_every_config_parses_and_carries_the_spec(
    artifact: Path, tmp_path: Path, platform: str, options: dict
) -> None:
    layout = write_repository(artifact, tmp_path / "repo", platform, **options)
    configs = {name: parse(layout.config_path(name)) for name in layout.models}

    seg = configs[layout.segmentation]
    max_batch = options.get("max_batch", 8)
    assert seg.name == options.get("model_name", "cosa_seg")
    assert seg.max_batch_size == max_batch
    assert [(t.name, t.data_type, list(t.dims)) for t in seg.input] == [
        (INPUT_NAME, model_config_pb2.TYPE_FP32, [3, -1, -1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in seg.output] == [
        (LOGITS_NAME, model_config_pb2.TYPE_FP32, [4, -1, -1]),
        (MASK_NAME, model_config_pb2.TYPE_INT32, [-1, -1]),
    ]
    expected_runtime = {
        "onnxruntime": ("onnxruntime_onnx", "", "model.onnx"),
        "tensorrt": ("tensorrt_plan", "", "model.plan"),
        "python": ("", "python", "model.onnx"),
    }[platform]
    assert (seg.platform, seg.backend) == expected_runtime[:2]
    assert (layout.root / seg.name / "1" / expected_runtime[2]).is_file()
    assert list(seg.dynamic_batching.preferred_batch_size) == list(
        options.get("preferred_batch", ())
    )
    assert seg.dynamic_batching.max_queue_delay_microseconds == options.get(
        "max_queue_delay_us", 100
    )
    kind = (
        options.get("instance_kind")
        or {"onnxruntime": "auto", "tensorrt": "gpu", "python": "cpu"}[platform]
    )
    group = seg.instance_group[0]
    assert (group.count, group.kind) == (
        options.get("instances", 1),
        model_config_pb2.ModelInstanceGroup.Kind.Value(f"KIND_{kind.upper()}"),
    )
    if options.get("warmup", True):
        (warm,) = seg.model_warmup
        assert warm.batch_size == 1
        assert list(warm.inputs[INPUT_NAME].dims) == [3, 48, 64]  # the spec's opt shape
        assert warm.inputs[INPUT_NAME].zero_data
    else:
        assert not seg.model_warmup
    accelerators = seg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == (["tensorrt"] if options.get("ort_tensorrt") else [])
    if platform == "python":
        assert seg.parameters["onnx_file"].string_value == "model.onnx"
        assert seg.parameters["intra_op_num_threads"].string_value == str(
            options.get("ort_threads", 0)
        )
        code = (layout.root / seg.name / "1" / "model.py").read_text()
        assert code == read_template("onnxruntime_model.py")

    assert (layout.ensemble is None) == (options.get("ensemble", True) is False)
    if layout.ensemble is not None:
        check_ensemble_wiring(configs, layout.ensemble)
        post = configs[layout.postprocess]
        palette = [int(v) for v in post.parameters["palette"].string_value.split(",")]
        assert palette == [c for rgb in PALETTE for c in rgb]
        assert all(c.max_batch_size == max_batch for c in configs.values())
    assert read_layout(layout.root) == layout


def check_ensemble_wiring(configs: dict[str, model_config_pb2.ModelConfig], name: str) -> None:
    """Every step maps existing tensors of existing models; ensemble inputs/outputs are produced."""
    ensemble = configs[name]
    assert ensemble.platform == "ensemble"
    assert [t.name for t in ensemble.input] == [ENSEMBLE_INPUT_NAME]
    assert [t.name for t in ensemble.output] == [PNG_OUTPUT_NAME, MASK_NAME]
    available = {ENSEMBLE_INPUT_NAME}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.input_map.values()) <= available
        assert set(step.output_map) <= {t.name for t in model.output}
        available |= set(step.output_map.values())
    assert {t.name for t in ensemble.output} <= available


def test_repository_folders_and_spec_copy(artifact: Path, tmp_path: Path) -> None:
    layout = write_repository(artifact, tmp_path / "repo", "python")
    root = layout.root
    assert sorted(p.name for p in root.iterdir()) == sorted([*layout.models, LAYOUT_FILENAME])
    assert (root / "cosa_seg" / "spec.json").read_text() == (artifact / "spec.json").read_text()
    for name, code in (
        (layout.preprocess, "preprocess_model.py"),
        (layout.postprocess, "postprocess_model.py"),
    ):
        assert (root / name / "1" / "model.py").read_text() == read_template(code)
    assert (root / layout.ensemble / "1").is_dir()
    assert not list(tmp_path.glob(".repo*"))  # no temporary folder left behind


def test_external_onnx_data_is_copied_beside_the_model(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "art", external_data=True)
    layout = write_repository(art, tmp_path / "repo", "onnxruntime", ensemble=False)
    version = layout.root / "cosa_seg" / "1"
    assert (version / "weights.bin").read_bytes() == (art / "weights.bin").read_bytes()

    (art / "weights.bin").unlink()
    with pytest.raises(ServingError, match=r"external data \['weights.bin'\]"):
        write_repository(art, tmp_path / "repo2", "onnxruntime")


def add_variant(
    folder: Path, name: str, role: str, scale: float = -1.0, primary: bool = False
) -> Path:
    """Beside make_artifact's model.onnx: `name`, the same graph with its weights times `scale`
    (told apart by its bytes), listed in spec.json under `role` (and as the primary if asked)."""
    model = onnx.load(str(folder / "model.onnx"))
    weight = model.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(scale * numpy_helper.to_array(weight), weight.name))
    onnx.save(model, str(folder / name))
    spec = read_spec(folder)
    extra = {"fp32": "model.onnx", **spec.extra_artifacts, role: name}
    artifact = name if primary else spec.artifact
    precision = role.split("_")[0] if primary else spec.precision
    spec = dataclasses.replace(spec, extra_artifacts=extra, artifact=artifact, precision=precision)
    write_spec(spec, folder)
    return folder


@pytest.mark.parametrize(
    ("platform", "options", "served"),
    [
        ("onnxruntime", {}, "model.ort.onnx"),
        ("onnxruntime", dict(instance_kind="gpu"), "model.ort.onnx"),
        ("python", {}, "model.ort.onnx"),
        ("onnxruntime", dict(ort_tensorrt=True), "model.onnx"),  # TensorRT takes no contrib ops
        ("tensorrt", {}, "model.plan"),
    ],
)
def test_onnxruntime_platforms_serve_the_fused_graph_tensorrt_keeps_its_own(
    tmp_path: Path, platform: str, options: dict, served: str
) -> None:
    art = add_variant(make_artifact(tmp_path / "art", plan=True), "model.ort.onnx", "fp32_ort")
    layout = write_repository(art, tmp_path / "repo", platform, ensemble=False, **options)
    version = layout.root / layout.segmentation / "1"
    model_file = "model.plan" if platform == "tensorrt" else "model.onnx"
    code = ["model.py"] if platform == "python" else []
    assert sorted(p.name for p in version.iterdir()) == sorted([model_file, *code])
    assert (version / model_file).read_bytes() == (art / served).read_bytes()
    config = parse(layout.config_path(layout.segmentation))
    if platform == "python":
        assert config.parameters["onnx_file"].string_value == "model.onnx"
    elif platform == "onnxruntime":
        assert config.default_model_filename == "model.onnx"


def test_fused_graph_replaces_only_the_fp32_graph_and_only_if_present(tmp_path: Path) -> None:
    # An INT8 primary is served as exported, fused FP32 graph or not.
    art = add_variant(make_artifact(tmp_path / "art"), "model.ort.onnx", "fp32_ort")
    add_variant(art, "model.int8.onnx", "int8", scale=2.0, primary=True)
    layout = write_repository(art, tmp_path / "repo", "onnxruntime", ensemble=False)
    served = (layout.root / "cosa_seg" / "1" / "model.onnx").read_bytes()
    assert served == (art / "model.int8.onnx").read_bytes()
    # Listed in spec.json but deleted: the plain FP32 graph (same network) is served.
    plain = add_variant(make_artifact(tmp_path / "plain"), "model.ort.onnx", "fp32_ort")
    (plain / "model.ort.onnx").unlink()
    layout = write_repository(plain, tmp_path / "repo2", "python", ensemble=False)
    served = (layout.root / "cosa_seg" / "1" / "model.onnx").read_bytes()
    assert served == (plain / "model.onnx").read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            dict(max_batch=4, preferred_batch=(2, 8)),
            r"preferred batch sizes \[8\] lie outside \[1, max batch 4\]",
        ),
        (dict(preferred_batch=(0,)), r"preferred batch sizes \[0\]"),
        (dict(preferred_batch=(2, 2)), r"repeat a size"),
        (dict(max_batch=0), r"max batch 0 must be >= 1"),
        (dict(instances=0), r"instances 0 must be >= 1"),
        (dict(max_queue_delay_us=-1), r"max queue delay -1 us"),
        (
            dict(platform="openvino"),
            r"unknown platform 'openvino'; choose one of onnxruntime, tensorrt, python",
        ),
        (
            dict(platform="python", instance_kind="gpu"),
            r"instance kind 'gpu' does not fit platform 'python'",
        ),
        (
            dict(platform="tensorrt", instance_kind="cpu"),
            r"instance kind 'cpu' does not fit platform 'tensorrt'",
        ),
        (
            dict(platform="python", ort_tensorrt=True),
            r"TensorRT accelerator is an onnxruntime_onnx option",
        ),
        (dict(model_name="a/b"), r"model name 'a/b'"),
        (dict(ort_threads=-2), r"onnxruntime threads -2"),
        (
            dict(platform="tensorrt", max_batch=16),
            r"max batch 16 exceeds the engine profile's max batch 8",
        ),
    ],
)
def test_invalid_options_are_refused_before_writing(
    artifact: Path, tmp_path: Path, options: dict, message: str
) -> None:
    out = tmp_path / "repo"
    with pytest.raises(ServingError, match=message):
        write_repository(artifact, out, **options)
    assert not out.exists()
    assert not list(tmp_path.glob(".repo*"))


def test_missing_artifact_files_name_the_file_and_the_fix(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "art")  # no model.plan
    with pytest.raises(ServingError, match=r"model.plan not found: platform 'tensorrt'.*--trt"):
        write_repository(art, tmp_path / "repo", "tensorrt")
    (art / "model.onnx").unlink()
    with pytest.raises(ServingError, match=r"model.onnx not found: platform 'python'.*cosa export"):
        write_repository(art, tmp_path / "repo", "python")
    (art / "spec.json").unlink()
    with pytest.raises(ExportError, match="spec.json not found"):
        write_repository(art, tmp_path / "repo", "onnxruntime")
    assert not (tmp_path / "repo").exists()


def test_onnx_that_disagrees_with_the_spec_is_refused(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "art", output_names=("308", MASK_NAME))
    with pytest.raises(ServingError, match=r"outputs \[\('308', 'float32', 4\)"):
        write_repository(art, tmp_path / "repo", "onnxruntime")
    (art / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(ServingError, match="is not a readable ONNX model"):
        write_repository(art, tmp_path / "repo", "onnxruntime")


def test_class_count_and_palette_limits(tmp_path: Path) -> None:
    many = make_artifact(tmp_path / "many", classes=300)
    with pytest.raises(ServingError, match="300 classes do not fit a palette PNG"):
        write_repository(many, tmp_path / "repo", "onnxruntime")
    layout = write_repository(many, tmp_path / "repo", "onnxruntime", ensemble=False)
    assert list(parse(layout.config_path("cosa_seg")).output[0].dims) == [300, -1, -1]

    short = make_artifact(tmp_path / "short", classes=4, palette=PALETTE[:2])
    with pytest.raises(ServingError, match="4 classes but 2 palette colours"):
        write_repository(short, tmp_path / "repo2", "onnxruntime")


def test_existing_output_is_replaced_only_when_asked_and_only_if_ours(
    artifact: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repo"
    write_repository(artifact, out, "onnxruntime", max_batch=2)
    with pytest.raises(
        ServingError, match="already exists; choose another --out or pass --overwrite"
    ):
        write_repository(artifact, out, "python")
    write_repository(artifact, out, "python", max_batch=4, overwrite=True)
    assert read_layout(out).platform == "python"
    assert parse(out / "cosa_seg" / "config.pbtxt").max_batch_size == 4
    assert not list(tmp_path.glob(".repo*"))

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    with pytest.raises(ServingError, match="is not a repository written by `cosa triton repo`"):
        write_repository(artifact, foreign, "python", overwrite=True)
    assert (foreign / "keep.jpg").read_bytes() == b"x"


def test_a_failure_midway_leaves_no_half_repository(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(name: str, dest: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(triton_repo, "_copy_template", broken)
    with pytest.raises(OSError, match="disk full"):
        write_repository(artifact, tmp_path / "repo", "python")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]


def test_read_layout_of_a_foreign_folder_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(ServingError, match="build the repository with `cosa triton repo`"):
        read_layout(tmp_path)


# -- the python-backend models' own helpers, run here with a stand-in for Triton's utils ----------


@pytest.fixture()
def backend_module(monkeypatch: pytest.MonkeyPatch):
    """Imports a python-backend model file with `triton_python_backend_utils` stubbed out."""
    stub = types.ModuleType("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    # The decoder the repository writer ships beside preprocess_model.py (a copy of this module).
    monkeypatch.setitem(sys.modules, DECODER_MODULE, image_decode)

    def load(name: str) -> types.ModuleType:
        path = resources.files("cosa.triton_models").joinpath(f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"_backend_{name}", str(path))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # not registered in sys.modules: no stub leaks out
        return module

    return load


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def test_preprocess_decodes_every_mode_to_rgb_at_displayed_size(backend_module) -> None:
    decode = backend_module("preprocess_model").decode_rgb
    rgb = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)

    out = decode(encode(Image.fromarray(rgb), "PNG"))
    assert out.dtype == np.float32 and out.shape == (3, 5, 7)
    np.testing.assert_array_equal(out, rgb.transpose(2, 0, 1))

    # One policy with cosa.images (tests/test_decoder_paths.py compares them file by file):
    # alpha composited onto black, 16-bit grey scaled by 255 / 65535.
    rgba = np.dstack([rgb, np.full((5, 7), 9, np.uint8)])
    composited = (rgb.astype(np.uint32) * 9 + 127) // 255
    np.testing.assert_array_equal(
        decode(encode(Image.fromarray(rgba), "PNG")), composited.transpose(2, 0, 1)
    )

    gray = decode(encode(Image.fromarray(rgb[..., 0]), "PNG"))
    np.testing.assert_array_equal(gray, np.repeat(rgb[None, ..., 0], 3, axis=0))

    deep = (rgb[..., 0].astype(np.uint16) << 8) | 0xFF  # 16-bit: scaled, not clipped to white
    scaled = (deep.astype(np.uint32) * 255 + 32767) // 65535
    np.testing.assert_array_equal(decode(encode(Image.fromarray(deep), "PNG"))[0], scaled)

    cmyk = decode(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"))
    assert cmyk.shape == (3, 5, 7)

    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise for display
    displayed = decode(encode(rotated, "PNG", exif=exif.tobytes()))
    assert displayed.shape == (3, 7, 5)
    np.testing.assert_array_equal(displayed, np.rot90(rgb, k=-1).transpose(2, 0, 1))

    with pytest.raises(image_decode.DecodeError, match=r"empty file \(0 bytes\)"):
        decode(b"")
    with pytest.raises(image_decode.DecodeError, match="not an image"):
        decode(b"GIF89a truncated")  # GIF is not one of the decoded formats


def test_postprocess_encodes_palette_png_that_decodes_to_the_ids(backend_module) -> None:
    encode_png = backend_module("postprocess_model").encode_png
    ids = np.array([[0, 1, 2], [3, 3, 0]], dtype=np.int32)
    palette = [c for rgb in PALETTE for c in rgb]
    with Image.open(io.BytesIO(encode_png(ids, palette))) as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), ids)
        assert png.getpalette()[:12] == palette
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 255\]"):
        encode_png(np.array([[256]], dtype=np.int32), palette)
