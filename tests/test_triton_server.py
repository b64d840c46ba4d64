"""End to end against the real Triton server of the nvidia-pytriton wheel (`cosa triton setup`).

One server for the module, on free loopback ports, serving a python-backend repository built from a
tiny deploy network exported with torch.onnx (dynamo). Served masks must equal local onnxruntime
masks. The onnxruntime_onnx and tensorrt_plan repositories get as far as this server's backend
lookup; an invalid config stops earlier, at the repository poll.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cosa.errors import InputError, MissingDependencyError, ServingError
from cosa.export.spec import (
    INPUT_NAME,
    LOGITS_NAME,
    MASK_NAME,
    ModelSpec,
    ShapeProfile,
    read_spec,
    write_spec,
)
from cosa.serving.triton_client import TritonSegmentationClient, bucket_by_size
from cosa.serving.triton_names import ServerPorts
from cosa.serving.triton_repo import RepositoryLayout, write_repository
from cosa.serving.triton_server import (
    TritonServer,
    docker_command,
    find_triton,
    free_ports,
    serve,
)

CLASSES = ("background", "square", "disc")
PALETTE = ((0, 0, 0), (200, 30, 30), (30, 200, 30))
MAX_BATCH = 4


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny network honouring the deploy contract, exported like `cosa export` does."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class TinySegmenter(nn.Module):
        """Raw 0-255 RGB (N, 3, H, W) -> logits (N, 3, H, W), int32 mask (N, H, W)."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor([123.7, 116.3, 103.5]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([58.4, 57.1, 57.4]).view(1, 3, 1, 1))
            self.body = nn.Sequential(
                nn.Conv2d(3, 8, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(8, len(CLASSES), 3, stride=2, padding=1),
            )

        def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.body((images - self.mean) / self.std)
            logits = F.interpolate(features, size=images.shape[-2:], mode="bilinear")
            return logits, logits.argmax(1).to(torch.int32)

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("artifact")
    dynamic = torch.export.Dim.DYNAMIC
    torch.onnx.export(
        TinySegmenter().eval(),
        (torch.rand(1, 3, 32, 48) * 255,),
        str(folder / "model.onnx"),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[LOGITS_NAME, MASK_NAME],
        dynamic_shapes={"images": {0: dynamic, 2: dynamic, 3: dynamic}},
        verbose=False,
    )
    profile = ShapeProfile(min=(1, 16, 16), opt=(1, 32, 48), max=(MAX_BATCH, 128, 128))
    write_spec(ModelSpec(class_names=CLASSES, palette=PALETTE, profile=profile), folder)
    return folder


@pytest.fixture(scope="module")
def local(artifact: Path):
    """The same artifact on the local onnxruntime: the reference for every served mask."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    return lambda images, name=MASK_NAME: session.run([name], {INPUT_NAME: images})[0]


@pytest.fixture(scope="module")
def installed(triton_installed: None) -> None:
    """Every server test needs the embedded Triton (see conftest: skipped locally, fails in CI)."""


@pytest.fixture(scope="module")
def repo(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> RepositoryLayout:
    return write_repository(
        artifact,
        tmp_path_factory.mktemp("repos") / "python",
        "python",
        max_batch=MAX_BATCH,
        preferred_batch=(2, MAX_BATCH),
        max_queue_delay_us=2000,
        ort_threads=1,
    )


@pytest.fixture(scope="module")
def server(installed: None, repo: RepositoryLayout) -> Iterator[TritonServer]:
    with TritonServer(repo.root, startup_timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def spec(artifact: Path) -> ModelSpec:
    return read_spec(artifact)


def random_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, 3, h, w)).astype(np.float32)


# -- requests -----------------------------------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_served_masks_equal_local_onnxruntime(
    server: TritonServer, spec: ModelSpec, local, protocol: str
) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with TritonSegmentationClient(url, protocol, spec=spec) as client:
        assert (client.max_batch, client.num_classes) == (MAX_BATCH, len(CLASSES))
        images = random_images(6, 40, 56)  # more than the max batch: sent as two requests
        result = client.infer(images, logits=True)
        assert result[MASK_NAME].dtype == np.int32 and result[MASK_NAME].shape == (6, 40, 56)
        np.testing.assert_array_equal(result[MASK_NAME], local(images))
        np.testing.assert_allclose(result[LOGITS_NAME], local(images, LOGITS_NAME), atol=1e-5)
        assert len(np.unique(result[MASK_NAME])) > 1  # a constant mask would prove little

        assert set(client.infer(random_images(1, 17, 33))) == {MASK_NAME}  # logits not sent
        with pytest.raises(InputError, match="float32"):
            client.infer(images.astype(np.float64))


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_infer_many_keeps_order_with_a_bounded_window(
    server: TritonServer, local, protocol: str
) -> None:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    sizes = [(1, 32, 32), (3, 40, 56), (2, 32, 32), (4, 24, 48), (1, 16, 80)] * 3
    batches = [random_images(n, h, w, seed=i) for i, (n, h, w) in enumerate(sizes)]
    pulled = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal pulled
        for batch in batches:
            pulled += 1
            yield batch

    with TritonSegmentationClient(url, protocol) as client:
        for index, result in enumerate(client.infer_many(source(), max_in_flight=3)):
            assert pulled - index <= 3  # never more than the window ahead of the consumer
            np.testing.assert_array_equal(result[MASK_NAME], local(batches[index]))
        assert index == len(batches) - 1


@pytest.mark.triton
def test_concurrent_equal_size_requests_are_batched_by_the_server(
    server: TritonServer, local
) -> None:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url)

    def counts() -> tuple[int, int]:
        model = stats.get_inference_statistics("cosa_seg").model_stats[0]
        return model.inference_count, model.execution_count

    images = [(i, random_images(1, 32, 32, seed=i)[0]) for i in range(24)]
    before = counts()
    with TritonSegmentationClient(server.grpc_url) as client:
        singles = (stack for _, stack in bucket_by_size(images, batch_size=1))
        for (key, image), result in zip(
            images, client.infer_many(singles, max_in_flight=8), strict=True
        ):
            np.testing.assert_array_equal(result[MASK_NAME], local(image[None]), err_msg=str(key))
    inferences, executions = (a - b for a, b in zip(counts(), before, strict=True))
    assert inferences == 24
    assert executions < inferences  # the dynamic batcher merged requests of equal size
    stats.close()


@pytest.mark.triton
def test_grpc_stream_returns_frames_in_order_with_backpressure(server: TritonServer, local) -> None:
    frames = [random_images(1, 48, 64, seed=i)[0] for i in range(12)]
    pulled = 0

    def source() -> Iterator[np.ndarray]:
        nonlocal pulled
        for frame in frames:
            pulled += 1
            yield frame

    with TritonSegmentationClient(server.grpc_url) as client:
        indices = []
        for index, result in client.stream(source(), max_in_flight=4):
            assert pulled - index <= 4
            indices.append(index)
            np.testing.assert_array_equal(result[MASK_NAME], local(frames[index][None]))
        assert indices == list(range(12))

        # Stopping early cancels the rest and leaves the client usable for a new stream.
        first = next(iter(client.stream(iter(frames), max_in_flight=4)))
        assert first[0] == 0
        assert [i for i, _ in client.stream(iter(frames[:3]))] == [0, 1, 2]


@pytest.mark.triton
def test_stream_needs_grpc(server: TritonServer) -> None:
    with (
        TritonSegmentationClient(server.http_url, "http") as client,
        pytest.raises(ServingError, match="streaming needs the gRPC protocol"),
    ):
        list(client.stream(iter([])))


# -- ensemble: thin clients send files ------------------------------------------------------------


def encoded(array: np.ndarray, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def displayed_rgb(data: bytes) -> np.ndarray:
    """Local decoding, the library's (the pre-processing model ships it): (1, 3, H, W) float32."""
    from cosa.image_decode import decode_image

    return decode_image(data).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_turns_image_files_into_palette_pngs(
    server: TritonServer, local, protocol: str
) -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    rotated = Image.fromarray(pixels).getexif()
    rotated[0x0112] = 6  # EXIF orientation: displayed rotated, 50 x 30 -> 30 x 50
    files = {
        "png": encoded(pixels, "PNG"),
        "jpeg": encoded(pixels, "JPEG", quality=90),
        "exif-rotated jpeg": encoded(pixels, "JPEG", quality=90, exif=rotated.tobytes()),
    }
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with TritonSegmentationClient(url, protocol) as client:
        for name, data in files.items():
            result = client.infer_encoded([data], ids=True)
            expected = local(displayed_rgb(data))[0]
            with Image.open(io.BytesIO(result["mask_png"][0])) as png:
                assert png.mode == "P", name
                assert png.size == (expected.shape[1], expected.shape[0]), name
                np.testing.assert_array_equal(np.asarray(png), expected, err_msg=name)
                assert png.getpalette()[:9] == [c for rgb in PALETTE for c in rgb]
            np.testing.assert_array_equal(result[MASK_NAME][0], expected, err_msg=name)
        assert result[MASK_NAME].shape == (1, 50, 30)  # the rotated one, as displayed

        two = client.infer_encoded([files["png"], files["jpeg"]])
        assert len(two["mask_png"]) == 2
        with pytest.raises(ServingError, match="cannot decode image"):
            client.infer_encoded([b"\x89PNG\r\n\x1a\n truncated"])
        with pytest.raises(ServingError, match="images of one request must share a size"):
            client.infer_encoded([files["png"], files["exif-rotated jpeg"]])


@pytest.mark.triton
def test_awkward_files_give_local_masks_through_the_ensemble(
    server: TritonServer, local, tmp_path: Path
) -> None:
    # The ensemble decodes with the library's decoder: RGBA composited onto black, 16-bit scaled,
    # CMYK, palette transparency, EXIF orientation as load_image; and the same reasons when not.
    from awkward_images import write_awkward_images, write_bad_images

    from cosa.images import ImageReadError, load_image
    from cosa.serving.runners import images_to_batch

    with TritonSegmentationClient(server.grpc_url, "grpc") as client:
        for name, path in write_awkward_images(tmp_path / "awkward").items():
            result = client.infer_encoded([path.read_bytes()], ids=True, names=[str(path)])
            expected = local(images_to_batch([load_image(path)]))[0]
            np.testing.assert_array_equal(result[MASK_NAME][0], expected, err_msg=name)
        for name, path in write_bad_images(tmp_path / "bad").items():
            with pytest.raises(ImageReadError) as served:
                client.infer_encoded([path.read_bytes()], names=[str(path)])
            with pytest.raises(ImageReadError) as decoded:
                load_image(path)
            assert str(served.value) == str(decoded.value), name


@pytest.mark.triton
def test_cosa_segment_through_triton_equals_local_onnxruntime(
    server: TritonServer, artifact: Path, tmp_path: Path
) -> None:
    import json

    from awkward_images import write_awkward_images, write_bad_images
    from typer.testing import CliRunner

    from cli import app

    inputs = tmp_path / "inputs"
    write_awkward_images(inputs)
    write_bad_images(inputs / "bad")
    runs = {}
    for backend in ("triton", "onnxruntime"):
        out = tmp_path / backend
        url = ["--url", server.grpc_url] if backend == "triton" else []
        args = ["segment", str(inputs), "--out", str(out), "--model", str(artifact)]
        result = CliRunner().invoke(app, [*args, "--backend", backend, *url, "--json"])
        assert result.exit_code == 1, result.output  # the bad files fail, the rest is written
        report = json.loads(result.output)
        runs[backend] = (report, out)
    (served, served_out), (local_report, local_out) = runs["triton"], runs["onnxruntime"]
    assert served["processed"] == local_report["processed"] == 7
    assert served["failed"] == local_report["failed"] and len(served["failed"]) == 4
    masks = sorted(p.relative_to(local_out) for p in local_out.rglob("*.png"))
    assert len(masks) == 7 and masks == sorted(
        p.relative_to(served_out) for p in served_out.rglob("*.png")
    )
    for mask in masks:
        with Image.open(served_out / mask) as a, Image.open(local_out / mask) as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(mask))


