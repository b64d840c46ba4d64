"""Local runners (onnxruntime, torch, TensorRT with a fake module) and `open_runner`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serving_fixtures import (
    CLASS_NAMES,
    PALETTE,
    TINY_SPEC,
    TinyArtifacts,
    loading_shallow,
    tiny_artifacts,
)
from tensorrt_fakes import CudaFakeEngine, FakeEngine, fake_tensorrt, install_fake_cuda

from cosa.errors import (
    CheckpointError,
    ConfigError,
    ExportError,
    InputError,
    MissingDependencyError,
    ServingError,
)
from cosa.export.spec import ModelSpec, read_spec, write_spec
from cosa.serving.runners import (
    OnnxRuntimeRunner,
    Runner,
    TorchRunner,
    default_parallel_calls,
    images_to_batch,
    open_runner,
)
from cosa.serving.tensorrt_runner import TensorRTRunner, check_profile


@pytest.fixture(scope="module")
def tiny(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TinyArtifacts]:
    with loading_shallow():
        yield tiny_artifacts(pytestconfig, tmp_path_factory)


def batch(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 3, h, w)) * 255).astype(np.float32)


# ------------------------------------------------------------------------------ onnxruntime / torch


def test_onnxruntime_runner_runs_the_export_at_any_size(tiny: TinyArtifacts) -> None:
    with OnnxRuntimeRunner(tiny.folder, return_logits=True) as runner:
        assert isinstance(runner, Runner)
        assert runner.spec.class_names == CLASS_NAMES and runner.providers == [
            "CPUExecutionProvider"
        ]
        for shape in [(1, 64, 64), (3, 48, 80), (1, 1, 1), (1, 16, 300)]:
            out = runner.infer(batch(*shape))
            assert out["mask"].dtype == np.int32 and out["mask"].shape == shape
            assert out["logits"].shape == (shape[0], len(CLASS_NAMES), *shape[1:])
            np.testing.assert_array_equal(out["mask"], out["logits"].argmax(axis=1))


def test_onnxruntime_runner_accepts_the_onnx_file_and_returns_only_masks(
    tiny: TinyArtifacts,
) -> None:
    runner = OnnxRuntimeRunner(tiny.folder / "model.onnx", intra_op_threads=1)
    assert set(runner.infer(batch(1, 32, 32))) == {"mask"}
    runner.close()


def test_onnxruntime_parallel_calls_split_the_cpus_and_compute_the_same(
    tiny: TinyArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert default_parallel_calls() == 2
    images = [batch(2, 40, 56), batch(1, 33, 47), batch(3, 64, 64), batch(1, 16, 16)]
    with (
        OnnxRuntimeRunner(tiny.folder) as one,
        OnnxRuntimeRunner(tiny.folder, parallel_calls=2) as two,
    ):
        assert one.parallel_calls == 1 and two.parallel_calls == 2
        assert two._session.get_session_options().intra_op_num_threads == 2  # 4 CPUs / 2 calls
        with ThreadPoolExecutor(2) as pool:  # concurrent calls on one session
            masks = list(pool.map(lambda b: two.infer(b)["mask"], images))
        for image, mask in zip(images, masks, strict=True):
            np.testing.assert_array_equal(mask, one.infer(image)["mask"])
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_parallel_calls() == 1
    with pytest.raises(ConfigError, match="parallel_calls must be at least 1"):
        OnnxRuntimeRunner(tiny.folder, parallel_calls=0)


def test_torch_and_onnxruntime_masks_agree(tiny: TinyArtifacts) -> None:
    images = batch(2, 48, 64, seed=3)
    with TorchRunner.from_checkpoint(tiny.checkpoint, return_logits=True) as torch_runner:
        assert torch_runner.spec.class_names == CLASS_NAMES
        assert torch_runner.spec.palette == PALETTE
        expected = torch_runner.infer(images)
    got = OnnxRuntimeRunner(tiny.folder, return_logits=True).infer(images)
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-4)
    assert (got["mask"] == expected["mask"]).mean() > 0.999
    assert len(np.unique(expected["mask"])) > 1  # the comparison is not between constants


def test_the_torch_runner_folds_batchnorm_and_segments_as_the_checkpoint(tmp_path: Path) -> None:
    """An EfficientNet checkpoint runs with its BatchNorms folded (cosa.model.folding) and gives the
    logits of the plain deploy network."""
    import torch
    from model_fixtures import save_net_checkpoint, scramble_norms

    from cosa.config import ModelConfig
    from cosa.model import DeployModel, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="efficientnet_lite0", decoder_channels=16)
    net = build_model(cfg, num_classes=len(CLASS_NAMES) - 1, load_pretrained=False).eval()
    scramble_norms(net, seed=2)
    path = save_net_checkpoint(net, cfg, CLASS_NAMES, PALETTE, tmp_path / "effnet.pt")
    images = batch(2, 48, 64, seed=4)
    with torch.no_grad():
        want_logits, want_mask = DeployModel(net).eval()(torch.from_numpy(images))
    with TorchRunner.from_checkpoint(path, device="cpu", return_logits=True) as runner:
        encoder = runner._module.net.encoder
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules())
        got = runner.infer(images)
    scale = float(want_logits.abs().max())
    np.testing.assert_allclose(got["logits"], want_logits.numpy(), rtol=0, atol=1e-4 * scale)
    assert (got["mask"] == want_mask.numpy()).mean() > 0.999
    assert len(np.unique(got["mask"])) > 1


def test_runners_validate_their_input(tiny: TinyArtifacts) -> None:
    runner = OnnxRuntimeRunner(tiny.folder)
    with pytest.raises(InputError, match="float32"):
        runner.infer(batch(1, 8, 8).astype(np.float64))
    with pytest.raises(InputError, match=r"\(N, 3, H, W\)"):
        runner.infer(np.zeros((1, 8, 8, 3), np.float32))


def test_images_to_batch() -> None:
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 1] = (1, 2, 3)
    out = images_to_batch([a, a])
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 3) and out.flags.c_contiguous
    assert out[1, :, 0, 1].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        images_to_batch([a, np.zeros((3, 3, 3), np.uint8)])


def test_engine_primary_falls_back_to_the_onnx_of_its_precision(
    tiny: TinyArtifacts, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("model.onnx", "model.int8.onnx"):
        (folder / name).write_bytes((tiny.folder / "model.onnx").read_bytes())
    (folder / "model.plan").write_bytes(b"engine")
    spec = dataclasses.replace(
        TINY_SPEC,
        precision="int8",
        artifact="model.plan",
        extra_artifacts={"fp32": "model.onnx", "int8": "model.int8.onnx", "tensorrt": "model.plan"},
    )
    write_spec(spec, folder)
    assert OnnxRuntimeRunner(folder).path == folder / "model.int8.onnx"
    assert OnnxRuntimeRunner(folder, precision="fp32").path == folder / "model.onnx"


def test_precision_selection(tiny: TinyArtifacts, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((tiny.folder / "model.onnx").read_bytes())
    (folder / "model.int8.onnx").write_bytes((tiny.folder / "model.onnx").read_bytes())
    write_spec(
        dataclasses.replace(TINY_SPEC, extra_artifacts={"int8_cpu": "model.int8.onnx"}), folder
    )
    assert OnnxRuntimeRunner(folder, precision="int8").path == folder / "model.int8.onnx"
    assert OnnxRuntimeRunner(folder, precision="fp32").path == folder / "model.onnx"
    with pytest.raises(
        ConfigError,
        match=r"no fp16 artifact; available: fp32 \(model.onnx\), "
        r"int8_cpu \(model.int8.onnx\)",
    ):
        OnnxRuntimeRunner(folder, precision="fp16")


def test_broken_or_foreign_onnx_files(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    write_spec(TINY_SPEC, folder)
    (folder / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ServingError, match="onnxruntime cannot load"):
        OnnxRuntimeRunner(folder)

    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["input.1"], ["308"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("308", TensorProto.FLOAT, [1])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), folder / "model.onnx"
    )
    with pytest.raises(ServingError, match=r"has inputs \['input.1'\] and outputs \['308'\]"):
        OnnxRuntimeRunner(folder)


# ------------------------------------------------------------------------------------- open_runner


def test_open_runner_picks_the_backend(tiny: TinyArtifacts) -> None:
    runner = open_runner(tiny.folder, "auto")
    assert isinstance(runner, OnnxRuntimeRunner)
    assert isinstance(open_runner(tiny.checkpoint, "auto"), TorchRunner)
    assert isinstance(open_runner(tiny.folder / "model.onnx", "onnxruntime"), OnnxRuntimeRunner)


@pytest.mark.parametrize(
    ("model", "backend", "kwargs", "error", "message"),
    [
        (
            "export",
            "tflite",
            {},
            ConfigError,
            "unknown backend 'tflite'; choose one of auto, onnxruntime, torch, tensorrt, triton",
        ),
        (None, "onnxruntime", {}, ConfigError, "backend 'onnxruntime' needs --model"),
        ("missing", "auto", {}, ConfigError, "does not exist"),
        ("export", "torch", {}, ConfigError, "backend torch runs a checkpoint .pt"),
        ("ckpt", "onnxruntime", {}, ConfigError, "is a checkpoint; run it with --backend torch"),
        (
            "export",
            "onnxruntime",
            {"url": "localhost:8001"},
            ConfigError,
            "--url is for --backend triton",
        ),
        ("export", "triton", {}, ConfigError, "--backend triton needs --url HOST:PORT"),
        (
            "export",
            "triton",
            {"url": "h:1", "protocol": "udp"},
            ConfigError,
            "unknown protocol 'udp'",
        ),
        ("onnx", "triton", {"url": "h:1"}, ConfigError, "names the export folder"),
        ("ckpt", "torch", {"precision": "int8"}, ConfigError, "--precision selects an ONNX file"),
        ("junk_pt", "torch", {}, CheckpointError, "corrupt or not a torch file"),
        ("empty_dir", "onnxruntime", {}, ExportError, "spec.json not found"),
        ("text", "onnxruntime", {}, ConfigError, "is not a .onnx file"),
    ],
)
def test_open_runner_errors(
    tiny: TinyArtifacts,
    tmp_path: Path,
    model: str | None,
    backend: str,
    kwargs: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    paths = {
        None: None,
        "export": tiny.folder,
        "missing": tmp_path / "nope",
        "ckpt": tiny.checkpoint,
        "onnx": tiny.folder / "model.onnx",
        "junk_pt": tmp_path / "junk.pt",
        "empty_dir": tmp_path / "empty",
        "text": tmp_path / "notes.txt",
    }
    with pytest.raises(
        error, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        open_runner(paths[model], backend, **kwargs)


def test_open_runner_triton_uses_the_client_with_the_folder_spec(
    tiny: TinyArtifacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[dict[str, Any]] = []

    class FakeClient:
        num_classes = 3  # what the server's metadata says

        def __init__(self, url: str, protocol: str, model_name: str, spec: Any) -> None:
            created.append(
                {"url": url, "protocol": protocol, "model_name": model_name, "spec": spec}
            )
            self.spec = spec

    fake = types.ModuleType("cosa.serving.triton_client")
    fake.TritonSegmentationClient = FakeClient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cosa.serving.triton_client", fake)
    with_folder = open_runner(
        tiny.folder, "triton", url="localhost:8001", protocol="http", triton_model="seg"
    )
    assert with_folder.spec == TINY_SPEC
    without = open_runner(None, "triton", url="localhost:8001")
    # No export folder: generic names and the VOC colours for the server's class count.
    assert without.spec.class_names == ("class_0", "class_1", "class_2")
    assert without.spec.palette == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert created[0] == {
        "url": "localhost:8001",
        "protocol": "http",
        "model_name": "seg",
        "spec": TINY_SPEC,
    }
    assert created[1]["spec"] is None and created[1]["protocol"] == "grpc"
    assert created[1]["model_name"] == "cosa_seg"


def test_open_runner_triton_without_tritonclient(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoTritonclient:
        def __init__(self, **kwargs: Any) -> None:
            raise ModuleNotFoundError("No module named 'tritonclient'")

    fake = types.ModuleType("cosa.serving.triton_client")
    fake.TritonSegmentationClient = NoTritonclient  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cosa.serving.triton_client", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install 'tritonclient\[http,grpc\]'"):
        open_runner(None, "triton", url="localhost:8001")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_open_runner_triton_unreachable_server_fails_fast_in_one_line(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = pytest.importorskip(f"tritonclient.{protocol}")
    real = module.InferenceServerClient.is_server_live
    checks = []

    def counted(self: object, *args: object, **kwargs: object) -> bool:
        checks.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(module.InferenceServerClient, "is_server_live", counted)
    with pytest.raises(ServingError, match="cannot reach Triton at 127.0.0.1:1") as info:
        open_runner(None, "triton", url="127.0.0.1:1", protocol=protocol)
    assert "\n" not in str(info.value)
    assert len(checks) == 1  # one reachability check, no retries


# --------------------------------------------------------------------------------------- tensorrt


def plan_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "trt"
    write_spec(
        dataclasses.replace(
            TINY_SPEC, artifact="model.plan", tensorrt_version="10.3", gpu_name="A100"
        ),
        folder,
    )
    (folder / "model.plan").write_bytes(b"engine bytes")
    return folder


def plan_of(tmp_path: Path) -> tuple[Path, ModelSpec]:
    folder = plan_folder(tmp_path)
    return folder / "model.plan", read_spec(folder)


def test_tensorrt_missing_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails like an absent package
    with pytest.raises(
        MissingDependencyError, match="needs TensorRT 10.x or 11.x, which is not installed"
    ) as info:
        open_runner(plan_folder(tmp_path), "auto")
    assert "--backend tensorrt" in str(info.value) and "--backend onnxruntime" in str(info.value)
    assert "\n" not in str(info.value)


def test_tensorrt_needs_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeEngine()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="needs a CUDA GPU"):
        TensorRTRunner(plan_folder(tmp_path))


def test_tensorrt_names_a_gpu_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeEngine()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"CUDA device 2 does not exist: 2 GPU\(s\) visible"):
        TensorRTRunner(plan_folder(tmp_path), device_index=2)


def test_tensorrt_engine_from_another_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(None))
    with pytest.raises(
        ServingError,
        match=r"TensorRT 10.9.0 cannot deserialize .*built with "
        r"TensorRT 10.3 on A100",
    ):
        TensorRTRunner(plan_folder(tmp_path))


def test_tensorrt_runner_plumbing_with_a_fake_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = install_fake_cuda(monkeypatch)
    engine = FakeEngine(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    runner = open_runner(plan_folder(tmp_path), "auto")
    assert isinstance(runner, TensorRTRunner)
    assert runner.profile == ((1, 3, 16, 16), (1, 3, 64, 64), (4, 3, 128, 128))
    images = batch(2, 20, 30)
    out = runner.infer(images)
    assert out["mask"].shape == (2, 20, 30) and out["mask"].dtype == np.int32
    np.testing.assert_array_equal(out["mask"], images[:, 0].astype(np.int32))
    assert set(engine.addresses) == {"images", "logits", "mask"}
    with pytest.raises(
        InputError, match=r"outside the TensorRT engine's profile \(min \(1, 3, 16, 16\)"
    ):
        runner.infer(batch(1, 8, 200))


def test_tensorrt_runner_reads_a_transposed_batch_by_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TensorRT takes a raw pointer: a view whose memory is (N, 3, W, H) must be copied to
    # (N, 3, H, W) order first, or the engine segments a scrambled image without an error.
    cuda = install_fake_cuda(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(FakeEngine(cuda)))
    images = batch(2, 20, 30)
    transposed = np.ascontiguousarray(images.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    assert not transposed.flags.c_contiguous
    with TensorRTRunner(plan_folder(tmp_path)) as runner:
        np.testing.assert_array_equal(
            runner.infer(transposed)["mask"], images[:, 0].astype(np.int32)
        )


def test_tensorrt_runner_loads_and_runs_on_its_gpu_with_its_own_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cuda = install_fake_cuda(monkeypatch)
    engine = FakeEngine(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    with TensorRTRunner(plan_folder(tmp_path), device_index=1) as runner:
        runner.infer(batch(1, 16, 16))
        runner.infer(batch(2, 16, 16))
    assert engine.loaded_on == 1  # deserialised on GPU 1, not on the default GPU 0
    (stream,) = cuda.streams
    assert stream.device == 1 and stream.cuda_stream != 0
    # Both calls on GPU 1 and on the runner's stream, never the legacy default stream 0.
    assert engine.executed_on == [(1, stream.cuda_stream)] * 2
    assert (cuda.device, cuda.stream) == (0, 0)  # the caller's device and stream are restored


@pytest.mark.gpu
def test_tensorrt_runner_plumbing_on_a_real_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real CUDA buffers and streams, fake TensorRT: runs on GPU machines without TensorRT."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    engine = CudaFakeEngine()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(engine))
    images = batch(2, 48, 80)
    transposed = np.ascontiguousarray(images.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    with TensorRTRunner(plan_folder(tmp_path), return_logits=True) as runner:
        for _ in range(3):
            out = runner.infer(transposed)
            np.testing.assert_array_equal(out["mask"], images[:, 0].astype(np.int32))
            assert out["logits"].shape == (2, 4, 48, 80)
        handle = runner._engine.stream_handle
    assert handle not in (0, torch.cuda.current_stream(0).cuda_stream)
    assert engine.executed_on == [(0, handle)] * 3


def test_check_profile() -> None:
    profile = ((1, 3, 16, 16), (1, 3, 64, 64), (8, 3, 512, 512))
    check_profile((8, 3, 16, 512), profile)
    with pytest.raises(InputError, match="max"):
        check_profile((9, 3, 64, 64), profile)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_runner_on_a_gpu(tiny: TinyArtifacts, tmp_path: Path) -> None:
    """A real engine built from the tiny ONNX gives onnxruntime's masks through `open_runner`."""
    pytest.importorskip("tensorrt")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from cosa.export.spec import ShapeProfile
    from cosa.export.tensorrt_build import build_engine

    folder = tmp_path / "trt"
    shutil.copytree(tiny.folder, folder)
    profile = ShapeProfile(min=(1, 32, 32), opt=(2, 64, 64), max=(4, 128, 128))
    build_engine(
        folder / "model.onnx",
        folder / "model.plan",
        profile,
        "fp32",
        timing_cache=tmp_path / "timing.cache",
    )
    images = batch(3, 48, 80)
    with OnnxRuntimeRunner(tiny.folder) as reference:
        expected = reference.infer(images)["mask"]
    with open_runner(folder / "model.plan", "auto") as runner:
        assert isinstance(runner, TensorRTRunner)
        mask = runner.infer(images)["mask"]
    assert mask.shape == expected.shape and mask.dtype == np.int32
    assert (mask == expected).mean() >= 0.99


@pytest.mark.parametrize(
    ("images", "one", "message"),
    [
        (np.zeros((1, 3, 8, 8), np.float64), False, "float32 numpy array .* got float64"),
        ([[0.0]], False, "float32 numpy array .* got list"),
        (np.zeros((3, 8, 8), np.float32), False, r"\(N, 3, H, W\) .* got shape \(3, 8, 8\)"),
        (np.zeros((0, 3, 8, 8), np.float32), False, r"N, H, W >= 1 RGB, got shape \(0, 3, 8, 8\)"),
        (np.zeros((2, 3, 8, 8), np.float32), True, r"\(1, 3, H, W\) RGB, got shape \(2, 3, 8, 8\)"),
    ],
)
def test_check_images_names_what_is_wrong(images: Any, one: bool, message: str) -> None:
    from cosa.serving.runner import check_images

    with pytest.raises(InputError, match=message):
        check_images(images, one=one)
    if isinstance(images, np.ndarray) and images.dtype == np.float32 and one:
        check_images(images[:1], one=True)  # one frame passes
