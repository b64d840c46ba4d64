"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may be downloaded: any outgoing socket connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def triton_installed() -> None:
    """The embedded Triton server of `cosa triton setup`: skipped where it is not set up, but a
    failure under CI (`CI` set), which always sets it up, so that a broken set-up cannot pass as
    skipped tests."""
    from cosa.errors import MissingDependencyError
    from cosa.serving.triton_server import find_triton

    try:
        find_triton()
    except MissingDependencyError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs `cosa triton setup` before the tests, yet: {exc}")
        pytest.skip(f"embedded Triton not set up ({exc})")
