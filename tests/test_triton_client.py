"""Triton client parts that need no server: fail-fast connection errors, size bucketing, retries.

The client against a real server is tested in test_triton_server.py.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from cosa.errors import InputError, ServingError
from cosa.serving.triton_client import (
    TritonSegmentationClient,
    bucket_by_size,
    is_transient,
    with_retries,
)
from cosa.serving.triton_server import free_ports


def count_liveness_checks(protocol: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Count the client's reachability checks (the keyword arguments of each) on `protocol`."""
    module = importlib.import_module(f"tritonclient.{protocol}")
    real = module.InferenceServerClient.is_server_live
    calls: list[dict] = []

    def counted(self: object, *args: object, **kwargs: object) -> bool:
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(module.InferenceServerClient, "is_server_live", counted)
    return calls


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_fails_fast_with_one_actionable_line(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (port,) = free_ports(1)  # nothing listens there
    checks = count_liveness_checks(protocol, monkeypatch)
    with pytest.raises(ServingError) as info:
        TritonSegmentationClient(f"127.0.0.1:{port}", protocol, retries=3, connect_timeout_s=4)
    # Fast: one reachability check, bounded by the connect timeout; `retries` is for requests
    # to a server that answered, not for reaching one.
    assert len(checks) == 1
    if protocol == "grpc":
        assert checks[0] == {"client_timeout": 4}
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach Triton at 127.0.0.1:{port} ({protocol}")
    assert "start it with `cosa triton serve REPO`" in message


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ServingError, match="unknown protocol 'websocket'; choose grpc or http"):
        TritonSegmentationClient("127.0.0.1:1", "websocket")  # type: ignore[arg-type]


def image(h: int, w: int, value: float) -> np.ndarray:
    return np.full((3, h, w), value, dtype=np.float32)


def test_bucket_by_size_groups_equal_sizes_into_full_batches() -> None:
    items = [(0, image(8, 8, 0)), (1, image(8, 16, 1)), (2, image(8, 8, 2)), (3, image(8, 8, 3))]
    items += [(4, image(8, 16, 4)), (5, image(4, 4, 5))]
    batches = list(bucket_by_size(items, batch_size=3))
    # The (8, 8) bucket fills first; the rest flush at the end, oldest bucket first.
    assert [keys for keys, _ in batches] == [[0, 2, 3], [1, 4], [5]]
    for keys, stacked in batches:
        assert stacked.dtype == np.float32 and stacked.shape[0] == len(keys)
        np.testing.assert_array_equal(stacked[:, 0, 0, 0], np.array(keys, dtype=np.float32))


def test_bucket_by_size_bounds_what_it_holds_back() -> None:
    # Every image has its own size, so no bucket ever fills: the pending limit must flush them.
    held = []
    pulled = 0

    def source():
        nonlocal pulled
        for i in range(20):
            pulled += 1
            yield i, image(4, 4 + i, i)

    out = []
    for keys, _ in bucket_by_size(source(), batch_size=4, max_pending=5):
        held.append(pulled - sum(len(k) for k in out) - len(keys))
        out.append(keys)
    assert sorted(k for keys in out for k in keys) == list(range(20))
    assert max(held) <= 5


def test_bucket_by_size_rejects_bad_shapes() -> None:
    with pytest.raises(InputError, match=r"image 'a.png' has shape \(8, 8\); expected \(3, H, W\)"):
        list(bucket_by_size([("a.png", np.zeros((8, 8), np.float32))], batch_size=2))
    with pytest.raises(InputError, match="batch size 0 must be >= 1"):
        list(bucket_by_size([], batch_size=0))


def grpc_error(code: str) -> InferenceServerException:
    return InferenceServerException(msg=f"failed with {code}", status=f"StatusCode.{code}")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (grpc_error("UNAVAILABLE"), True),
        (grpc_error("RESOURCE_EXHAUSTED"), True),
        (grpc_error("INVALID_ARGUMENT"), False),
        (grpc_error("NOT_FOUND"), False),
        (grpc_error("INTERNAL"), False),
        (InferenceServerException(msg="busy", status="503"), True),
        (InferenceServerException(msg="bad input", status="400"), False),
        (ConnectionResetError("reset by peer"), True),
        (ValueError("not a network error"), False),
    ],
)
def test_transient_errors_are_told_apart(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_with_retries_backs_off_on_transient_errors_then_succeeds() -> None:
    failures = [grpc_error("UNAVAILABLE"), grpc_error("UNAVAILABLE")]
    delays: list[float] = []

    def attempt() -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    assert with_retries(attempt, retries=3, backoff_s=0.1, sleep=delays.append) == "ok"
    assert delays == pytest.approx([0.1, 0.2])


def test_with_retries_gives_up_after_the_budget_and_never_retries_invalid_requests() -> None:
    calls = []
    delays: list[float] = []

    def unavailable() -> None:
        calls.append(1)
        raise grpc_error("UNAVAILABLE")

    with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
        with_retries(unavailable, retries=2, backoff_s=0.05, sleep=delays.append)
    assert len(calls) == 3 and delays == pytest.approx([0.05, 0.1])

    calls.clear()

    def invalid() -> None:
        calls.append(1)
        raise grpc_error("INVALID_ARGUMENT")

    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        with_retries(invalid, retries=5, backoff_s=0.05, sleep=delays.append)
    assert len(calls) == 1


def test_with_retries_counts_an_asynchronous_failure_as_the_first_try() -> None:
    delays: list[float] = []
    result = with_retries(
        lambda: 42,
        retries=1,
        backoff_s=0.3,
        first_error=grpc_error("UNAVAILABLE"),
        sleep=delays.append,
    )
    assert result == 42 and delays == pytest.approx([0.3])
