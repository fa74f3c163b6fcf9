"""Shared fixtures: real luod processes on private sockets.

Every test that needs the orchestrator talks to a real ``luod`` started as a
child process (``python -m liveupdate.server.luod``) on a socket in its own
temporary directory, with real fds. Set ``LIVEUPDATE_TEST_DEVICE`` to a real
``/dev/liveupdate`` to run the library-level conformance tests against a
kernel instead (that is what the kernel-VM driver does); tests that only make
sense for luod are marked ``luod_only`` and skipped there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from luodtest import REPO, SHARED, TEST_DEVICE_ENV, Luod, kernel_device, linux_exact_luod

__all__ = ["REPO", "SHARED", "TEST_DEVICE_ENV", "Luod", "kernel_device"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "luod_only: meaningful only against luod, not a kernel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if kernel_device() is None and not linux_exact_luod():
        return
    where = "a kernel" if kernel_device() is not None else "luod --compat=linux"
    skip = pytest.mark.skip(reason=f"luod-only scenario; running against {where}")
    for item in items:
        if "luod_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def luod_factory(tmp_path: Path) -> Iterator[Callable[..., Luod]]:
    """Start luod processes with extra options; all are stopped at teardown."""
    started: list[Luod] = []
    counter = 0

    def make(*args: str, start: bool = True, env: dict[str, str] | None = None) -> Luod:
        nonlocal counter
        counter += 1
        state = tmp_path / f"luod{counter}"
        state.mkdir()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("NOTIFY_SOCKET", None)
        daemon = Luod(str(state / "device"), state, state / "luod.log", list(args), full_env)
        started.append(daemon)
        if start:
            daemon.start()
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None:
            daemon.stop()


@pytest.fixture
def luod(luod_factory: Callable[..., Luod]) -> Luod:
    """One running luod with default options."""
    return luod_factory()


@pytest.fixture
def device_path(request: pytest.FixtureRequest) -> str:
    """The device the library-level conformance tests use.

    A real kernel's device when ``LIVEUPDATE_TEST_DEVICE`` is set, else the
    socket of a fresh luod started for the test (``luod --compat=linux`` when
    ``LIVEUPDATE_TEST_COMPAT=linux``).
    """
    path = kernel_device()
    if path is not None:
        return path
    if linux_exact_luod():
        return str(request.getfixturevalue("luod_factory")("--compat", "linux").socket)
    daemon: Luod = request.getfixturevalue("luod")
    return daemon.socket


@pytest.fixture
def open_dev(device_path: str) -> Callable[..., liveupdate.Device]:
    """Open the device under test (retrying EBUSY briefly)."""

    def opener(timeout: float = 5.0) -> liveupdate.Device:
        return liveupdate.open_device(device_path, timeout=timeout)

    return opener
