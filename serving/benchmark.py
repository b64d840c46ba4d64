"""`cosa benchmark`: every network of an export folder that a runtime here can run, measured on
this machine, and which one to deploy.

For each network (each ONNX file in onnxruntime, the engine in TensorRT, the source checkpoint in
torch, the served model through Triton): mean and p95 latency and images/s per batch size on
seeded random images of one size, the peak memory its loading and warm-up added to this process,
the agreement of its masks with the FP32 graph's, and, given a scorer (`cosa benchmark --data`),
its mIoU scored as `cosa eval` scores (the CLI passes `cosa.evaluation.evaluate`: this module
knows nothing of datasets); without one, the agreement is measured on the export's calibration
images (calib.npz) when it has them. The recommendation is the fastest network within
`MAX_MIOU_DROP_POINTS` of FP32, or the reason none qualifies.

Each network is loaded and warmed up alone (so that the memory it adds is its own), then all of
them are timed taking turns call by call (`time_calls`, as benchmarks/inference.py does), which
spreads a burst of load from other processes over all of them: on a shared machine their ratios
hold even when the absolute times do not. A runtime that is not installed or cannot run
here is reported as skipped with the reason; a network that fails to load or run is reported in
its row and the others are still measured.
"""

from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cosa.choices import Backend, WireProtocol, parse_choice
from cosa.errors import ConfigError, CosaError
from cosa.export.layout import (
    FILES,
    Machine,
    Role,
    Runtime,
    choose_artifact,
    describe_role,
    present_networks,
    role_precision,
)
from cosa.export.spec import MASK_NAME, ModelSpec, read_spec
from cosa.serving.runners import DEFAULT_TRITON_MODEL, Runner, images_to_batch

__all__ = [
    "DEFAULT_BACKENDS",
    "MAX_MIOU_DROP_POINTS",
    "BenchmarkOptions",
    "BenchmarkReport",
    "LatencyStats",
    "NetworkResult",
    "PeakMemory",
    "Scorer",
    "Skipped",
    "benchmark_artifacts",
    "mask_agreement",
    "time_calls",
]

K = TypeVar("K")

MAX_MIOU_DROP_POINTS = 1.0
"""A network qualifies for the recommendation when its mIoU is at most this many points below
FP32's (the INT8 target of issue 4)."""

DEFAULT_BACKENDS: tuple[Backend, ...] = tuple(b for b in Backend if b is not Backend.AUTO)
"""Every runtime; those that cannot run here are reported as skipped (Triton without a URL)."""

Predict = Callable[[np.ndarray], np.ndarray]
"""One uint8 image (H, W, 3) -> float32 logits (K, H, W), as `cosa.evaluation` predictors."""
Scorer = Callable[[Predict], float | None]
"""Scores a predictor on a split: mIoU as a fraction, None when the split has no masks."""
Progress = Callable[[str, int, int], None]
"""`(network, done, total)`: steps of the network being measured."""


# ------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one network at one batch size, over `calls` timed calls."""

    batch: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    images_per_s: float  # batch / mean latency
    calls: int

    @classmethod
    def from_seconds(cls, batch: int, seconds: Sequence[float]) -> LatencyStats:
        mean = statistics.fmean(seconds)
        return cls(
            batch=batch,
            mean_ms=1e3 * mean,
            p50_ms=1e3 * statistics.median(seconds),
            p95_ms=1e3 * float(np.percentile(seconds, 95)),
            images_per_s=batch / mean,
            calls=len(seconds),
        )


def time_calls(
    calls: Mapping[K, Callable[[], Any]],
    batch: int,
    warmup: int = 1,
    repeats: int = 5,
    min_seconds: float = 0.0,
    on_call: Callable[[], None] | None = None,
) -> dict[K, LatencyStats]:
    """Time each of `calls`, taking turns call by call (round robin).

    Each call runs `warmup` untimed times, then rounds of one timed call each run until every one
    has `repeats` timed calls and the rounds took `min_seconds` in all. Taking turns spreads a
    burst of load from other processes over all the calls instead of one call's whole series.

    Args:
        calls: key -> a call that processes one batch of `batch` images.
        batch: images per call (for images/s).
        warmup: untimed calls each, first.
        repeats: timed calls each, at least (>= 1).
        min_seconds: keep timing until the timed rounds took this long.
        on_call: called after every call (a progress bar).

    Returns:
        key -> latency statistics.
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be at least 1, got {repeats}")
    for call in calls.values():
        for _ in range(warmup):
            call()
            if on_call is not None:
                on_call()
    series: dict[K, list[float]] = {key: [] for key in calls}
    started = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - started < min_seconds:
        for key, call in calls.items():
            tic = time.perf_counter()
            call()
            series[key].append(time.perf_counter() - tic)
            if on_call is not None:
                on_call()
        rounds += 1
    return {key: LatencyStats.from_seconds(batch, s) for key, s in series.items()}


def mask_agreement(masks: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Share of pixels whose id equals the reference's, over all masks (same shapes)."""
    same = sum(int(np.count_nonzero(a == b)) for a, b in zip(masks, reference, strict=True))
    total = sum(m.size for m in reference)
    return same / total if total else float("nan")


