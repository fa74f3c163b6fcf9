"""Fixtures of the in-process core tests (see ``corelib``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from corelib import Rig

from liveupdate.core.policy import Limits


@pytest.fixture
def make_rig() -> Iterator[Callable[..., Rig]]:
    """Makes orchestrators; at the end, every fd they held must be closed."""
    before = set(os.listdir("/proc/self/fd"))
    rigs: list[Rig] = []

    def make(limits: Limits | None = None) -> Rig:
        rigs.append(Rig(limits=limits or Limits()))
        return rigs[-1]

    yield make
    for rig in rigs:
        rig.close()
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked, f"fds left open: {sorted(leaked)}"


@pytest.fixture
def rig(make_rig: Callable[..., Rig]) -> Rig:
    """A fresh orchestrator with the default limits."""
    return make_rig()
