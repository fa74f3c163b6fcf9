"""The core's events reach luod's JSON log with their names and fields."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from luodtest import Luod, events, memfd, wait_for

pytestmark = pytest.mark.luod_only


def test_a_session_kept_on_close_is_logged_with_the_state_change(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--log-format", "json")
    with daemon.open() as dev:
        session = dev.create_session("svc")
        fd = memfd(name="held")
        session.preserve(fd, 1)
        os.close(fd)
        session.keep_on_close()
        session.close()  # no hand-over: luod keeps it for the successor
        wait_for(lambda: bool(events(daemon, "session-kept-on-close")), "the session to be kept")
        assert dev.get_state().incoming_sessions == 1
    (kept,) = events(daemon, "session-kept-on-close")
    assert kept["session"] == "svc" and kept["level"] == "warning"
    changes = [(e["old"], e["new"]) for e in events(daemon, "state-changed")]
    assert changes == [("normal", "updated")]
