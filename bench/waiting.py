"""The one poll loop the benchmarks wait for their processes with."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    check: Callable[[], object], what: str, timeout: float = 30.0, step: float = 0.01
) -> None:
    """Poll ``check`` every ``step`` seconds until it is true; ``RuntimeError``
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        time.sleep(step)
