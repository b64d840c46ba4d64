"""TensorRT engine building against a fake `tensorrt` module (this machine has neither TensorRT nor
a GPU), plus a real build behind the gpu/tensorrt markers.

The fake implements only the documented 10.x/11.x Python API that `cosa.export.tensorrt_build` uses
and records every call, so the tests check what is asked of TensorRT: network flags, workspace,
profile shapes, builder flags per major version, timing-cache round trips, error collection.
"""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tensorrt_fakes
from onnx import TensorProto, helper, numpy_helper
from tensorrt_fakes import FakeEngine, Severity, fake_tensorrt_module, install_fake_cuda

from cosa.errors import ExportError, MissingDependencyError
from cosa.export import tensorrt_build
from cosa.export.spec import ShapeProfile
from cosa.export.tensorrt_build import (
    EngineRunner,
    build_engine,
    default_timing_cache,
    import_tensorrt,
    precision_flags,
    profile_check_shapes,
    require_tensorrt,
    validate_profile,
)

PROFILE = ShapeProfile(min=(1, 64, 64), opt=(1, 128, 160), max=(4, 256, 320))


# ------------------------------------------------------------------------------------ the fake


@dataclass
class FakeState:
    """What the fake TensorRT saw, and how it should behave."""

    version: str = "10.13.0.35"
    input_names: tuple[str, ...] = ("images",)
    parse_errors: tuple[str, ...] = ()
    fail_build: bool = False
    accept_cache: bool = True
    parse_cache: bool = True  # False: create_timing_cache returns None for non-empty data
    plan: bytes = b"\x00SERIALIZED-ENGINE\x01"
    network_flags: list[int] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)
    pools: dict[str, int] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    shapes: dict[str, tuple] = field(default_factory=dict)
    caches_offered: list[bytes] = field(default_factory=list)
    builds: int = 0


def fake_tensorrt(state: FakeState) -> types.ModuleType:
    """A module with the slice of the TensorRT 10/11 API the builder uses."""

    module = fake_tensorrt_module(state.version)
    ILogger = module.ILogger

    class ParserError:
        def __init__(self, index: int, desc: str) -> None:
            self.index, self.desc = index, desc

        def __str__(self) -> str:
            return f"In node {self.index} (parseNode): UNSUPPORTED_NODE: {self.desc}"

    class Network:
        def __init__(self) -> None:
            self.inputs: list[Any] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        def get_input(self, index: int) -> Any:
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network: Network, logger: ILogger) -> None:
            self.network, self.errors = network, []

        def parse_from_file(self, path: str) -> bool:
            state.parsed.append(path)
            self.errors = [ParserError(i, d) for i, d in enumerate(state.parse_errors)]
            self.network.inputs = [types.SimpleNamespace(name=n) for n in state.input_names]
            return not self.errors

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, index: int) -> ParserError:
            return self.errors[index]

    class Profile:
        def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
            state.shapes[name] = (low, opt, high)

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"|build"

    class Config:
        def __init__(self) -> None:
            self.cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            state.pools[pool] = size

        def set_flag(self, flag: str) -> None:
            state.flags.append(flag)

        def add_optimization_profile(self, profile: Profile) -> int:
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache | None:
            if data and not state.parse_cache:
                return None  # what TensorRT does with a file it cannot parse
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            if cache is None:  # the real binding raises TypeError on None
                raise TypeError("set_timing_cache(): incompatible function arguments")
            state.caches_offered.append(cache.data)
            if cache.data and not state.accept_cache:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache:
            assert self.cache is not None
            return self.cache

    class Builder:
        def __init__(self, logger: Any) -> None:
            self.logger = logger

        def create_network(self, flags: int) -> Network:
            state.network_flags.append(flags)
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            state.builds += 1
            if state.fail_build:
                self.logger.log(Severity.ERROR, "out of memory while building tactic 7")
                return None
            return state.plan

    module.Builder = Builder  # type: ignore[attr-defined]
    module.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    module.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    if state.version.startswith("10."):  # 11 removed the weak-typing precision flags
        module.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")  # type: ignore[attr-defined]
    return module


