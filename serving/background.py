"""Bounded background work for the pipelines: results always come back in order.

- `prefetch` runs an iterator in a background thread, a bounded number of items ahead of its
  consumer: `cosa segment` builds the next batches (decode results, size grouping, float
  conversion) while the current one runs in the model, and `cosa stream` reads frames while
  earlier frames are inferred.
- `ordered_map` runs a function on a few threads at once, in order; `ordered_calls` is the
  policy the pipelines use on a local runner: `cosa segment` and `cosa stream` keep several model
  calls running when the runner serves concurrent calls better than one wide call (onnxruntime on
  CPU, `OnnxRuntimeRunner.parallel_calls`), else call it one batch at a time.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ordered_calls", "ordered_map", "prefetch"]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")


def prefetch(
    items: Iterable[T],
    depth: int,
    stop: threading.Event | None = None,
    name: str = "cosa-prefetch",
) -> Generator[T, None, None]:
    """Iterate `items` in a background thread, at most `depth` ahead of the consumer.

    An exception raised by `items` is re-raised in the consumer, in order. Setting `stop`, or
    closing the returned generator (also what garbage collection does), ends the background
    thread at its next item; closing waits for it, so after `close()` nothing runs `items` any more.

    Args:
        items: any iterable; its iterator runs in the background thread only.
        depth: queue bound (>= 1); the producer blocks when it is full (backpressure).
        stop: optional event to stop the producer early.
        name: the background thread's name (shown by debuggers and `py-spy`).
    """
    stop = stop or threading.Event()
    buffer: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put("error", exc)

    worker = threading.Thread(target=produce, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = buffer.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def ordered_map(
    function: Callable[[A], R], items: Iterable[A], workers: int, window: int | None = None
) -> Generator[R, None, None]:
    """`map(function, items)` on `workers` threads, results in input order, bounded.

    At most `window` items (default `workers + 1`, so that a worker never waits for the consumer
    to hand it the next item) are taken from `items` and not yet yielded; `items` is pulled in the
    consumer's thread. An exception raised by `function` is re-raised in the consumer when its
    item's turn comes. Closing the generator cancels what has not started and waits for what
    runs.

    Args:
        function: called once per item, from a worker thread (must be thread-safe).
        items: any iterable.
        workers: threads (>= 1); with 1, `function` runs on one thread, still overlapped with the
            consumer.
        window: most items outstanding (>= 1).
    """
    window = window or workers + 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="cosa-ordered")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_calls(
    function: Callable[[A], R], items: Iterable[A], calls: int, max_outstanding: int
) -> Generator[R, None, None]:
    """`map(function, items)` with up to `calls` calls running at once, results in input order.

    With `calls` (capped at `max_outstanding`) above 1, `ordered_map` on that many threads takes
    one item more than the calls (so that a call never waits for the next item; more would only
    queue), never more than `max_outstanding`; otherwise `function` runs one item at a time in
    the consumer's thread.

    Args:
        function: e.g. a runner's `infer` (thread-safe when `calls` > 1).
        items: any iterable.
        calls: concurrent calls wanted, e.g. a runner's `parallel_calls`.
        max_outstanding: most items taken and not yet yielded (>= 1).
    """
    calls = min(calls, max_outstanding)
    if calls > 1:
        yield from ordered_map(function, items, calls, window=min(calls + 1, max_outstanding))
    else:
        yield from map(function, items)
