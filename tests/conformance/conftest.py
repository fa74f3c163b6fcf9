"""Fixtures of the conformance tests: fd and session bookkeeping, a peer process.

The device comes from ``tests/conftest.py`` (``device_path``/``open_dev``): a
fresh luod per test, or the kernel's device named by
``LIVEUPDATE_TEST_DEVICE``. Everything a test opens is closed at teardown, so
the kernel (whose sessions live for the whole boot) starts every test clean
and the device is never left open for the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from _env import Fds, Peer, session_name


@pytest.fixture
def fds() -> Iterator[Fds]:
    """Open memfds/pipes through this; whatever is still open is closed at teardown."""
    tracker = Fds()
    try:
        yield tracker
    finally:
        tracker.close_all()


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Devices and sessions entered here are closed at teardown (last in, first out)."""
    with contextlib.ExitStack() as es:
        yield es


@pytest.fixture
def names(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``names("a")``: a session name unique to this test (and this run)."""
    base = request.node.name.removeprefix("test_")

    def make(suffix: str = "") -> str:
        return session_name(base, suffix)

    return make


@pytest.fixture
def peer(device_path: str) -> Iterator[Peer]:
    """Another process using the same device (spawned, so it shares no fd with us)."""
    p = Peer(device_path)
    try:
        yield p
    finally:
        p.stop()
