"""The one way the benchmarks start a luod of their own."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path


def start_luod(state: Path, *options: str) -> subprocess.Popen[bytes]:
    """luod on ``state/device``, logging to ``state/luod.log``, once it serves.

    ``options`` go to luod after ``--socket``. ``RuntimeError`` with the log
    when it exits or does not serve within 30 seconds.
    """
    log = open(state / "luod.log", "wb")  # noqa: SIM115 - owned by the child
    argv = [sys.executable, "-m", "liveupdate.server.luod", "--socket", str(state / "device")]
    proc = subprocess.Popen([*argv, *options], stdout=log, stderr=log)
    log.close()  # the child has its copy
    deadline = time.monotonic() + 30
    while b"serving" not in (state / "luod.log").read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((state / "luod.log").read_text())
        time.sleep(0.01)
    return proc