@pytest.mark.triton
def test_ensemble_answers_a_request_for_raw_ids_alone(server: TritonServer, local) -> None:
    # Regression: with the ids mapped straight from the segmentation step, Triton pruned them
    # when they were not requested and the ensemble deadlocked; the reverse must work too.
    import tritonclient.grpc as grpcclient

    pixels = np.random.default_rng(4).integers(0, 256, (20, 36, 3), dtype=np.uint8)
    data = encoded(pixels, "PNG")
    request = grpcclient.InferInput("image_bytes", [1, 1], "BYTES")
    request.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        result = client.infer(
            "cosa_seg_ensemble", [request], outputs=[grpcclient.InferRequestedOutput(MASK_NAME)]
        )
    finally:
        client.close()
    assert result.as_numpy("mask_png") is None
    np.testing.assert_array_equal(result.as_numpy(MASK_NAME), local(displayed_rgb(data)))


# -- client checks against the server -------------------------------------------------------------


@pytest.mark.triton
def test_client_names_missing_models_and_spec_mismatches(
    server: TritonServer, spec: ModelSpec
) -> None:
    with pytest.raises(ServingError, match=r"has no model 'cosa_other' \(it has: cosa_seg, "):
        TritonSegmentationClient(server.grpc_url, model_name="cosa_other")

    five = ModelSpec(class_names=tuple(f"c{i}" for i in range(5)), palette=((0, 0, 0),) * 5)
    with pytest.raises(ServingError) as info:
        TritonSegmentationClient(server.http_url, "http", spec=five)
    message = str(info.value)
    assert "does not match spec.json" in message
    assert "output 'logits' has dims [-1, 3, -1, -1], expected [-1, 5, -1, -1]" in message
    assert "\n" not in message

    with pytest.raises(
        ServingError, match=r"does not match the CoSA deploy graph: input 'images' missing"
    ):
        TritonSegmentationClient(server.grpc_url, model_name="cosa_seg_ensemble")


