"""`cosa stream`: a video file, a camera or an image sequence to an overlay video, frames in order.

Pipeline (one frame per request, in order, bounded at every stage):

    reader thread --(queue <= in_flight)--> runner / Triton client --(in order)--> writer thread
    OpenCV / Pillow                         <= in_flight requests              VideoWriter, masks

- A Triton client over gRPC sends the frames on one bidirectional gRPC stream
  (`client.stream(frames, max_in_flight)`); a client without streaming (HTTP) uses
  `infer_many(batches, max_in_flight)`. Either way at most `max_in_flight` requests are outstanding
  and results come back in frame order. A local runner that serves parallel calls
  (`OnnxRuntimeRunner(parallel_calls=N)`; the CLI asks for them for files and image sequences,
  not for cameras) gets up to N frames at once, else one frame at a time; either way the reader
  and writer threads overlap inference.
- Backpressure: the reader blocks when `max_in_flight` frames wait, so a fast source (a file) never
  runs ahead of inference by more than that; a camera then drops frames in its own driver buffer.
- Latency of a frame = from handing it to the backend to having its mask (queueing in the in-flight
  window included, not the wait in the reader's queue); FPS = frames / wall time of the whole run.

The output video has the input's frame count, size and frame rate (an image sequence has none: 30
fps unless `fps` is given). Its codec follows its suffix (`VIDEO_CODECS`); it is written to a
temporary file and renamed when complete. With `masks_dir`, each frame's mask is also written as a
palette PNG (`frame_000000.png`, or the input image's stem for a sequence).
"""

from __future__ import annotations

import functools
import glob
import itertools
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from cosa.errors import ConfigError, InputError, ServingError
from cosa.export.spec import MASK_NAME
from cosa.files import atomic_path
from cosa.images import is_image_name, load_image
from cosa.serving.background import ordered_calls, prefetch
from cosa.serving.masks import blend_overlay, palette_lut, write_mask
from cosa.serving.runners import Runner, images_to_batch

__all__ = [
    "VIDEO_CODECS",
    "Frame",
    "FrameSource",
    "StreamSummary",
    "is_camera",
    "open_source",
    "run_stream",
]

log = logging.getLogger(__name__)

# Output suffix -> FourCC. Both were checked here (opencv-python-headless 5.0 with its FFmpeg):
# written, read back frame by frame with the same count, size and fps. H.264 ('avc1') is not
# offered because that FFmpeg has no software H.264 encoder.
VIDEO_CODECS: dict[str, str] = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG"}
DEFAULT_FPS = 30.0


@dataclass(frozen=True)
class Frame:
    """One decoded frame: `image` uint8 (H, W, 3) RGB; `name` names its mask file."""

    index: int
    name: str
    image: np.ndarray


@dataclass
class FrameSource:
    """Frames of a video, camera or image sequence.

    Attributes:
        description: what was opened, for messages.
        frames: iterator of `Frame`, in order.
        fps: the source's frame rate, or None when it has none.
        frame_count: frames announced by the container (may be None or approximate).
        live: a camera (endless; Ctrl-C ends the recording instead of discarding it).
        close: releases the device or file.
    """

    description: str
    frames: Iterator[Frame]
    fps: float | None
    frame_count: int | None
    live: bool = False
    close: Callable[[], None] = field(default=lambda: None)


@dataclass
class StreamSummary:
    """What `run_stream` did.

    Attributes:
        frames: frames read, segmented and written.
        fps: frames per second of the whole run (reading, inference, writing).
        latency_p50_ms, latency_p95_ms: per-frame latency (see the module docstring).
        out: the video written.
        size: (width, height) of the frames.
        video_fps: frame rate written into the video.
        masks_dir: where the mask sequence went, if asked.
        warnings: e.g. a frame rate that had to be assumed, a recording stopped by Ctrl-C.
    """

    frames: int
    fps: float
    latency_p50_ms: float
    latency_p95_ms: float
    out: Path
    size: tuple[int, int]
    video_fps: float
    masks_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return {
            "frames": self.frames,
            "fps": round(self.fps, 3),
            "latency_p50_ms": round(self.latency_p50_ms, 3),
            "latency_p95_ms": round(self.latency_p95_ms, 3),
            "out": str(self.out),
            "size": list(self.size),
            "video_fps": self.video_fps,
            "masks_dir": str(self.masks_dir) if self.masks_dir is not None else None,
            "warnings": list(self.warnings),
        }


# ---------------------------------------------------------------------------------------- sources


def is_camera(source: str) -> bool:
    """Whether SOURCE names a camera index ("0") rather than a file that happens to be called so."""
    return source.isdigit() and not os.path.exists(source)


