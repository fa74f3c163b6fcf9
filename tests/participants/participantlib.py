"""The participant processes of the participant tests, and what they said."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from luodtest import Luod

AGENT = Path(__file__).with_name("participant_agent.py")


class Agent:
    """A participant process and the lines it printed."""

    def __init__(self, daemon: Luod, name: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT), daemon.socket, name, *args],
            stdout=subprocess.PIPE,
            env=daemon.env,
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self._buffer = b""
        self.lines: list[dict[str, object]] = []

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                return
        chunk = self.proc.stdout.read() or b""
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n")
        self.lines += [json.loads(line) for line in complete if line]
        if not chunk:
            time.sleep(min(timeout, 0.05))  # EOF: the process ended

    def expect(self, what: str, timeout: float = 20.0, **fields: object) -> dict[str, object]:
        """The first line (not seen before) saying ``what`` with ``fields``."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if line["what"] == what and all(line.get(k) == v for k, v in fields.items()):
                    self.lines.remove(line)
                    return line
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} {fields} from the agent; it said {self.lines}")
            self._read(min(left, 0.5))

    def said(self, what: str, **fields: object) -> bool:
        """Whether a line saying ``what`` came (reads what is there now)."""
        self._read(0.2)
        return any(
            line["what"] == what and all(line.get(k) == v for k, v in fields.items())
            for line in self.lines
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
