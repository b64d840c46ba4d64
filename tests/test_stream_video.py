"""`cosa.serving.stream.run_stream`: video / image-sequence sources, order, size, count, errors."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from serving_fixtures import (
    FakeRunner,
    ParallelRunner,
    TinyArtifacts,
    expected_fake_mask,
    tiny_artifacts,
)

from cosa.errors import ConfigError, InputError, ServingError
from cosa.serving.masks import blend_overlay, palette_lut
from cosa.serving.runners import OnnxRuntimeRunner
from cosa.serving.stream import is_camera, open_source, run_stream

FRAMES, WIDTH, HEIGHT, FPS = 12, 64, 48, 10.0
LUT = palette_lut(FakeRunner().spec.palette)


def frame_rgb(i: int) -> np.ndarray:
    """Frame i: a flat colour that changes with i (mask id (i % 4)) and a white square at x = 4i."""
    image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    image[...] = (64 * (i % 4) + 30, 15 * i, 250 - 15 * i)
    image[8:24, 4 * i : 4 * i + 16] = 255
    return image


def write_video(path: Path, fourcc: str = "MJPG") -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), FPS, (WIDTH, HEIGHT))
    for i in range(FRAMES):
        writer.write(cv2.cvtColor(frame_rgb(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def read_video(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    fps = cap.get(cv2.CAP_PROP_FPS)
    cap.release()
    return frames, fps


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("suffix", [".mp4", ".avi"])
def test_video_keeps_count_size_fps_and_order(tmp_path: Path, suffix: str) -> None:
    source = write_video(tmp_path / "in.avi")
    decoded, _ = read_video(source)  # what the pipeline sees (MJPG is lossy)
    out = tmp_path / "res" / f"seg{suffix}"
    summary = run_stream(str(source), out, FakeRunner(), masks_dir=tmp_path / "masks")

    assert (summary.frames, summary.size, summary.video_fps) == (FRAMES, (WIDTH, HEIGHT), FPS)
    assert summary.fps > 0 and 0 < summary.latency_p50_ms <= summary.latency_p95_ms
    frames, fps = read_video(out)
    assert len(frames) == FRAMES and fps == FPS
    for i, frame in enumerate(frames):
        assert frame.shape == (HEIGHT, WIDTH, 3)
        expected = blend_overlay(decoded[i], expected_fake_mask(decoded[i]), LUT)
        own = diff(frame, expected)
        others = [
            diff(frame, blend_overlay(decoded[j], expected_fake_mask(decoded[j]), LUT))
            for j in range(FRAMES)
            if j != i
        ]
        assert own < 4 and own < min(others) / 2, (i, own, min(others))
        mask = Image.open(tmp_path / "masks" / f"frame_{i:06d}.png")
        assert mask.mode == "P"
        np.testing.assert_array_equal(np.asarray(mask), expected_fake_mask(decoded[i]))
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    assert summary.to_json()["frames"] == FRAMES


def test_image_sequence_glob_in_natural_order(tmp_path: Path) -> None:
    for i in range(FRAMES):
        Image.fromarray(frame_rgb(i)).save(tmp_path / f"f{i + 1}.png")  # f1 .. f12, unpadded
    (tmp_path / "notes.txt").write_text("not a frame")
    summary = run_stream(
        str(tmp_path / "f*.png"), tmp_path / "o.avi", FakeRunner(), masks_dir=tmp_path / "m"
    )
    assert summary.frames == FRAMES and summary.video_fps == 30.0
    assert any("no frame rate" in w for w in summary.warnings)
    frames, _ = read_video(tmp_path / "o.avi")
    assert len(frames) == FRAMES
    for i in range(FRAMES):
        expected = blend_overlay(frame_rgb(i), expected_fake_mask(frame_rgb(i)), LUT)
        assert diff(frames[i], expected) < 4
        mask = np.asarray(Image.open(tmp_path / "m" / f"f{i + 1}.png"))
        np.testing.assert_array_equal(mask, expected_fake_mask(frame_rgb(i)))
    folder = run_stream(str(tmp_path), tmp_path / "o2.mp4", FakeRunner(), fps=5)
    assert folder.frames == FRAMES and folder.video_fps == 5


def test_real_model_masks_match_the_runner(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    tiny: TinyArtifacts = tiny_artifacts(pytestconfig, tmp_path_factory)
    source = write_video(tmp_path / "in.avi")
    decoded, _ = read_video(source)
    runner = OnnxRuntimeRunner(tiny.folder)
    summary = run_stream(
        str(source), tmp_path / "o.mp4", runner, masks_dir=tmp_path / "m", max_frames=5
    )
    assert summary.frames == 5
    for i in range(5):
        direct = runner.infer(decoded[i].transpose(2, 0, 1)[None].astype(np.float32))["mask"][0]
        written = np.asarray(Image.open(tmp_path / "m" / f"frame_{i:06d}.png"))
        assert (written == direct).mean() > 0.999
    assert len(read_video(tmp_path / "o.mp4")[0]) == 5


class StreamingClient(FakeRunner):
    """A client double with `infer_many`: consumes the requests in its own thread, answers out of
    order internally, yields in order, and records the most requests ever in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.peak_in_flight = 0

    def infer_many(self, batches: Iterator[np.ndarray], max_in_flight: int) -> Iterator[dict]:
        pool = ThreadPoolExecutor(4)
        pending: list = []
        rng = np.random.default_rng(0)
        lock = threading.Lock()
        in_flight = 0

        def call(batch: np.ndarray, delay: float) -> dict:
            nonlocal in_flight
            time.sleep(delay)
            result = self.infer(batch)
            with lock:
                in_flight -= 1
            return result

        for batch in batches:
            with lock:
                in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, in_flight)
            pending.append(pool.submit(call, batch, float(rng.uniform(0, 0.01))))
            if len(pending) >= max_in_flight:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
        pool.shutdown()


