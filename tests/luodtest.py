"""Helpers shared by the test suite: real luod processes on private sockets.

Importable from any test module as ``luodtest`` (``tests/`` is on pytest's
``pythonpath``). The fixtures built on it live in ``conftest.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import liveupdate

TEST_DEVICE_ENV = "LIVEUPDATE_TEST_DEVICE"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVEUPDATE_SHARED", REPO.parent / "shared"))


def kernel_device() -> str | None:
    """The real LUO device under test, when the suite runs against a kernel."""
    return os.environ.get(TEST_DEVICE_ENV) or None


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


#: luoctl as a real command, with this interpreter.
LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


def luoctl(
    socket: str, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``luoctl --socket SOCKET ARGS`` as a command, bounded by ``timeout``.

    ``COLUMNS`` is wide so that rich never wraps a one-line report.
    """
    return subprocess.run(
        [*LUOCTL, "--socket", socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(os.environ if env is None else env), "COLUMNS": "200"},
        check=False,
    )
