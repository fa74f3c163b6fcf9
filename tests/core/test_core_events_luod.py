"""The core's events reach luod's JSON log with their names and fields."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import pytest

from luodtest import Luod

pytestmark = pytest.mark.luod_only


def _events(daemon: Luod, name: str) -> list[dict[str, object]]:
    lines = daemon.log_text().splitlines()
    objs = [json.loads(line) for line in lines if line.startswith("{")]
    return [obj for obj in objs if obj["event"] == name]


def test_a_session_kept_on_close_is_logged_with_the_state_change(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--log-format", "json")
    with daemon.open() as dev:
        session = dev.create_session("svc")
        fd = os.memfd_create("held", os.MFD_CLOEXEC)
        session.preserve(fd, 1)
        os.close(fd)
        session.keep_on_close()
        session.close()  # no hand-over: luod keeps it for the successor
        deadline = time.monotonic() + 10
        while not _events(daemon, "session-kept-on-close") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.get_state().incoming_sessions == 1
    (kept,) = _events(daemon, "session-kept-on-close")
    assert kept["session"] == "svc" and kept["level"] == "warning"
    changes = [(e["old"], e["new"]) for e in _events(daemon, "state-changed")]
    assert changes == [("normal", "updated")]
