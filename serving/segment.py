"""`cosa segment`: images, folders and globs to mask files, with decoding and encoding overlapped
with inference, and memory bounded whatever the number of images.

Pipeline (one process, four stages):

    decode threads --(in order)--> size groups, float batches --(ready)--> runner.infer --> encode
    load_image()      <= prefetch    batching thread, <= window    <= ready    main thread   threads

- Decoding runs `decode_workers` threads at most `prefetch` images ahead of inference (Pillow and
  onnxruntime release the GIL, so decoding overlaps inference).
- A batching thread collects decoded images in order, groups them by size and converts each batch
  to the float32 deploy input, keeping up to `ready` batches built ahead. The main thread does
  nothing between two model calls but hand the masks to the encoders, so the model never waits for
  Python (building batches on the inference thread left the cores idle between calls).
- The deploy graph takes any H, W but a batch has one size, and masks must have each image's own
  displayed size (no resizing, no padding: padding changes what the model sees near the border).
  Decoded images therefore wait in per-size groups; a group is inferred when it holds `batch_size`
  images, or, when more than `window` images wait, the group holding the oldest one is inferred as
  a partial batch (a batch of 1 for an image whose size nobody shares).
- Masks (and overlays) are written by `encode_workers` threads, at most `encode_queue` images
  behind inference, each file atomically.
- With a backend that has `infer_many` (the Triton client), up to `max_in_flight` batches are
  outstanding at once, so that the server's dynamic batcher can merge them.
At any moment at most `PipelineLimits.max_images(batch_size)` decoded images are alive.

Bad inputs never stop the run: each is reported in `SegmentSummary.failed` with its reason. What
stops it is what no later image can escape: a broken model or an unreachable server
(`ServingError`, `MissingDependencyError`), or Ctrl-C; files already written stay complete.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cosa.choices import MaskFormat, parse_choice
from cosa.errors import ConfigError, InputError, ServingError
from cosa.export.spec import MASK_NAME
from cosa.images import SUPPORTED_SUFFIXES, ImageReadError, load_image
from cosa.serving.background import ordered_calls, prefetch
from cosa.serving.discovery import InputItem, discover_inputs
from cosa.serving.masks import (
    mask_path,
    overlay_path,
    palette_lut,
    write_mask,
    write_overlay,
)
from cosa.serving.runners import Runner, images_to_batch

__all__ = [
    "Failure",
    "InputPlan",
    "PipelineLimits",
    "SegmentSummary",
    "SizeGrouper",
    "check_segment_options",
    "plan_inputs",
    "segment_inputs",
    "segment_items",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """An input that produced no mask, and why (the reason does not repeat the path)."""

    path: str
    error: str


@dataclass
class SegmentSummary:
    """What `segment_inputs` did.

    Attributes:
        processed: inputs whose outputs were written in this run.
        failed: inputs without outputs, in discovery order.
        warnings: things done that the user may not expect (skipped folders, ignored files, ...).
        out: the output folder.
        seconds: wall time of the whole call.
        skipped: inputs left alone by `skip_existing` because their outputs exist.
    """

    processed: int
    failed: list[Failure]
    warnings: list[str]
    out: Path
    seconds: float
    skipped: int = 0

    @property
    def images_per_second(self) -> float:
        """Processed images per second of wall time."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """The `--json` object: processed, failed [{path, error}], warnings, out, skipped,
        seconds."""
        return {
            "processed": self.processed,
            "failed": [{"path": f.path, "error": f.error} for f in self.failed],
            "warnings": list(self.warnings),
            "out": str(self.out),
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class PipelineLimits:
    """Queue bounds of the pipeline, in images.

    Attributes:
        prefetch: images being decoded or decoded ahead of grouping.
        window: decoded images waiting in size groups.
        ready: batches converted and waiting for the model (>= 1).
        encode_queue: images whose outputs are being written (or wait for a writer).
        in_flight: batches handed to the backend and not yet answered: up to this many with
            `infer_many` (the Triton client), up to `parallel_calls + 1` with a local runner
            that serves parallel calls, else one.
    """

    prefetch: int
    window: int
    encode_queue: int
    in_flight: int
    ready: int = 2

    @classmethod
    def for_batch(
        cls, batch_size: int, decode_workers: int, encode_workers: int, in_flight: int = 4
    ) -> PipelineLimits:
        """Defaults: enough to keep every stage busy, independent of the number of images."""
        return cls(
            prefetch=batch_size + decode_workers,
            window=2 * batch_size,
            encode_queue=batch_size + encode_workers,
            in_flight=in_flight,
        )

    def max_images(self, batch_size: int) -> int:
        """Upper bound of decoded images alive at once: every queue full, plus the group being
        assembled, the batches ready for the model (one more blocked handing over) and the
        batches in flight."""
        batches = self.in_flight + self.ready + 2
        return self.prefetch + self.window + self.encode_queue + batches * batch_size


Group = list[tuple[InputItem, np.ndarray]]


class SizeGrouper:
    """Groups decoded images by (H, W) so that batches hold one size, within a bounded window."""

    def __init__(self, batch_size: int, window: int) -> None:
        """
        Args:
            batch_size: images per full batch (>= 1).
            window: most images held; beyond it the oldest group leaves as a partial batch.
        """
        self._batch_size = batch_size
        self._window = max(window, batch_size - 1)
        # Insertion order = order of each group's oldest image: the first group is the oldest.
        self._groups: dict[tuple[int, int], Group] = {}
        self._held = 0

    @property
    def held(self) -> int:
        """Images currently waiting."""
        return self._held

    def add(self, item: InputItem, image: np.ndarray) -> list[Group]:
        """Add one (H, W, 3) image; return the groups that are ready to infer (full or evicted)."""
        key = (int(image.shape[0]), int(image.shape[1]))
        group = self._groups.setdefault(key, [])
        group.append((item, image))
        self._held += 1
        ready = []
        if len(group) >= self._batch_size:
            ready.append(self._pop(key))
        while self._held > self._window:
            ready.append(self._pop(next(iter(self._groups))))
        return ready

    def drain(self) -> list[Group]:
        """All waiting groups, oldest first."""
        return [self._pop(key) for key in list(self._groups)]

    def _pop(self, key: tuple[int, int]) -> Group:
        group = self._groups.pop(key)
        self._held -= len(group)
        return group


def segment_inputs(
    inputs: Sequence[str],
    out: Path,
    runner: Runner,
    batch_size: int = 4,
    fmt: MaskFormat = "png",
    overlay: bool = False,
    skip_existing: bool = False,
    progress: bool = False,
    *,
    decode_workers: int = 2,
    encode_workers: int = 2,
    max_in_flight: int = 4,
    limits: PipelineLimits | None = None,
) -> SegmentSummary:
    """Segment every image named by `inputs` into `out` (see the module docstring).

    Args:
        inputs: files, folders (recursive) and globs (see `cosa.serving.discovery`).
        out: output folder; masks keep each input's relative path and stem.
        runner: an open runner or Triton client (not closed here).
        batch_size: images per inference call (same-size images only).
        fmt: "png" (palette PNG) or "npy" (int32 ids).
        overlay: also write `<stem>.overlay.jpg`.
        skip_existing: leave inputs alone whose outputs all exist.
        progress: show a progress bar on stderr.
        decode_workers: image decoding threads.
        encode_workers: mask writing threads.
        max_in_flight: batches outstanding at once with a backend that has `infer_many` (the
            Triton client: concurrent requests are what its dynamic batcher merges); also caps
            a local runner's `parallel_calls`.
        limits: queue bounds; default `PipelineLimits.for_batch(...)` (overrides the above).

    Returns:
        The summary; `failed` is non-empty when some input produced no mask (the CLI exits 1).

    Raises:
        ConfigError: bad batch size / format / worker counts, `out` not a writable folder, a
            palette that a PNG cannot hold.
        InputError: the inputs name no image at all.
        ServingError, MissingDependencyError: from the runner; the run stops (outputs written so
            far are complete files).
    """
    start = time.perf_counter()
    check_segment_options(batch_size, fmt, decode_workers, encode_workers, max_in_flight)
    # Colours are only needed for palette PNGs and overlays (npy holds any number of classes).
    palette_lut(runner.spec.palette if fmt == "png" or overlay else ())
    plan = plan_inputs(inputs, out, fmt, overlay, skip_existing)
    with tqdm(
        total=len(plan.todo), unit="img", desc="segment", file=sys.stderr, disable=not progress
    ) as bar:
        processed, failed = segment_items(
            plan.todo,
            out,
            runner,
            batch_size,
            fmt,
            overlay,
            decode_workers=decode_workers,
            encode_workers=encode_workers,
            max_in_flight=max_in_flight,
            limits=limits,
            bar=bar,
        )
    return SegmentSummary(
        processed=processed,
        failed=plan.failed + sorted(failed, key=plan.order),
        warnings=plan.warnings,
        out=out,
        seconds=time.perf_counter() - start,
        skipped=plan.skipped,
    )


def check_segment_options(
    batch_size: int,
    fmt: str,
    decode_workers: int = 2,
    encode_workers: int = 2,
    max_in_flight: int = 4,
) -> None:
    """Raises ConfigError for a batch size, worker count or mask format `segment_inputs` refuses."""
    if min(batch_size, decode_workers, encode_workers, max_in_flight) < 1:
        raise ConfigError(
            f"batch size ({batch_size}), worker counts ({decode_workers}, {encode_workers}) and "
            f"max_in_flight ({max_in_flight}) must be at least 1"
        )
    parse_choice(MaskFormat, fmt, "mask format")  # raises ConfigError listing the choices


@dataclass
class InputPlan:
    """What `plan_inputs` found: the images to segment and what is already known about the rest.

    Attributes:
        todo: images to segment, in discovery order.
        failed: inputs refused by discovery.
        warnings: discovery's warnings, and the count skipped by `skip_existing`.
        skipped: images whose outputs exist (`skip_existing`).
        positions: input path -> discovery index, to report failures in input order.
    """

    todo: list[InputItem]
    failed: list[Failure]
    warnings: list[str]
    skipped: int
    positions: dict[str, int]

    def order(self, failure: Failure) -> int:
        """Sort key that puts failures in discovery order."""
        return self.positions.get(failure.path, -1)


def plan_inputs(
    inputs: Sequence[str], out: Path, fmt: MaskFormat, overlay: bool, skip_existing: bool
) -> InputPlan:
    """Discovers the images of `inputs`, creates `out`, and leaves out those whose outputs exist
    when `skip_existing` is set.

    Raises:
        InputError: the inputs name no image at all.
        ConfigError: `out` cannot be created as a folder.
    """
    found = discover_inputs(inputs, exclude=out)
    failed = [Failure(r.path, r.error) for r in found.rejected]
    warnings = list(found.warnings)
    if not found.items and not found.rejected:
        raise InputError(
            f"no images found in {' '.join(inputs)} (image suffixes: "
            f"{' '.join(sorted(SUPPORTED_SUFFIXES))})"
        )
    _prepare_out(out)
    todo = found.items
    if skip_existing:
        todo = [i for i in found.items if not _outputs_exist(i, out, fmt, overlay)]
    skipped = len(found.items) - len(todo)
    if skipped:
        warnings.append(f"skipped {skipped} input(s) whose outputs exist (--skip-existing)")
    positions = {str(i.path): i.index for i in found.items}
    return InputPlan(todo, failed, warnings, skipped, positions)


def segment_items(
    items: Sequence[InputItem],
    out: Path,
    runner: Runner,
    batch_size: int = 4,
    fmt: MaskFormat = "png",
    overlay: bool = False,
    *,
    decode_workers: int = 2,
    encode_workers: int = 2,
    max_in_flight: int = 4,
    limits: PipelineLimits | None = None,
    bar: tqdm | None = None,
) -> tuple[int, list[Failure]]:
    """Runs the pipeline over discovered `items` (arguments as for `segment_inputs`).

    This is `segment_inputs` without discovery: the Ray engine's workers run it on their share.

    Returns:
        (images whose outputs were written, failures in completion order).

    Raises:
        As `segment_inputs`, but InputError (no discovery here).
    """
    check_segment_options(batch_size, fmt, decode_workers, encode_workers, max_in_flight)
    lut = palette_lut(runner.spec.palette if fmt == "png" or overlay else ())
    pipeline = _Pipeline(
        runner=runner,
        out=out,
        fmt=fmt,
        overlay=overlay,
        lut=lut,
        batch_size=batch_size,
        limits=limits
        or PipelineLimits.for_batch(batch_size, decode_workers, encode_workers, max_in_flight),
    )
    progress = bar if bar is not None else tqdm(total=len(items), disable=True)
    try:
        pipeline.run(items, decode_workers, encode_workers, progress)
    finally:
        if bar is None:
            progress.close()
    return pipeline.processed, pipeline.failed


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigError(f"--out {out} is a file; pass a folder") from exc
    except OSError as exc:
        raise ConfigError(f"cannot create --out {out} ({exc.strerror or exc})") from exc


def _outputs_exist(item: InputItem, out: Path, fmt: MaskFormat, overlay: bool) -> bool:
    if not mask_path(out, item.stem, fmt).is_file():
        return False
    return not overlay or overlay_path(out, item.stem).is_file()


class _Pipeline:
    """One run's state. Decode failures are reported by the batching thread, everything else by
    the main thread; `_lock` guards the counters, the failure list and the progress bar."""

    def __init__(
        self,
        runner: Runner,
        out: Path,
        fmt: MaskFormat,
        overlay: bool,
        lut: np.ndarray,
        batch_size: int,
        limits: PipelineLimits,
    ) -> None:
        self.runner = runner
        self.out = out
        self.fmt = fmt
        self.overlay = overlay
        self.lut = lut
        self.batch_size = batch_size
        self.limits = limits
        self.processed = 0
        self.failed: list[Failure] = []
        self._bar: tqdm | None = None
        self._lock = threading.Lock()
        self._encoding: deque[tuple[InputItem, Future[None]]] = deque()

    def run(
        self, items: Iterable[InputItem], decode_workers: int, encode_workers: int, bar: tqdm
    ) -> None:
        self._bar = bar
        decoder = ThreadPoolExecutor(decode_workers, thread_name_prefix="cosa-decode")
        encoder = ThreadPoolExecutor(encode_workers, thread_name_prefix="cosa-encode")
        in_flight: deque[Group] = deque()  # groups handed to the runner, result pending
        ready = prefetch(
            self._batches(self._groups(items, decoder)),
            depth=self.limits.ready,
            name="cosa-batch",
        )
        results = self._results(self._requests(ready, in_flight))
        try:
            for result in results:
                group = in_flight.popleft()
                if isinstance(result, BaseException):
                    self._fail_group(group, result)
                else:
                    self._encode(group, result[MASK_NAME], encoder)
            while self._encoding:
                self._collect_oldest()
        finally:
            # On an abort (server down, Ctrl-C): wait for the model calls running, stop the
            # batching thread (it submits decodes), drop queued work, let running writes finish
            # (each is atomic), never leave a thread working after we return.
            results.close()
            ready.close()
            decoder.shutdown(wait=True, cancel_futures=True)
            encoder.shutdown(wait=True, cancel_futures=True)
            self._bar = None

    def _groups(self, items: Iterable[InputItem], decoder: ThreadPoolExecutor) -> Iterator[Group]:
        """Decoded images in same-size groups; decoding runs `prefetch` images ahead."""
        grouper = SizeGrouper(self.batch_size, self.limits.window)
        decoding: deque[tuple[InputItem, Future[np.ndarray]]] = deque()
        pending = iter(items)
        while True:
            while len(decoding) < self.limits.prefetch:
                item = next(pending, None)
                if item is None:
                    break
                decoding.append((item, decoder.submit(load_image, item.path)))
            if not decoding:
                break
            item, future = decoding.popleft()
            image = self._decoded(item, future)
            del future  # the future holds the image until dropped
            if image is not None:
                yield from grouper.add(item, image)
                del image
        yield from grouper.drain()

    @staticmethod
    def _batches(groups: Iterator[Group]) -> Iterator[tuple[Group, np.ndarray]]:
        """Each group with its deploy-graph batch, float32 (N, 3, H, W)."""
        for group in groups:
            yield group, images_to_batch([image for _, image in group])

    @staticmethod
    def _requests(
        ready: Iterator[tuple[Group, np.ndarray]], in_flight: deque[Group]
    ) -> Iterator[np.ndarray]:
        """The batches of `ready`; each group waits in `in_flight` until its result is in."""
        for group, batch in ready:
            in_flight.append(group)
            yield batch

    def _results(
        self, requests: Iterator[np.ndarray]
    ) -> Generator[dict[str, np.ndarray] | Exception, None, None]:
        """Results in request order; a per-batch input problem comes back as the exception.

        A backend with `infer_many` (the Triton client) gets `in_flight` requests at once, which
        is what lets the server's dynamic batcher merge them; a local runner gets its
        `parallel_calls` (at most `in_flight`) at once, else one at a time.
        """
        infer_many = getattr(self.runner, "infer_many", None)
        if infer_many is not None and self.limits.in_flight > 1:
            yield from infer_many(requests, max_in_flight=self.limits.in_flight)
            return
        calls = getattr(self.runner, "parallel_calls", 1)
        yield from ordered_calls(self._infer, requests, calls, self.limits.in_flight)

    def _infer(self, batch: np.ndarray) -> dict[str, np.ndarray] | Exception:
        """One local call; an input problem of this batch alone comes back as the exception."""
        try:
            return self.runner.infer(batch)
        except (InputError, MemoryError) as exc:  # e.g. outside a TensorRT profile
            return exc

    def _decoded(self, item: InputItem, future: Future[np.ndarray]) -> np.ndarray | None:
        try:
            return future.result()
        except ImageReadError as exc:
            self._fail(item, exc.reason)
        except InputError as exc:
            self._fail(item, str(exc))
        except MemoryError:
            self._fail(item, "out of memory while decoding; downscale the image")
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            log.exception("unexpected error decoding %s", item.path)
            self._fail(item, f"unexpected decoder error: {type(exc).__name__}: {exc}")
        return None

    def _fail_group(self, group: Group, error: BaseException) -> None:
        height, width = group[0][1].shape[:2]
        reason = (
            f"out of memory running the model at {width}x{height}"
            if isinstance(error, MemoryError)
            else str(error)
        )
        for item, _ in group:
            self._fail(item, reason)

    def _encode(self, group: Group, masks: np.ndarray, encoder: ThreadPoolExecutor) -> None:
        height, width = group[0][1].shape[:2]
        if masks.shape != (len(group), height, width):
            raise ServingError(
                f"the model returned masks of shape {masks.shape} for {len(group)} image(s) of "
                f"{width}x{height}; expected ({len(group)}, {height}, {width}); check the artifact"
            )
        for (item, image), mask in zip(group, masks, strict=True):
            future = encoder.submit(self._write, item, image if self.overlay else None, mask)
            self._encoding.append((item, future))
        while len(self._encoding) > self.limits.encode_queue:
            self._collect_oldest()

    def _write(self, item: InputItem, image: np.ndarray | None, mask: np.ndarray) -> None:
        """Runs in an encoder thread: the mask, then the overlay, each atomically."""
        write_mask(mask, mask_path(self.out, item.stem, self.fmt), self.fmt, self.lut)
        if image is not None:
            write_overlay(image, mask, overlay_path(self.out, item.stem), self.lut)

    def _collect_oldest(self) -> None:
        item, future = self._encoding.popleft()
        try:
            future.result()
        except OSError as exc:
            name = exc.filename or self.out
            self._fail(item, f"cannot write {name}: {exc.strerror or exc}")
            return
        except ValueError as exc:  # ids outside 0-255 for a palette PNG
            self._fail(item, f"cannot encode the mask: {exc}; use --format npy")
            return
        with self._lock:
            self.processed += 1
            if self._bar is not None:
                self._bar.update(1)

    def _fail(self, item: InputItem, reason: str) -> None:
        log.warning("%s: %s", item.path, reason)
        with self._lock:
            self.failed.append(Failure(str(item.path), reason))
            if self._bar is not None:
                self._bar.update(1)
                self._bar.set_postfix(failed=len(self.failed), refresh=False)
