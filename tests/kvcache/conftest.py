"""Every kvcache server a test started is stopped after it, even when it failed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvservice import KvProcess


@pytest.fixture(autouse=True)
def _stop_kvcache_servers() -> Iterator[None]:
    yield
    while KvProcess.running:
        KvProcess.running.pop().stop()
