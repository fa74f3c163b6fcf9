"""kvcache as a real process, standalone or under ``luoctl run``, for the kvcache tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from luodtest import Luod, wait_for

KVCACHE = [sys.executable, "-m", "liveupdate.kvcache"]


class KvProcess:
    """``kvcache serve`` (standalone, or under ``luoctl run --keep-on-close`` with ``daemon``).

    Every one started is stopped after its test, failed or not
    (``tests/kvcache/conftest.py``): a test never leaves a server behind.
    """

    #: Started by the running test and not stopped yet.
    running: list[KvProcess] = []

    def __init__(
        self,
        tmp: Path,
        *serve_args: str,
        daemon: Luod | None = None,
        session: str = "kv",
        env: dict[str, str] | None = None,
    ) -> None:
        self.daemon = daemon
        self.session = session
        self.ready_file = tmp / f"{session}.port"
        self.log = tmp / f"{session}.log"
        self.serve_args = ["--listen", "127.0.0.1:0", "--memory", "8", *serve_args]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> KvProcess:
        if self not in KvProcess.running:
            KvProcess.running.append(self)
        self.ready_file.unlink(missing_ok=True)
        argv = [*KVCACHE, "serve", *self.serve_args, "--ready-file", str(self.ready_file)]
        if self.daemon is not None:
            argv = [
                sys.executable, "-m", "liveupdate.cli.luoctl", "--socket", self.daemon.socket,
                "run", "--session", self.session, "--keep-on-close", "--stop-timeout", "10",
                "--", *argv,
            ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, env=self.env, start_new_session=True
            )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        wait_for(self.ready_file.exists, f"kvcache did not start:\n{self.log_text()}", timeout=30)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    @property
    def port(self) -> int:
        return int(self.ready_file.read_text())

    def server_pid(self) -> int:
        """The kvcache process: the supervisor's child (waits for one), or the process itself."""
        assert self.proc is not None
        if self.daemon is None:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 30
        while not (pids := children.read_text().split()):
            assert time.monotonic() < deadline, f"the supervisor has no service:\n{self.log_text()}"
            time.sleep(0.01)
        return int(pids[0])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def luoctl_run_lines(log: str, word: str) -> int:
    """How many of the supervisor's lines mention ``word``."""
    return sum(word in line for line in log.splitlines())