class PeakMemory:
    """The most resident memory this process used above its level at `__enter__`, in MiB.

    A thread samples the resident set size (Linux `/proc/self/statm`) every `interval` seconds;
    elsewhere `peak_mib` is None. With torch's CUDA initialised, `gpu_peak_mib` is the most CUDA
    memory torch allocated meanwhile (TensorRT and torch runners; onnxruntime's CUDA arena is not
    torch's and is not counted).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_mib: float | None = None
        self.gpu_peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._base = 0
        self._peak = 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int | None:
        try:
            with open("/proc/self/statm", "rb") as fh:
                return int(fh.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._rss()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> PeakMemory:
        _release_freed_memory()
        base = self._rss()
        torch_cuda = _torch_cuda()
        if torch_cuda is not None:
            torch_cuda.reset_peak_memory_stats()
        if base is not None:
            self._base = self._peak = base
            self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            rss = self._rss() or 0
            self.peak_mib = max(self._peak, rss, self._base) / 2**20 - self._base / 2**20
        torch_cuda = _torch_cuda()
        if torch_cuda is not None:
            self.gpu_peak_mib = torch_cuda.max_memory_allocated() / 2**20


def _release_freed_memory() -> None:
    """Hand memory freed by earlier networks back to the OS (glibc keeps it mapped otherwise), so
    that the next network's growth shows in the resident set size."""
    import contextlib
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # glibc only


