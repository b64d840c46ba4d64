"""`cosa segment --engine ray`: the segment pipeline spread over Ray Data workers.

The driver (this process) does what the local engine does before inference: discovery, the bad-input
report, `--skip-existing` (`plan_inputs`). The images to segment become a Ray Dataset of (path,
stem, index) rows; `map_batches` hands chunks of `chunk` rows to a pool of `workers` actors, each of
which holds one runner (`open_runner`: onnxruntime on the worker, or a Triton client) and runs the
local pipeline on its chunk (`segment_items`: decoding, size groups, batches, atomic mask writes).
Rows come back with an error string ("" = written), so the summary (and `--json`) is the local
engine's.

Failure model: a bad image is a row with its reason, as locally. A worker process that dies is
restarted by Ray and its chunk runs again: masks are written atomically under names fixed by the
input, so a rerun overwrites a file with the same bytes, and only the chunk attempt that finished
reports rows. A worker that dies more than `WORKER_RESTARTS` times stops the run with a ServingError
(masks written so far are complete; `--skip-existing` resumes).

On a cluster, every worker must read the inputs and the model and write `--out` under the same paths
as the driver (a shared file system), or use `--backend triton --url` for the model.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from cosa.choices import MaskFormat
from cosa.errors import ConfigError, CosaError, MissingDependencyError, ServingError
from cosa.serving.discovery import InputItem
from cosa.serving.masks import palette_lut
from cosa.serving.runners import Runner, open_runner
from cosa.serving.segment import (
    Failure,
    SegmentSummary,
    check_segment_options,
    plan_inputs,
    segment_items,
)

__all__ = [
    "INSTALL_HINT",
    "WORKER_RESTARTS",
    "RayOptions",
    "runner_factory",
    "segment_with_ray",
]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cosa-toolkit[ray]'"
WORKER_RESTARTS = 3  # per worker; a deterministic crash must not loop for ever
_CONNECT_TIMEOUT_S = 3.0
_DEFAULT_RAY_CLIENT_PORT = 10001
_DEFAULT_GCS_PORT = 6379

RunnerFactory = Callable[[], Runner]


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the work runs.

    Attributes:
        address: a running cluster ("HOST:PORT" of its head, "ray://HOST:PORT" for Ray Client,
            or "auto"); None starts a local Ray for this run.
        workers: actors, each holding one runner; default: one per CPU Ray offers.
        cpus_per_worker: CPUs Ray reserves per actor; also the runner's onnxruntime threads.
        chunk: images per task (the unit a restarted worker redoes), >= 1.
    """

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: int = 1
    chunk: int = 16


def runner_factory(
    model: Path | None,
    backend: str = "auto",
    url: str | None = None,
    protocol: str = "grpc",
    precision: str | None = None,
    threads: int = 1,
) -> RunnerFactory:
    """What each worker calls to open its runner: `open_runner` with these arguments, one call at
    a time per runner (Ray's actors are the parallelism)."""
    return partial(
        open_runner,
        model,
        backend=backend,
        url=url,
        protocol=protocol,
        precision=precision,
        threads=threads,
        parallel_calls=1,
    )


def segment_with_ray(
    inputs: Sequence[str],
    out: Path,
    open_worker_runner: RunnerFactory,
    batch_size: int = 4,
    fmt: MaskFormat = "png",
    overlay: bool = False,
    skip_existing: bool = False,
    progress: bool = False,
    options: RayOptions = RayOptions(),
) -> SegmentSummary:
    """`segment_inputs` with the inference spread over Ray workers (see the module docstring).

    Args:
        inputs, out, batch_size, fmt, overlay, skip_existing, progress: as `segment_inputs`.
        open_worker_runner: opens one runner; called once in each worker (it is pickled to them:
            `runner_factory` builds one from the CLI's options). The driver also opens one first,
            to fail fast on a bad model and to read the palette.
        options: cluster address and pool size.

    Returns:
        The same summary as the local engine; `failed` lists bad inputs in input order.

    Raises:
        MissingDependencyError: Ray is not installed (the message names `INSTALL_HINT`).
        ConfigError: bad options; a Ray address that does not answer.
        InputError: the inputs name no image.
        ServingError: Ray failed to run the job (e.g. a worker died too often).
        Whatever `open_worker_runner` raises (bad model, unreachable Triton server).
    """
    start = time.perf_counter()
    check_segment_options(batch_size, fmt)
    if options.chunk < 1 or options.cpus_per_worker < 1:
        raise ConfigError(
            f"chunk ({options.chunk}) and CPUs per worker ({options.cpus_per_worker}) must be >= 1"
        )
    if options.workers is not None and options.workers < 1:
        raise ConfigError(f"--ray-workers {options.workers} must be >= 1")
    ray = _import_ray()
    if options.address not in (None, "auto"):
        _check_reachable(options.address)
    # Opened here first: a bad model or server fails before Ray starts, with its own message.
    with _opened(open_worker_runner) as runner:
        palette_lut(runner.spec.palette if fmt == "png" or overlay else ())
    plan = plan_inputs(inputs, out, fmt, overlay, skip_existing)
    processed = 0
    failed: list[Failure] = []
    if plan.todo:
        processed, failed = _run(
            ray, plan.todo, out, open_worker_runner, batch_size, fmt, overlay, progress, options
        )
    return SegmentSummary(
        processed=processed,
        failed=plan.failed + sorted(failed, key=plan.order),
        warnings=plan.warnings,
        out=out,
        seconds=time.perf_counter() - start,
        skipped=plan.skipped,
    )


