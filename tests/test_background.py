"""`cosa.serving.background`: bounded background iteration and ordered parallel map.

No test sleeps to make threads overlap: overlaps are forced with barriers and conditions, and a
wait for another thread polls its condition under a generous deadline (a broken implementation
fails there instead of hanging)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from cosa.serving.background import ordered_calls, ordered_map, prefetch

DEADLINE_S = 60.0  # only reached when the code under test is broken


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds; fail after `DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.001)


def test_prefetch_is_bounded_ordered_and_reraises() -> None:
    produced: list[int] = []
    asked = 0  # next() calls started by the consumer: an upper bound of the items it has taken
    overruns: list[tuple[int, int]] = []

    def numbers() -> Iterator[int]:
        for i in range(10):
            # Item i can only be made once item i - 1 went into the queue: at most `depth`
            # items wait there, so the consumer must have taken at least i - depth.
            if i > asked + 2:
                overruns.append((i, asked))
            produced.append(i)
            yield i
        raise ValueError("source broke")

    stream = prefetch(numbers(), depth=2)
    asked += 1
    assert next(stream) == 0
    # The producer runs ahead until it blocks: 2 items queued and a fourth made, waiting to go in.
    wait_until(lambda: len(produced) >= 4, "the producer filled the queue")
    assert len(produced) == 4
    received = []
    with pytest.raises(ValueError, match="source broke"):
        while True:
            asked += 1
            received.append(next(stream))
    assert received == list(range(1, 10))  # every item before the error, in order
    assert overruns == []
    early = prefetch(numbers(), depth=1)
    assert next(early) == 0
    early.close()  # stops the background thread


def test_prefetch_close_stops_the_producer_for_good() -> None:
    pulled: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(1000):
            pulled.append(i)
            yield i

    stream = prefetch(numbers(), depth=2, name="test-prefetch")
    assert next(stream) == 0
    stream.close()
    # close() joins the producer: its thread is gone, so nothing can pull `numbers` any more.
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())
    assert len(pulled) <= 4  # 1 consumed + 2 queued + 1 blocked in put


class Tracker:
    """A function that records how many calls run at once.

    With `together=n`, calls meet in groups of n consecutive items (a barrier: the code under
    test must run n at once or the test fails at the deadline) and each group finishes in reverse
    order (each call waits until the later items of its group have finished), so results come
    back out of order.
    """

    def __init__(self, together: int = 1) -> None:
        self.together = together
        self.barrier = threading.Barrier(together, timeout=DEADLINE_S)
        self.changed = threading.Condition()
        self.running = 0
        self.peak = 0
        self.started: list[int] = []
        self.finished: list[int] = []

    def __call__(self, item: int) -> int:
        with self.changed:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(item)
        self.barrier.wait()
        group_end = (item // self.together + 1) * self.together
        later = set(range(item + 1, group_end))
        with self.changed:
            if not self.changed.wait_for(lambda: later <= set(self.finished), DEADLINE_S):
                raise TimeoutError(f"items {sorted(later)} never finished")
            self.running -= 1
            self.finished.append(item)
            self.changed.notify_all()
        if item == 13:
            raise ValueError("item 13 is bad")
        return item * item


def test_ordered_map_keeps_order_runs_in_parallel_and_is_bounded() -> None:
    track = Tracker(together=3)
    pulled: list[int] = []

    def items() -> Iterator[int]:
        for i in range(12):
            pulled.append(i)
            yield i

    results = ordered_map(track, items(), workers=3)
    assert next(results) == 0
    assert len(pulled) <= 4  # the default window: workers + 1
    assert [0] + list(results) == [i * i for i in range(12)]
    assert track.peak == 3
    assert track.finished[:3] == [2, 1, 0]  # finished out of order, yielded in order


def test_ordered_map_reraises_in_turn_and_close_cancels() -> None:
    track = Tracker()
    received = []
    with pytest.raises(ValueError, match="item 13 is bad"):
        for value in ordered_map(track, range(20), workers=2, window=2):
            received.append(value)
    assert received == [i * i for i in range(13)]  # everything before the failing item
    assert len(track.started) <= 15  # nothing far beyond the window was started

    track = Tracker()
    results = ordered_map(track, range(100), workers=2)
    assert next(results) == 0
    results.close()
    assert track.running == 0 and len(track.started) <= 4


@pytest.mark.parametrize(
    ("calls", "max_outstanding", "peak", "taken"),
    [(3, 8, 3, 4), (3, 2, 2, 2), (1, 8, 1, 1), (4, 1, 1, 1)],
)
def test_ordered_calls_runs_calls_at_once_with_one_item_more_within_the_bound(
    calls: int, max_outstanding: int, peak: int, taken: int
) -> None:
    track = Tracker(together=peak)
    pulled: list[int] = []
    threads: set[str] = set()

    def items() -> Iterator[int]:
        for i in range(12):
            pulled.append(i)
            yield i

    def call(item: int) -> int:
        threads.add(threading.current_thread().name)
        return track(item)

    results = ordered_calls(call, items(), calls, max_outstanding)
    assert next(results) == 0
    assert len(pulled) == taken  # calls + 1, capped by max_outstanding; 1 when serial
    assert [0] + list(results) == [i * i for i in range(12)]
    assert track.peak == peak
    # One call at a time runs in the consumer's thread, not a pool.
    assert (threads == {threading.current_thread().name}) == (peak == 1)
