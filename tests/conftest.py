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
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import liveupdate

TEST_DEVICE_ENV = "LIVEUPDATE_TEST_DEVICE"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVEUPDATE_SHARED", REPO.parent / "shared"))


def kernel_device() -> str | None:
    """The real LUO device under test, when the suite runs against a kernel."""
    return os.environ.get(TEST_DEVICE_ENV) or None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "luod_only: meaningful only against luod, not a kernel")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if kernel_device() is None:
        return
    skip = pytest.mark.skip(reason="luod-only scenario; running against a kernel")
    for item in items:
        if "luod_only" in item.keywords:
            item.add_marker(skip)


@dataclass
class Luod:
    """A running luod child process."""

    socket: str
    state_dir: Path
    log: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True) -> Luod:
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "liveupdate.server.luod", "--socket", self.socket, *self.args],
            stdout=logf,
            stderr=logf,
            env=self.env,
            close_fds=True,
        )
        logf.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Wait for the ``serving`` line, proof that the socket listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving" in self.log.read_text(errors="replace"):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"luod exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.01)
        raise TimeoutError(f"luod did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fd_count(self) -> int:
        """How many fds the daemon holds now (``/proc/PID/fd``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open(self, timeout: float = 5.0) -> liveupdate.Device:
        return liveupdate.open_device(self.socket, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
    socket of a fresh luod started for the test.
    """
    path = kernel_device()
    if path is not None:
        return path
    daemon: Luod = request.getfixturevalue("luod")
    return daemon.socket


@pytest.fixture
def open_dev(device_path: str) -> Callable[..., liveupdate.Device]:
    """Open the device under test (retrying EBUSY briefly)."""

    def opener(timeout: float = 5.0) -> liveupdate.Device:
        return liveupdate.open_device(device_path, timeout=timeout)

    return opener