def open_source(source: str) -> FrameSource:
    """Open SOURCE: a camera index ("0"), a folder or glob of images, or a video file.

    Raises:
        InputError: missing file, unreadable video, no camera at that index, no images.
    """
    if is_camera(source):
        return _open_capture(cv2.VideoCapture(int(source)), f"camera {source}", live=True)
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if is_image_name(p.name)), key=_natural_key)
        return _image_sequence(files, f"images in {path}")
    if not os.path.lexists(path) and set("*?[") & set(source):
        files = sorted(
            (Path(p) for p in glob.glob(source, recursive=True) if is_image_name(p)),
            key=_natural_key,
        )
        return _image_sequence(files, f"images matching {source}")
    if not path.is_file():
        reason = "is a dangling symlink" if path.is_symlink() else "does not exist"
        raise InputError(f"video {source} {reason}; pass a video file, a camera index or a glob")
    if not os.access(path, os.R_OK):
        raise InputError(f"video {source} is not readable (permission denied)")
    return _open_capture(cv2.VideoCapture(str(path)), f"video {source}", live=False)


def _open_capture(cap: Any, description: str, live: bool) -> FrameSource:
    if not cap.isOpened():
        hint = "check `ls /dev/video*`" if live else "not a video, or a codec OpenCV cannot read"
        raise InputError(f"cannot open {description} ({hint})")
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)

    def frames() -> Iterator[Frame]:
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            yield Frame(index, f"frame_{index:06d}", cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            index += 1

    return FrameSource(
        description=description,
        frames=frames(),
        fps=fps if fps > 0 and np.isfinite(fps) else None,
        frame_count=count if count > 0 else None,
        live=live,
        close=cap.release,
    )


def _image_sequence(files: list[Path], description: str) -> FrameSource:
    if not files:
        raise InputError(f"no images in {description.removeprefix('images ')}")

    names = [file.stem for file in files]
    if len(set(names)) < len(names):  # e.g. a/1.png and b/1.png: masks must not overwrite
        names = [f"frame_{index:06d}" for index in range(len(files))]

    def frames() -> Iterator[Frame]:
        for index, (file, name) in enumerate(zip(files, names, strict=True)):
            yield Frame(index, name, load_image(file))  # ImageReadError names the file

    return FrameSource(description=description, frames=frames(), fps=None, frame_count=len(files))


def _natural_key(path: Path) -> list[Any]:
    """Sort `f2` before `f10` (image sequences are often numbered without zero padding)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


# ---------------------------------------------------------------------------------------- helpers


class _OrderedWriter:
    """One writer thread, jobs run in submission order, at most `depth` jobs queued."""

    def __init__(self, depth: int) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cosa-stream-writer")
        self._jobs: deque[Future[None]] = deque()
        self._depth = depth

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.append(self._pool.submit(job))
        while len(self._jobs) > self._depth:
            self._jobs.popleft().result()  # re-raises the writer's error here

    def finish(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _VideoOutput:
    """The overlay video (opened on the first frame, when the size is known) and mask files."""

    def __init__(
        self, path: Path, fourcc: int, fps: float, lut: np.ndarray, masks_dir: Path | None
    ) -> None:
        self._path = path
        self._fourcc = fourcc
        self._fps = fps
        self._lut = lut
        self._masks_dir = masks_dir
        self._video: Any = None

    def write(self, frame: Frame, mask: np.ndarray) -> None:
        """Append `frame` with `mask` overlaid; write the mask PNG if asked. Writer thread only."""
        if self._video is None:
            height, width = frame.image.shape[:2]
            self._video = cv2.VideoWriter(str(self._path), self._fourcc, self._fps, (width, height))
            if not self._video.isOpened():
                raise ConfigError(f"OpenCV cannot write a video to {self._path.parent}")
        overlay = blend_overlay(frame.image, mask, self._lut)
        self._video.write(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        if self._masks_dir is not None:
            write_mask(mask, self._masks_dir / f"{frame.name}.png", "png", self._lut)

    def release(self) -> None:
        """Finish the container (the file is complete only after this)."""
        if self._video is not None:
            self._video.release()
            self._video = None


def _fourcc(out: Path) -> int:
    codec = VIDEO_CODECS.get(out.suffix.lower())
    if codec is None:
        raise ConfigError(
            f"cannot tell the video format of {out}; use one of the suffixes "
            f"{', '.join(sorted(VIDEO_CODECS))}"
        )
    return int(cv2.VideoWriter.fourcc(*codec))


# ------------------------------------------------------------------------------------------- run


def run_stream(
    source: str,
    out: Path,
    runner: Runner,
    masks_dir: Path | None = None,
    *,
    max_in_flight: int = 4,
    fps: float | None = None,
    max_frames: int | None = None,
    progress: bool = False,
) -> StreamSummary:
    """Segment every frame of `source` into an overlay video `out` (see the module docstring).

    Args:
        source: video file, camera index ("0"), folder of images, or image glob ("seq/*.png").
        out: output video; suffix .mp4/.m4v/.mov (MPEG-4 part 2) or .avi (Motion JPEG).
        runner: local runner or Triton client (not closed here); a gRPC client streams the
            frames (`stream`), an HTTP client sends batch-1 requests (`infer_many`), a local
            runner with `parallel_calls` > 1 runs that many frames at once (at most
            `max_in_flight`).
        masks_dir: if given, also write each frame's palette PNG mask there.
        max_in_flight: frames handed to the backend and not yet returned (and frames read ahead).
        fps: frame rate of the output; default the source's (30 for image sequences).
        max_frames: stop after this many frames (cameras are endless).
        progress: show a progress bar on stderr.

    Returns:
        The summary (frame count, FPS, latency percentiles).

    Raises:
        ConfigError: unknown video suffix, bad `max_in_flight` / `fps`, output not writable.
        InputError: unreadable source, no frames, frames of different sizes.
        ServingError, MissingDependencyError: from the runner; the partial video is removed.
    """
    if max_in_flight < 1:
        raise ConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"fps must be positive, got {fps}")
    fourcc = _fourcc(out)
    lut = palette_lut(runner.spec.palette)
    src = open_source(source)
    warnings: list[str] = []
    video_fps = fps or src.fps
    if video_fps is None:
        video_fps = DEFAULT_FPS
        warnings.append(f"{src.description} has no frame rate; writing at {DEFAULT_FPS} fps")
    frames: Iterator[Frame] = src.frames
    if max_frames is not None:
        frames = itertools.islice(frames, max_frames)
    try:
        with atomic_path(out) as tmp_video:
            output = _VideoOutput(tmp_video, fourcc, video_fps, lut, masks_dir)
            stats = _run(frames, output, runner, max_in_flight, src, progress, warnings)
    finally:
        src.close()
    announced = src.frame_count
    if announced and stats.frames < announced and max_frames is None and not src.live:
        warnings.append(
            f"{src.description} announces {announced} frames but only {stats.frames} could be "
            "read (a damaged or truncated file)"
        )
    return StreamSummary(
        frames=stats.frames,
        fps=stats.frames / stats.seconds if stats.seconds > 0 else 0.0,
        latency_p50_ms=stats.percentile(50),
        latency_p95_ms=stats.percentile(95),
        out=out,
        size=stats.size,
        video_fps=video_fps,
        masks_dir=masks_dir,
        warnings=warnings,
    )


@dataclass
class _Stats:
    frames: int = 0
    seconds: float = 0.0
    size: tuple[int, int] = (0, 0)
    latencies: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000.0) if self.latencies else 0.0


def _run(
    frames: Iterator[Frame],
    output: _VideoOutput,
    runner: Runner,
    max_in_flight: int,
    src: FrameSource,
    progress: bool,
    warnings: list[str],
) -> _Stats:
    """The pipeline proper; raises on any error so that the caller discards the video."""
    stats = _Stats()
    start = time.perf_counter()
    stop = threading.Event()
    in_flight: deque[tuple[Frame, float]] = deque()  # handed to the backend, result pending
    writer = _OrderedWriter(depth=max_in_flight)

    def requests() -> Iterator[np.ndarray]:
        """Batch-1 requests; may be consumed by the client's own sender thread."""
        for frame in prefetch(frames, depth=max_in_flight, stop=stop, name="cosa-stream-reader"):
            in_flight.append((frame, time.perf_counter()))
            yield images_to_batch([frame.image])

    results = _results(runner, requests(), max_in_flight)
    bar = tqdm(
        total=src.frame_count, unit="frame", desc="stream", file=sys.stderr, disable=not progress
    )
    try:
        for result in results:
            frame, sent = in_flight.popleft()
            stats.latencies.append(time.perf_counter() - sent)
            height, width = frame.image.shape[:2]
            if stats.frames == 0:
                stats.size = (width, height)
            elif stats.size != (width, height):
                raise InputError(
                    f"{src.description}: frame {frame.name} is {width}x{height}, the first frame "
                    f"{stats.size[0]}x{stats.size[1]}; a video needs one size"
                )
            mask = result[MASK_NAME][0]
            if mask.shape != (height, width):
                raise ServingError(
                    f"the model returned a {mask.shape} mask for a {width}x{height} frame; "
                    "check the artifact"
                )
            writer.submit(functools.partial(output.write, frame, mask))
            stats.frames += 1
            bar.update(1)
        writer.finish()
    except KeyboardInterrupt:
        if not src.live:
            raise
        # A camera has no end: Ctrl-C ends the recording, which is kept.
        warnings.append(f"stopped by Ctrl-C after {stats.frames} frames")
        writer.finish()
    finally:
        stop.set()
        results.close()  # stops the client's stream / in-flight window
        writer.shutdown()
        bar.close()
        output.release()
    if stats.frames == 0:
        raise InputError(f"{src.description} has no readable frames")
    stats.seconds = time.perf_counter() - start
    return stats


def _results(
    runner: Runner, requests: Iterator[np.ndarray], max_in_flight: int
) -> Generator[dict[str, np.ndarray], None, None]:
    """Results of batch-1 `requests`, in order, through the best path the backend offers."""
    stream = getattr(runner, "stream", None)
    infer_many = getattr(runner, "infer_many", None)
    if stream is not None and getattr(runner, "protocol", None) == "grpc":
        answers = stream(requests, max_in_flight=max_in_flight)  # yields (frame index, result)
        try:
            for _, result in answers:
                yield result
        finally:
            answers.close()
    elif infer_many is not None:
        yield from infer_many(requests, max_in_flight=max_in_flight)
    else:
        calls = getattr(runner, "parallel_calls", 1)
        yield from ordered_calls(runner.infer, requests, calls, max_in_flight)