def _torch_cuda() -> Any:
    """`torch.cuda` when torch is already imported and CUDA is initialised, else None."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


# ------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BenchmarkOptions:
    """What `benchmark_artifacts` measures.

    Attributes:
        backends: runtimes to try (auto is not one); Triton needs `url`.
        url, protocol, triton_model: the Triton server and model (backend triton).
        batches: batch sizes to time, each >= 1; the first decides "fastest".
        size: (H, W) of the timing images; None: the export's optimization profile opt size.
        warmup: untimed calls per batch size.
        repeats: timed calls per batch size, at least.
        min_seconds: keep timing a batch size until its calls took this long.
        threads: onnxruntime intra-op threads (0: onnxruntime's default).
        seed: of the random timing images.
    """

    backends: tuple[Backend, ...] = DEFAULT_BACKENDS
    url: str | None = None
    protocol: WireProtocol = WireProtocol.GRPC
    triton_model: str = DEFAULT_TRITON_MODEL
    batches: tuple[int, ...] = (1, 8)
    size: tuple[int, int] | None = None
    warmup: int = 1
    repeats: int = 5
    min_seconds: float = 1.0
    threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises: ConfigError for an invalid option."""
        backends = tuple(parse_choice(Backend, b, "backend") for b in self.backends)
        if not backends or Backend.AUTO in backends:
            raise ConfigError(
                "--backends lists runtimes to measure: some of "
                + ", ".join(b for b in Backend if b is not Backend.AUTO)
            )
        object.__setattr__(self, "backends", tuple(dict.fromkeys(backends)))
        object.__setattr__(self, "protocol", parse_choice(WireProtocol, self.protocol, "protocol"))
        if not self.batches or min(self.batches) < 1:
            raise ConfigError(f"--batch needs sizes >= 1, got {list(self.batches)}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ConfigError(f"--size needs HxW with two positive integers, got {self.size}")
        if self.repeats < 1 or self.warmup < 0 or self.min_seconds < 0:
            raise ConfigError("--repeats must be >= 1, warm-up and seconds >= 0")
        if self.url is not None and Backend.TRITON not in self.backends:
            raise ConfigError("--url is for the triton backend; add triton to --backends")


@dataclass
class NetworkResult:
    """One row: a network in one runtime.

    `miou` is a percentage (None without a scorer); `agreement` the share of pixels whose id
    equals the FP32 graph's (on the scored split, or on the calibration images without one);
    `chosen` whether `cosa segment` runs this file for its precision here (`choose_artifact`).
    """

    name: str
    role: str
    precision: str
    runtime: str
    device: str
    file: str | None
    description: str
    latency: list[LatencyStats] = field(default_factory=list)
    peak_memory_mib: float | None = None
    gpu_peak_memory_mib: float | None = None
    miou: float | None = None
    agreement: float | None = None
    chosen: bool = False
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def at(self, batch: int) -> LatencyStats | None:
        return next((s for s in self.latency if s.batch == batch), None)


@dataclass(frozen=True)
class Skipped:
    """A runtime not measured, and why."""

    runtime: str
    reason: str


@dataclass
class BenchmarkReport:
    """Everything `cosa benchmark` prints; `to_json` is its `--json` object."""

    folder: Path
    machine: str
    size: tuple[int, int]
    batches: tuple[int, ...]
    networks: list[NetworkResult]
    skipped: list[Skipped]
    scored: bool  # mIoU measured (a scorer was given)
    agreement_on: str  # "the scored split", "8 calibration images (calib.npz)", ...
    reference: str | None  # the FP32 row's name
    recommended: str | None
    recommendation: str
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "machine": self.machine,
            "size": list(self.size),
            "batches": list(self.batches),
            "networks": [asdict(n) for n in self.networks],
            "skipped": [asdict(s) for s in self.skipped],
            "scored": self.scored,
            "agreement_on": self.agreement_on,
            "reference": self.reference,
            "recommended": self.recommended,
            "recommendation": self.recommendation,
            "seconds": round(self.seconds, 1),
        }

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """(header, rows) of the table, one row per network, numbers formatted."""
        header = ["network", "runtime", "prec."]
        for batch in self.batches:
            header += [f"b{batch} ms", f"b{batch} p95", f"b{batch} img/s"]
        header += ["MiB", "mIoU", "=FP32"]
        rows = []
        for net in self.networks:
            row = [net.name + (" *" if net.name == self.recommended else ""), net.runtime]
            row.append(net.precision)
            for batch in self.batches:
                stats = net.at(batch)
                row += (
                    [_ms(stats.mean_ms), _ms(stats.p95_ms), f"{stats.images_per_s:.3g}"]
                    if stats
                    else ["-", "-", "-"]
                )
            row.append("-" if net.peak_memory_mib is None else f"{net.peak_memory_mib:.0f}")
            row.append("-" if net.miou is None else f"{net.miou:.2f}")
            row.append("-" if net.agreement is None else f"{net.agreement:.3f}")
            if net.error:
                row = [row[0], row[1], row[2], f"failed: {net.error}"] + [""] * (len(header) - 4)
            rows.append(row)
        return header, rows

    def markdown(self) -> str:
        """The report as a markdown page (`cosa benchmark --out FILE.md`)."""
        header, rows = self.rows()
        lines = [
            f"# cosa benchmark {self.folder}",
            "",
            f"Machine: {self.machine}. Input {self.size[0]}x{self.size[1]} (random images), "
            f"batches {', '.join(map(str, self.batches))}; mIoU "
            + ("as `cosa eval` scores it" if self.scored else "not measured (no --data)")
            + f"; =FP32: mask agreement with FP32 on {self.agreement_on}; bN ms / p95: mean "
            "and 95th-percentile latency of one batch of N, the networks taking turns call by "
            "call; MiB: peak memory its loading and warm-up added; * = recommended.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
            f"Recommendation: {self.recommendation}",
        ]
        lines += [f"Skipped {s.runtime}: {s.reason}" for s in self.skipped]
        for net in self.networks:
            lines += [f"Note on {net.name}: {note}" for note in net.notes]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------- measuring


def _ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


@dataclass
class _Candidate:
    result: NetworkResult
    open: Callable[[], Runner]
    max_batch: int | None = None  # TensorRT profile
    batches: list[int] = field(default_factory=list)  # the sizes it is timed at


def benchmark_artifacts(
    folder: Path,
    options: BenchmarkOptions | None = None,
    scorer: Scorer | None = None,
    progress: Progress | None = None,
) -> BenchmarkReport:
    """Measure every network of export folder `folder` that a runtime here can run.

    Args:
        folder: written by `cosa export` (spec.json + artifacts).
        options: what to measure.
        scorer: scores a predictor on a split (`cosa.evaluation.evaluate` for `--data`); None:
            no mIoU, mask agreement on the calibration images if the folder has them.
        progress: called as each network advances.

    Returns:
        The report (rows in order: ONNX files by role, the engine, the checkpoint, Triton).

    Raises:
        ConfigError: bad options or no spec.json; ServingError: Triton asked for and not
            reachable (checked before anything is measured).
    """
    started = time.perf_counter()
    options = options or BenchmarkOptions()
    if not (folder / "spec.json").is_file():
        raise ConfigError(f"{folder} has no spec.json; pass a folder written by `cosa export`")
    spec = read_spec(folder)
    size = options.size or (int(spec.profile.opt[1]), int(spec.profile.opt[2]))
    candidates, skipped = _candidates(folder, spec, options)
    machine = _machine_line()
    sample = None if scorer is not None else _calibration_images(folder)
    rng = np.random.default_rng(options.seed)
    inputs = {b: rng.uniform(0, 255, (b, 3, *size)).astype(np.float32) for b in options.batches}
    # The FP32 graph first: every other network's masks are compared with its masks.
    candidates.sort(key=lambda c: c.result.role != Role.FP32 or c.result.runtime != "onnxruntime")
    loaded: list[tuple[_Candidate, Runner]] = []
    try:
        for candidate in candidates:
            runner = _load(candidate, options, inputs, progress)
            if runner is not None:
                loaded.append((candidate, runner))
        for batch in options.batches:
            _time_batch(batch, loaded, inputs[batch], options, progress)
        reference: list[np.ndarray] | None = None
        for candidate, runner in loaded:
            masks = _score(runner, scorer, sample, candidate.result, progress)
            if masks is None:
                continue
            result = candidate.result
            if reference is None and result.role == Role.FP32 and result.runtime == "onnxruntime":
                reference = masks  # sorted first
            if reference is not None:
                result.agreement = mask_agreement(masks, reference)
    finally:
        for _, runner in loaded:
            runner.close()
    results = [c.result for c in candidates]
    ref_row = next(
        (r for r in results if r.role == Role.FP32 and r.runtime == "onnxruntime" and not r.error),
        None,
    )
    recommended, text = _recommend(results, ref_row, options.batches[0], scorer is not None)
    return BenchmarkReport(
        folder=folder,
        machine=machine,
        size=size,
        batches=tuple(options.batches),
        networks=results,
        skipped=skipped,
        scored=scorer is not None,
        agreement_on=(
            "the scored split"
            if scorer is not None
            else f"{len(sample)} calibration images (calib.npz)"
            if sample is not None
            else "nothing (no --data, no calib.npz): not measured"
        ),
        reference=ref_row.name if ref_row else None,
        recommended=recommended,
        recommendation=text,
        seconds=time.perf_counter() - started,
    )


def _candidates(
    folder: Path, spec: ModelSpec, options: BenchmarkOptions
) -> tuple[list[_Candidate], list[Skipped]]:
    """The networks to measure, and the runtimes skipped with their reasons."""
    from cosa.serving.runners import OnnxRuntimeRunner, TorchRunner, open_runner

    candidates: list[_Candidate] = []
    skipped: list[Skipped] = []
    networks = present_networks(folder, spec)
    here = Machine("cuda" if _ort_has_cuda() else "cpu")
    if Backend.ONNXRUNTIME in options.backends:
        for role, path in networks:
            if role is Role.TENSORRT:
                continue
            precision = role_precision(role, spec)
            try:
                chosen = choose_artifact(folder, spec, Runtime.ONNXRUNTIME, precision, here)
                is_chosen = chosen.path == path
            except CosaError:
                is_chosen = False
            result = NetworkResult(
                name=path.name,
                role=str(role),
                precision=str(precision),
                runtime="onnxruntime",
                device=here.describe(),
                file=str(path),
                description=describe_role(role),
                chosen=is_chosen,
            )

            def open_ort(path: Path = path) -> Runner:
                return OnnxRuntimeRunner(path, intra_op_threads=options.threads)

            candidates.append(_Candidate(result, open_ort))
    if Backend.TENSORRT in options.backends:
        plan = dict(networks).get(Role.TENSORRT)
        reason = _tensorrt_unavailable()
        if plan is None:
            skipped.append(
                Skipped("tensorrt", "no model.plan in the folder (cosa export ... --trt)")
            )
        elif reason:
            skipped.append(Skipped("tensorrt", reason))
        else:
            from cosa.serving.tensorrt_runner import TensorRTRunner

            result = NetworkResult(
                name=plan.name,
                role=str(Role.TENSORRT),
                precision=str(spec.precision),
                runtime="tensorrt",
                device="cuda",
                file=str(plan),
                description=describe_role(Role.TENSORRT),
                chosen=True,
            )
            candidates.append(
                _Candidate(result, lambda: TensorRTRunner(folder), int(spec.profile.max[0]))
            )
    if Backend.TORCH in options.backends:
        checkpoint = Path(spec.source_checkpoint) if spec.source_checkpoint else None
        if checkpoint is None:
            skipped.append(Skipped("torch", "spec.json names no source checkpoint"))
        elif not checkpoint.is_file():
            skipped.append(
                Skipped("torch", f"the source checkpoint {checkpoint} is not on this machine")
            )
        else:
            result = NetworkResult(
                name=f"checkpoint {checkpoint.name}",
                role="checkpoint",
                precision="fp32",
                runtime="torch",
                device=_torch_device(),
                file=str(checkpoint),
                description="the trained network in PyTorch (eager)",
                chosen=True,
            )
            candidates.append(_Candidate(result, lambda: TorchRunner.from_checkpoint(checkpoint)))
    if Backend.TRITON in options.backends:
        if options.url is None:
            skipped.append(Skipped("triton", "no --url HOST:PORT of a running server"))
        else:
            # Connect now: an unreachable server is a usage error, before anything is measured.
            client = open_runner(
                folder, "triton", options.url, options.protocol, triton_model=options.triton_model
            )
            result = NetworkResult(
                name=f"triton {options.triton_model}",
                role="triton",
                precision="(server's)",
                runtime="triton",
                device=f"{options.protocol} {options.url}",
                file=None,
                description="the model the Triton server serves",
            )
            candidates.append(_Candidate(result, lambda: client))
    return candidates, skipped


def _load(
    candidate: _Candidate,
    options: BenchmarkOptions,
    inputs: dict[int, np.ndarray],
    progress: Progress | None,
) -> Runner | None:
    """Open the network and warm it up at every batch size it takes, measuring the memory that
    adds; None (and the error in its row) when it fails."""
    result = candidate.result
    limit = candidate.max_batch
    candidate.batches = [b for b in options.batches if limit is None or b <= limit]
    if len(candidate.batches) < len(options.batches):
        result.notes.append(f"batches above the engine profile's max {limit} not timed")
    warmup = max(1, options.warmup)  # a first call at each size, untimed, also checks it runs
    total = 1 + warmup * len(candidate.batches)
    if progress is not None:
        progress(result.name, 0, total)  # shown while it loads
    runner: Runner | None = None
    try:
        with PeakMemory() as memory:
            runner = candidate.open()
            done = 1
            for batch in candidate.batches:
                for _ in range(warmup):
                    if progress is not None:
                        progress(result.name, done, total)
                    runner.infer(inputs[batch])
                    done += 1
    except CosaError as exc:
        result.error = str(exc).splitlines()[0]
        if runner is not None:
            runner.close()
        return None
    result.peak_memory_mib = memory.peak_mib
    result.gpu_peak_memory_mib = memory.gpu_peak_mib
    return runner


def _time_batch(
    batch: int,
    loaded: list[tuple[_Candidate, Runner]],
    images: np.ndarray,
    options: BenchmarkOptions,
    progress: Progress | None,
) -> None:
    """Time every loaded network that takes `batch`, taking turns call by call."""
    timed = [(c, r) for c, r in loaded if batch in c.batches and c.result.error is None]
    if not timed:
        return
    label = f"timing batch {batch} ({len(timed)} networks taking turns)"
    total = options.repeats * len(timed)
    done = 0

    def call(candidate: _Candidate, runner: Runner) -> None:
        nonlocal done
        if candidate.result.error is None:
            try:
                runner.infer(images)
            except CosaError as exc:
                candidate.result.error = f"batch {batch}: {str(exc).splitlines()[0]}"
        done += 1
        if progress is not None:
            progress(label, done, total)

    calls = {id(c): functools.partial(call, c, r) for c, r in timed}
    stats = time_calls(
        calls, batch, warmup=0, repeats=options.repeats, min_seconds=options.min_seconds
    )
    for candidate, _ in timed:
        if candidate.result.error is None:
            candidate.result.latency.append(stats[id(candidate)])


def _score(
    runner: Runner,
    scorer: Scorer | None,
    sample: np.ndarray | None,
    result: NetworkResult,
    progress: Progress | None,
) -> list[np.ndarray] | None:
    """Score the runner (mIoU into `result`) and return its masks: of the scored images, else of
    `sample` (float32 (N, 3, H, W)), else None."""
    try:
        if scorer is None:
            if sample is None:
                return None
            return [runner.infer(np.ascontiguousarray(im[None]))[MASK_NAME][0] for im in sample]
    except CosaError as exc:
        result.error = f"agreement: {str(exc).splitlines()[0]}"
        return None
    masks: list[np.ndarray] = []
    num_classes = runner.spec.num_classes

    def predict(image: np.ndarray) -> np.ndarray:
        mask = runner.infer(images_to_batch([image]))[MASK_NAME][0]
        masks.append(mask.astype(np.uint8 if num_classes <= 256 else np.int32))
        if progress is not None:
            progress(f"{result.name} (scoring)", len(masks), 0)
        # One-hot logits: the scorer's argmax gives back the network's own mask.
        return np.eye(num_classes, dtype=np.float32)[mask].transpose(2, 0, 1)

    try:
        miou = scorer(predict)
    except CosaError as exc:
        result.error = f"scoring: {str(exc).splitlines()[0]}"
        return None
    result.miou = None if miou is None else 100.0 * miou
    return masks


def _recommend(
    results: list[NetworkResult], reference: NetworkResult | None, batch: int, scored: bool
) -> tuple[str | None, str]:
    """(name of the recommended row or None, one line saying which and why, or why none)."""
    timed = [r for r in results if not r.error and r.at(batch) is not None]
    if not timed:
        return None, "nothing was measured: every runtime was skipped or failed (see above)"
    fastest = max(timed, key=lambda r: r.at(batch).images_per_s)  # type: ignore[union-attr]
    if reference is None or reference.at(batch) is None:
        return None, (
            "no FP32 graph was measured in onnxruntime, so no network can be judged against it; "
            f"fastest at batch {batch}: {fastest.name} ({fastest.runtime})"
        )
    if not scored:
        return None, (
            f"accuracy not measured (pass --data DIR --split S), so nothing qualifies; fastest "
            f"at batch {batch}: {fastest.name} ({fastest.runtime})"
            + (
                ""
                if fastest.agreement is None
                else f", mask agreement with FP32 {fastest.agreement:.4f}"
            )
        )
    if reference.miou is None:
        return (
            None,
            "the split has no masks, so no mIoU: nothing qualifies (pick a split with masks)",
        )
    qualified = [
        r for r in timed if r.miou is not None and reference.miou - r.miou <= MAX_MIOU_DROP_POINTS
    ]
    if not qualified:
        return None, f"no network is within {MAX_MIOU_DROP_POINTS} mIoU point of FP32"
    best = max(qualified, key=lambda r: r.at(batch).images_per_s)  # type: ignore[union-attr]
    ratio = best.at(batch).images_per_s / reference.at(batch).images_per_s  # type: ignore[union-attr]
    how = _how_to_run(best)
    return best.name, (
        f"{best.name} ({best.runtime}, {best.device}): {ratio:.2f}x the images/s of "
        f"{reference.name} at batch {batch}, mIoU {best.miou:.2f} against {reference.miou:.2f}"
        + (f"; {how}" if how else "")
    )


def _how_to_run(row: NetworkResult) -> str:
    if row.runtime == "onnxruntime" and row.chosen:
        return f"`cosa segment --model DIR --precision {row.precision}` runs it"
    if row.runtime == "onnxruntime":
        return "note: `cosa segment` picks another file for this precision here"
    if row.runtime == "tensorrt":
        return "`cosa segment --model DIR --backend tensorrt` runs it"
    if row.runtime == "torch":
        return "`cosa segment --model CHECKPOINT --backend torch` runs it"
    return ""


def _calibration_images(folder: Path, count: int = 8) -> np.ndarray | None:
    """Up to `count` images of the export's calibration set (float32 (N, 3, H, W), 0-255): real
    images for the mask agreement when no dataset is given; None without calib.npz."""
    path = folder / FILES[Role.CALIBRATION]
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["images"][:count]
    except (OSError, ValueError, KeyError):
        return None
    return images.astype(np.float32) if len(images) else None


def _ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (the `tensorrt` package from NVIDIA)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible (TensorRT engines run on a GPU)"
    return None


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _machine_line() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    load = f", load average {os.getloadavg()[0]:.1f} at start" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} CPUs{load}"