@contextmanager
def _opened(factory: RunnerFactory) -> Iterator[Runner]:
    """A runner from `factory`, closed on exit."""
    runner = factory()
    try:
        yield runner
    finally:
        runner.close()


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs ray[data]
    except ImportError as exc:
        raise MissingDependencyError(
            f"--engine ray needs Ray Data, which is not installed ({exc}); {INSTALL_HINT}"
        ) from exc
    return ray


def _check_reachable(address: str) -> None:
    """A head that does not answer makes `ray.init` retry for minutes; fail in seconds instead."""
    client = address.startswith("ray://")
    hostport = address.removeprefix("ray://")
    host, sep, port_text = hostport.rpartition(":")
    if not sep:
        host, port_text = hostport, str(_DEFAULT_RAY_CLIENT_PORT if client else _DEFAULT_GCS_PORT)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"--ray-address {address!r} is not HOST:PORT, ray://HOST:PORT or auto"
        ) from None
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConfigError(
            f"Ray cluster at {address} is not reachable ({exc.strerror or exc}); start it with "
            "`ray start --head` or fix --ray-address"
        ) from None


def _run(
    ray: Any,
    items: list[InputItem],
    out: Path,
    factory: RunnerFactory,
    batch_size: int,
    fmt: MaskFormat,
    overlay: bool,
    progress: bool,
    options: RayOptions,
) -> tuple[int, list[Failure]]:
    started_here = not ray.is_initialized()
    if started_here:
        # Ray's C++ core logs at INFO/ERROR level to stderr; its warnings about restartable
        # actors with arguments in the object store do not concern a run this short.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        try:
            ray.init(
                address=options.address,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
        except Exception as exc:  # ConnectionError, RuntimeError, ... depending on the failure
            where = f"the Ray cluster at {options.address}" if options.address else "a local Ray"
            raise ConfigError(
                f"cannot start or join {where}: {_first_line(exc)}; check --ray-address "
                "(`ray status` on the head node)"
            ) from exc
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        workers = options.workers or max(
            1, int(ray.cluster_resources().get("CPU", 1)) // options.cpus_per_worker
        )
        # At least two chunks per worker, so that a fast worker takes over a slow one's work.
        chunk = max(1, min(options.chunk, len(items) // (2 * workers)))
        rows = ray.data.from_items(
            [{"path": str(i.path), "stem": str(i.stem), "index": i.index} for i in items],
            override_num_blocks=-(-len(items) // chunk),
        )
        with warnings.catch_warnings():
            # Ray 2.60 deprecates remote args here with no named replacement for restarts yet
            # (the extra pins ray < 2.64, where they are removed).
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            results = rows.map_batches(
                _Worker,
                batch_size=chunk,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=workers),
                fn_constructor_args=(factory, str(out), batch_size, fmt, overlay),
                num_cpus=options.cpus_per_worker,
                # Ray Data restarts dead actors and retries their tasks for ever by default.
                max_restarts=WORKER_RESTARTS,
                max_task_retries=WORKER_RESTARTS,
            )
        by_index = {i.index: i for i in items}
        processed = 0
        failed: list[Failure] = []
        seen: set[int] = set()
        with tqdm(
            total=len(items), unit="img", desc="segment", file=sys.stderr, disable=not progress
        ) as bar:
            for batch in results.iter_batches(batch_format="numpy", batch_size=None):
                for index, error in zip(batch["index"], batch["error"], strict=True):
                    index = int(index)
                    if index in seen:  # never expected: Ray reports a finished chunk once
                        raise ServingError(f"Ray reported {by_index[index].path} twice")
                    seen.add(index)
                    if error:
                        failed.append(Failure(str(by_index[index].path), str(error)))
                    else:
                        processed += 1
                    bar.update(1)
        missing = len(items) - len(seen)
        if missing:
            raise ServingError(
                f"Ray returned no result for {missing} image(s); rerun with --skip-existing"
            )
        return processed, failed
    except CosaError:
        raise
    except Exception as exc:  # Ray wraps worker errors in its own types
        inner = _cosa_error(exc)
        if inner is not None:
            raise inner from None
        raise ServingError(f"the Ray job failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        if started_here:
            ray.shutdown()


class _Worker:
    """One Ray actor: one runner, the local pipeline over each chunk it is given."""

    def __init__(
        self, factory: RunnerFactory, out: str, batch_size: int, fmt: MaskFormat, overlay: bool
    ) -> None:
        self._runner = factory()
        self._out = Path(out)
        self._batch_size = batch_size
        self._fmt = fmt
        self._overlay = overlay

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows (path, stem, index) in, rows (index, error) out; error "" = outputs written."""
        items = [
            InputItem(Path(str(path)), PurePosixPath(str(stem)), int(index))
            for path, stem, index in zip(batch["path"], batch["stem"], batch["index"], strict=True)
        ]
        # One decode and one encode thread: the actor has one CPU, and Ray runs one per core.
        _, failures = segment_items(
            items,
            self._out,
            self._runner,
            self._batch_size,
            self._fmt,
            self._overlay,
            decode_workers=1,
            encode_workers=1,
            max_in_flight=1,
        )
        errors = {f.path: f.error for f in failures}
        return {
            "index": np.asarray([i.index for i in items], dtype=np.int64),
            "error": np.asarray([errors.get(str(i.path), "") for i in items], dtype=object),
        }


def _cosa_error(exc: BaseException) -> CosaError | None:
    """The library error inside Ray's wrappers (RayTaskError.cause, Ray Data's __cause__)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, CosaError):
        cause = getattr(cause, "cause", None) or cause.__cause__
    return cause


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