def test_client_streaming_keeps_order_with_a_bounded_window(tmp_path: Path) -> None:
    source = write_video(tmp_path / "in.avi")
    decoded, _ = read_video(source)
    client = StreamingClient()
    summary = run_stream(
        str(source), tmp_path / "o.avi", client, masks_dir=tmp_path / "m", max_in_flight=3
    )
    assert summary.frames == FRAMES and client.peak_in_flight <= 3
    for i in range(FRAMES):
        mask = np.asarray(Image.open(tmp_path / "m" / f"frame_{i:06d}.png"))
        np.testing.assert_array_equal(mask, expected_fake_mask(decoded[i]))


@pytest.mark.parametrize(("parallel_calls", "max_in_flight", "peak"), [(2, 4, 2), (3, 2, 2)])
def test_local_runner_parallel_calls_keep_frame_order(
    tmp_path: Path, parallel_calls: int, max_in_flight: int, peak: int
) -> None:
    source = write_video(tmp_path / "in.avi")
    decoded, _ = read_video(source)
    runner = ParallelRunner(parallel_calls, meet=peak)  # the first calls end out of order
    summary = run_stream(
        str(source),
        tmp_path / "o.avi",
        runner,
        masks_dir=tmp_path / "m",
        max_in_flight=max_in_flight,
    )
    assert summary.frames == FRAMES
    assert runner.peak == peak  # parallel calls, never more than the in-flight window
    for i in range(FRAMES):
        mask = np.asarray(Image.open(tmp_path / "m" / f"frame_{i:06d}.png"))
        np.testing.assert_array_equal(mask, expected_fake_mask(decoded[i]))


def test_camera_sources_are_told_from_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert is_camera("0") and is_camera("12")
    assert not is_camera("video.mp4") and not is_camera("*.png")
    (tmp_path / "0").write_bytes(b"")  # a file named like a camera index is a file
    assert not is_camera("0")


class GrpcStreamingClient(FakeRunner):
    """A gRPC client double: `stream` answers out of order inside, yields (index, result) in
    order; `infer_many` must not be used when streaming is available."""

    protocol = "grpc"

    def __init__(self) -> None:
        super().__init__()
        self.streamed = 0
        self.closed_stream = False

    def infer_many(self, batches: Iterator[np.ndarray], max_in_flight: int) -> Iterator[dict]:
        raise AssertionError("a gRPC client streams")

    def stream(self, frames: Iterator[np.ndarray], max_in_flight: int) -> Iterator:
        window: list[tuple[int, np.ndarray]] = []
        try:
            for index, frame in enumerate(frames):
                assert frame.shape[0] == 1 and len(window) < max_in_flight
                window.append((index, frame))
                if len(window) == max_in_flight:
                    for i, f in window:
                        self.streamed += 1
                        yield i, self.infer(f)
                    window.clear()
            for i, f in window:
                self.streamed += 1
                yield i, self.infer(f)
        finally:
            self.closed_stream = True


