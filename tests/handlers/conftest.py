"""Fixtures of the handler tests (the daemon itself comes from ``tests/conftest.py``)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from handlerlib import LiveSession, install_example_plugin


@pytest.fixture
def live_factory() -> Iterator[Callable[..., LiveSession]]:
    """``live_factory(daemon, name=...)``: a :class:`LiveSession`, closed at teardown."""
    made: list[LiveSession] = []

    def make(daemon: Any, name: str = "handler-test") -> LiveSession:
        session = LiveSession(daemon, name)
        made.append(session)
        return session

    yield make
    for session in reversed(made):
        session.close()


@pytest.fixture
def live(luod: Any, live_factory: Callable[..., LiveSession]) -> LiveSession:
    """One outgoing session on a fresh luod, ready to be carried across a reboot."""
    return live_factory(luod)


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes a test starts; killed and reaped at teardown."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            try:
                proc.wait(5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass


@pytest.fixture
def plugin_site(tmp_path: Path) -> Path:
    """A directory holding the example plugin as an installed distribution (for PYTHONPATH)."""
    return install_example_plugin(tmp_path / "site")