@pytest.fixture
def install_fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Install a fake TensorRT for `state` and a fake GPU; cache files go to tmp_path."""

    def install(state: FakeState) -> FakeState:
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(state))
        monkeypatch.setattr(tensorrt_build, "cuda_device_name", lambda: "Fake GPU 80GB")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        return state

    return install


@pytest.fixture
def onnx_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stand-in; the fake parser does not read it")
    return path


# ------------------------------------------------------------------------ missing dependencies


def test_missing_tensorrt_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(MissingDependencyError) as info:
        import_tensorrt()
    message = str(info.value)
    assert "needs TensorRT 10.x or 11.x, which is not installed" in message
    assert "\n" not in message


def test_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeState(version="8.6.1")))
    with pytest.raises(MissingDependencyError, match="found 8.6.1; upgrade TensorRT"):
        import_tensorrt()


def test_missing_cuda_is_named_after_tensorrt_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeState()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU and driver") as info:
        require_tensorrt()
    assert "\n" not in str(info.value)


def test_build_and_runner_without_tensorrt_raise_missing_dependency(
    monkeypatch: pytest.MonkeyPatch, onnx_file: Path, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32")
    with pytest.raises(MissingDependencyError, match="TensorRT"):
        EngineRunner(tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists()


# ------------------------------------------------------------------------------ pure logic


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (
            ShapeProfile(min=(1, 512, 224), opt=(1, 448, 448), max=(8, 1024, 1024)),
            "H is min 512, opt 448, max 1024",
        ),
        (
            ShapeProfile(min=(1, 224, 224), opt=(1, 448, 448), max=(8, 1024, 320)),
            "W is min 224, opt 448, max 320",
        ),
        (
            ShapeProfile(min=(4, 224, 224), opt=(2, 448, 448), max=(8, 1024, 1024)),
            "N is min 4, opt 2, max 8",
        ),
        (
            ShapeProfile(min=(0, 224, 224), opt=(1, 448, 448), max=(8, 1024, 1024)),
            "--min-shape 0x224x224 is invalid",
        ),
    ],
)
def test_invalid_profiles_are_rejected(profile: ShapeProfile, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        validate_profile(profile)


def test_default_profile_is_valid() -> None:
    validate_profile(ShapeProfile())


@pytest.mark.parametrize(
    ("major", "precision", "flags"),
    [
        (10, "fp32", ()),
        (10, "fp16", ("FP16",)),
        (10, "int8", ("INT8", "FP16")),
        (11, "fp32", ()),
        (11, "fp16", ()),
        (11, "int8", ()),
    ],
)
def test_precision_flags_per_major_version(major: int, precision: str, flags: tuple) -> None:
    assert precision_flags(major, precision) == flags


def test_profile_check_shapes_include_an_odd_size_inside_the_profile() -> None:
    shapes = profile_check_shapes(PROFILE)
    assert shapes[:2] == [(1, 64, 64), (1, 128, 160)]
    n, h, w = shapes[2]
    assert (n, h % 2, w % 2) == (2, 1, 1)
    assert 64 <= h <= 256 and 64 <= w <= 320 and h % 16 and w % 16


def test_default_timing_cache_is_per_version_and_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    path = default_timing_cache("10.13.0.35", "NVIDIA H100 80GB HBM3")
    assert path == Path("/cache/cosa/tensorrt/timing-10.13.0.35-NVIDIA-H100-80GB-HBM3.cache")


# --------------------------------------------------------------------- builds (fake TensorRT)


def test_trt10_int8_build_sets_flags_profile_workspace_and_writes_plain_plan(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    state = install_fake(FakeState(version="10.13.0.35"))
    plan = tmp_path / "out" / "model.plan"
    info = build_engine(onnx_file, plan, PROFILE, "int8", workspace_mib=512)

    assert state.parsed == [str(onnx_file)]
    assert state.network_flags == [0]
    assert state.flags == ["INT8", "FP16"]
    assert state.pools == {"WORKSPACE": 512 << 20}
    assert state.shapes == {"images": ((1, 3, 64, 64), (1, 3, 128, 160), (4, 3, 256, 320))}
    assert plan.read_bytes() == state.plan  # exactly the serialized engine, no header
    assert (info.tensorrt_version, info.gpu_name) == ("10.13.0.35", "Fake GPU 80GB")
    assert info.builder_flags == ("INT8", "FP16") and info.precision == "int8"
    assert [p.name for p in plan.parent.iterdir()] == ["model.plan"]  # no temp file left


def test_trt11_takes_precision_from_the_onnx(
    install_fake: Any, onnx_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = install_fake(FakeState(version="11.4.0.2"))
    with caplog.at_level(logging.INFO, logger="cosa.export.tensorrt_build"):
        info = build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp16")
    assert state.flags == [] and info.builder_flags == ()
    assert state.network_flags == [0]
    assert any("precision comes from the ONNX" in r.getMessage() for r in caplog.records)


def test_timing_cache_is_reused_across_builds(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    state = install_fake(FakeState())
    cache = tmp_path / "timing.cache"
    build_engine(onnx_file, tmp_path / "a.plan", PROFILE, "fp32", timing_cache=cache)
    assert cache.read_bytes() == b"|build"
    build_engine(onnx_file, tmp_path / "b.plan", PROFILE, "fp32", timing_cache=cache)
    assert state.caches_offered == [b"", b"|build"]  # the second build got the first's cache
    assert cache.read_bytes() == b"|build|build"


def test_default_timing_cache_lands_in_the_cache_folder(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    install_fake(FakeState(version="10.13.0.35"))
    info = build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32")
    assert info.timing_cache.parent == tmp_path / "cache" / "cosa" / "tensorrt"
    assert info.timing_cache.is_file()


def test_mismatched_timing_cache_is_replaced_with_a_warning(
    install_fake: Any, onnx_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = install_fake(FakeState(accept_cache=False))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    with caplog.at_level(logging.WARNING, logger="cosa.export.tensorrt_build"):
        build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32", timing_cache=cache)
    assert state.caches_offered == [b"from-another-gpu", b""]
    assert any("from another TensorRT/GPU" in r.getMessage() for r in caplog.records)
    assert cache.read_bytes() == b"|build"


def test_unparsable_timing_cache_is_replaced_with_a_warning(
    install_fake: Any, onnx_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = install_fake(FakeState(parse_cache=False))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x00 not a timing cache")
    with caplog.at_level(logging.WARNING, logger="cosa.export.tensorrt_build"):
        info = build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32", timing_cache=cache)
    assert info.path.read_bytes() == state.plan
    assert state.caches_offered == [b""]  # the fresh cache; the unparsable one never reached it
    assert any("is corrupt or from another TensorRT/GPU" in r.getMessage() for r in caplog.records)
    assert cache.read_bytes() == b"|build"  # replaced by the new build's cache


def test_engine_runner_runs_the_shared_engine_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Export verification and serving run one engine session: same contiguity, device, stream.
    cuda = install_fake_cuda(monkeypatch)
    engine = FakeEngine(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_fakes.fake_tensorrt(engine))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    images = np.random.default_rng(0).uniform(0, 255, (2, 3, 24, 20)).astype(np.float32)
    logits, mask = EngineRunner(plan)(images.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2))
    assert logits.shape == (2, 4, 24, 20) and logits.dtype == np.float32
    np.testing.assert_array_equal(mask, images[:, 0].astype(np.int32))
    assert engine.executed_on == [(0, cuda.streams[0].cuda_stream)] and cuda.streams[0].cuda_stream


def test_engine_runner_reports_a_foreign_plan_as_an_export_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    install_fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", tensorrt_fakes.fake_tensorrt(None, "11.4.0"))
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"engine bytes")
    with pytest.raises(ExportError, match="TensorRT 11.4.0 cannot deserialize .*model.plan"):
        EngineRunner(plan)


def test_every_parser_error_is_reported(install_fake: Any, onnx_file: Path, tmp_path: Path) -> None:
    install_fake(FakeState(parse_errors=("ArgMax int64", "Resize mode cubic", "Unknown op Foo")))
    with pytest.raises(ExportError) as info:
        build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32")
    message = str(info.value)
    assert "cannot parse" in message and "3 error(s)" in message
    for index, desc in enumerate(("ArgMax int64", "Resize mode cubic", "Unknown op Foo")):
        assert f"In node {index} (parseNode): UNSUPPORTED_NODE: {desc}" in message
    assert not (tmp_path / "model.plan").exists()


def test_failed_build_is_an_error_with_the_logged_reason(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    install_fake(FakeState(fail_build=True))
    with pytest.raises(ExportError, match="failed to build.*out of memory while building tactic"):
        build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32")
    assert not (tmp_path / "model.plan").exists()


def test_graph_with_other_inputs_is_rejected(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    install_fake(FakeState(input_names=("input.1",)))
    with pytest.raises(ExportError, match=r"has inputs \['input.1'\]"):
        build_engine(onnx_file, tmp_path / "model.plan", PROFILE, "fp32")


def test_invalid_profile_fails_before_tensorrt_is_touched(
    install_fake: Any, onnx_file: Path, tmp_path: Path
) -> None:
    state = install_fake(FakeState())
    bad = ShapeProfile(min=(1, 64, 64), opt=(1, 512, 64), max=(1, 256, 64))
    with pytest.raises(ExportError, match="H is min 64, opt 512, max 256"):
        build_engine(onnx_file, tmp_path / "model.plan", bad, "fp32")
    assert state.parsed == [] and state.builds == 0


# ------------------------------------------------------------------------- real TensorRT (GPU)


def _tiny_deploy_onnx(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.02, (3, 3, 1, 1)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["logits"], name="classifier"),
        helper.make_node("ArgMax", ["logits"], ["ids"], name="argmax", axis=1, keepdims=0),
        helper.make_node("Cast", ["ids"], ["mask"], name="to_int32", to=TensorProto.INT32),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, "H", "W"]),
            helper.make_tensor_value_info("mask", TensorProto.INT32, ["N", "H", "W"]),
        ],
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from cosa.export.verify import TENSORRT_TOLERANCES, compare, onnxruntime_runner, random_images

    source = _tiny_deploy_onnx(tmp_path / "model.onnx")
    info = build_engine(
        source, tmp_path / "model.plan", PROFILE, "fp32", timing_cache=tmp_path / "timing.cache"
    )
    assert info.path.stat().st_size > 0 and info.timing_cache.is_file()
    report = compare(
        EngineRunner(info.path),
        onnxruntime_runner(source),
        random_images(profile_check_shapes(PROFILE)),
        artifact="model.plan",
        reference_name="onnxruntime",
        images_name="random",
        tolerance=TENSORRT_TOLERANCES["fp32"],
    )
    assert report.min_mask_agreement >= 0.99