def test_grpc_client_frames_go_through_its_stream(tmp_path: Path) -> None:
    source = write_video(tmp_path / "in.avi")
    decoded, _ = read_video(source)
    client = GrpcStreamingClient()
    summary = run_stream(
        str(source), tmp_path / "o.mp4", client, masks_dir=tmp_path / "m", max_in_flight=5
    )
    assert summary.frames == FRAMES == client.streamed and client.closed_stream
    for i in range(FRAMES):
        mask = np.asarray(Image.open(tmp_path / "m" / f"frame_{i:06d}.png"))
        np.testing.assert_array_equal(mask, expected_fake_mask(decoded[i]))


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(InputError, match="cannot open video"):
        open_source(str(tmp_path / "text.mp4"))
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(InputError, match="cannot open video"):
        open_source(str(tmp_path / "empty.mp4"))
    with pytest.raises(InputError, match="cannot open camera 9"):
        open_source("9")
    with pytest.raises(InputError, match="no images"):
        open_source(str(tmp_path / "*.png"))
    (tmp_path / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    with pytest.raises(InputError, match="dangling symlink"):
        open_source(str(tmp_path / "dangling.mp4"))


def test_truncated_videos(tmp_path: Path) -> None:
    for suffix, fourcc in ((".avi", "MJPG"), (".mp4", "mp4v")):
        data = write_video(tmp_path / f"full{suffix}", fourcc).read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) * 6 // 10])
    # AVI: the header still announces 12 frames; fewer are readable, and the summary says so.
    summary = run_stream(str(tmp_path / "cut.avi"), tmp_path / "o.avi", FakeRunner())
    assert 1 <= summary.frames < FRAMES
    assert len(read_video(tmp_path / "o.avi")[0]) == summary.frames
    assert any(
        f"announces {FRAMES} frames but only {summary.frames}" in w for w in summary.warnings
    )
    # MP4 without its index (moov atom) cannot be opened at all.
    with pytest.raises(InputError, match="cannot open video"):
        run_stream(str(tmp_path / "cut.mp4"), tmp_path / "o.mp4", FakeRunner())
    assert not (tmp_path / "o.mp4").exists()


def test_bad_frames_and_outputs_leave_no_video(tmp_path: Path) -> None:
    Image.fromarray(frame_rgb(0)).save(tmp_path / "a1.png")
    Image.fromarray(frame_rgb(1)[:40]).save(tmp_path / "a2.png")  # another size
    with pytest.raises(InputError, match="a2 is 64x40, the first frame 64x48"):
        run_stream(str(tmp_path / "a*.png"), tmp_path / "out" / "o.mp4", FakeRunner())
    (tmp_path / "b1.png").write_bytes(b"broken")
    with pytest.raises(InputError, match="b1.png: not an image"):
        run_stream(str(tmp_path / "b*.png"), tmp_path / "out" / "o.mp4", FakeRunner())
    with pytest.raises(ConfigError, match="use one of the suffixes .avi, .m4v, .mov, .mp4"):
        run_stream(str(tmp_path / "a1.png"), tmp_path / "out" / "o.gif", FakeRunner())
    assert list((tmp_path / "out").iterdir()) == []


class DyingRunner(FakeRunner):
    def infer(self, images: np.ndarray) -> dict:
        if len(self.batches) == 5:
            raise ServingError("model not ready")
        return super().infer(images)


def test_backend_failure_removes_the_partial_video(tmp_path: Path) -> None:
    source = write_video(tmp_path / "in.avi")
    (tmp_path / "out").mkdir()
    with pytest.raises(ServingError, match="model not ready"):
        run_stream(str(source), tmp_path / "out" / "o.mp4", DyingRunner())
    assert list((tmp_path / "out").iterdir()) == []