# -- what this server cannot load, and how it says so ---------------------------------------------


@pytest.mark.triton
def test_onnxruntime_and_tensorrt_repositories_reach_the_backend_lookup(
    installed: None, artifact: Path, tmp_path: Path
) -> None:
    engine = shutil.copytree(artifact, tmp_path / "engine")
    (engine / "model.plan").write_bytes(b"engine stand-in")  # never deserialised: no backend
    listed = {"fp32": "model.onnx", "tensorrt": "model.plan"}  # as `cosa export --trt` lists it
    write_spec(dataclasses.replace(read_spec(engine), extra_artifacts=listed), engine)
    write_repository(artifact, tmp_path / "ort", "onnxruntime", model_name="seg_ort")
    write_repository(
        engine, tmp_path / "trt", "tensorrt", MAX_BATCH, model_name="seg_trt", ensemble=False
    )
    both = tmp_path / "both"
    both.mkdir()
    (tmp_path / "ort" / "seg_ort").rename(both / "seg_ort")
    (tmp_path / "trt" / "seg_trt").rename(both / "seg_trt")

    with pytest.raises(ServingError) as info:
        TritonServer(both, startup_timeout_s=60, log_path=tmp_path / "server.log").start()
    message = str(info.value)
    # The configs passed validation: loading stopped only because the backends are absent.
    assert "Poll failed" not in message
    assert "unable to find backend library for backend 'onnxruntime'" in message
    assert "unable to find backend library for backend 'tensorrt'" in message


