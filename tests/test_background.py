"""`cosa.serving.background`: bounded background iteration and ordered parallel map."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from cosa.serving.background import ordered_calls, ordered_map, prefetch


def test_prefetch_is_bounded_ordered_and_reraises() -> None:
    produced: list[int] = []

    def numbers() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i
        raise ValueError("source broke")

    stream = prefetch(numbers(), depth=2)
    assert next(stream) == 0
    time.sleep(0.05)
    assert len(produced) <= 4  # 1 consumed + 2 queued + 1 blocked in put
    received = []
    with pytest.raises(ValueError, match="source broke"):
        for value in stream:
            received.append(value)
    assert received == list(range(1, 10))  # every item before the error, in order
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
    count = len(pulled)
    time.sleep(0.05)
    assert len(pulled) == count <= 4
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())


class Tracker:
    """A function that sleeps longer for smaller items (so that later calls finish first) and
    records how many calls run at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.started: list[int] = []

    def __call__(self, item: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.append(item)
        time.sleep(0.002 * (5 - item % 5))
        with self.lock:
            self.running -= 1
        if item == 13:
            raise ValueError("item 13 is bad")
        return item * item


def test_ordered_map_keeps_order_runs_in_parallel_and_is_bounded() -> None:
    track = Tracker()
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
    track = Tracker()
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