@pytest.mark.triton
def test_an_invalid_config_stops_at_the_repository_poll(
    installed: None, repo: RepositoryLayout, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    config = repo.config_path(repo.segmentation).read_text()
    (bad / "seg").mkdir()
    (bad / "seg" / "config.pbtxt").write_text(
        config.replace("max_batch_size:", "max_batch: 1\nmax_batch_size:")
    )
    with pytest.raises(ServingError, match="Poll failed for model directory 'seg'"):
        TritonServer(bad, startup_timeout_s=60, log_path=tmp_path / "server.log").start()


# -- serve(): the foreground command --------------------------------------------------------------


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def tritonserver_pid(http_port: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                cmdline[0].endswith(b"tritonserver")
                and f"--http-port={http_port}".encode() in cmdline
            ):
                return int(entry.name)
    return None


@pytest.mark.triton
def test_serve_stops_server_and_stubs_cleanly_on_sigterm(
    installed: None, artifact: Path, tmp_path: Path
) -> None:
    # The segmentation model alone: one stub to start instead of four.
    repo = write_repository(artifact, tmp_path / "repo", "python", ensemble=False).root
    ports = ServerPorts(*free_ports(3))
    code = (
        "import sys; from pathlib import Path; from cosa.serving.triton_server import serve; "
        "from cosa.serving.triton_names import ServerPorts; "
        f"sys.exit(serve(Path({str(repo)!r}), ServerPorts(*{tuple(ports)})))"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ports.http}/v2/health/ready", timeout=1)
                break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode()
                time.sleep(0.2)
        server_pid = tritonserver_pid(ports.http)
        assert server_pid is not None and group_alive(server_pid)
        stubs = subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True, text=True)
        assert len(stubs.stdout.split()) >= 2  # the server and its python-backend stubs

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not group_alive(server_pid)  # server and every stub are gone
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_refuses_backends_the_embedded_server_lacks(artifact: Path, tmp_path: Path) -> None:
    write_repository(artifact, tmp_path / "repo", "onnxruntime")
    with pytest.raises(ServingError) as info:
        serve(tmp_path / "repo", ServerPorts(*free_ports(3)))
    message = str(info.value)
    assert "needs the onnxruntime backend" in message
    assert "--platform python" in message
    assert "docker run" in message


def test_docker_command_mounts_the_repository_with_the_right_extras(
    artifact: Path, tmp_path: Path
) -> None:
    ort = write_repository(artifact, tmp_path / "ort", "onnxruntime", ensemble=False)
    line = docker_command(ort.root)
    assert line.startswith("docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 ")
    assert f"-v {ort.root.resolve()}:/models:ro nvcr.io/nvidia/tritonserver:24.10-py3 " in line
    assert line.endswith("tritonserver --model-repository=/models")
    assert "pip install" not in line

    python = write_repository(artifact, tmp_path / "py", "python")
    line = docker_command(python.root, ServerPorts(9000, 9001, 9002))
    assert "--gpus" not in line and "--shm-size=1024m" in line
    assert "-p 9001:8001" in line
    assert line.endswith(
        """bash -c 'pip install --quiet "numpy<2" onnxruntime Pillow && exec tritonserver"""
        """ --model-repository=/models'"""
    )


def test_missing_install_says_to_run_setup(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"not set up in .*; run `cosa triton setup`"):
        find_triton(tmp_path)
    with pytest.raises(MissingDependencyError, match="cosa triton setup"):
        TritonServer(tmp_path, home=tmp_path)
