"""The journal: what a cold start after SIGKILL reports as lost.

luod journals its outgoing and its incoming sessions to two files; a cold
start reports every session of both as lost. Runs against a real luod, a real
``luoctl reboot`` and a real SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from liveupdate.handover_abi import HandoverError
from liveupdate.handover_codec import decode_image
from luodtest import Luod, events, luoctl_reboot, memfd, preserved_session, state, wait_for

pytestmark = pytest.mark.luod_only


def restart_cold(daemon: Luod) -> None:
    """SIGKILL ``daemon`` and start it again on the same state directory."""
    daemon.stop(signal.SIGKILL)
    daemon.log.rename(daemon.log.with_name("luod-killed.log"))
    daemon.start()


def test_journal_keeps_an_outgoing_and_an_incoming_session_of_one_name_apart(
    luod_factory: Callable[..., Luod],
) -> None:
    """An outgoing and an incoming session named alike are both journalled, both reported.

    Broke once (review finding M1): the journal could not hold an outgoing
    and an incoming session of one name.
    """
    daemon = luod_factory("--journal-interval", "0.05")
    first = preserved_session(daemon, "a", b"x")
    luoctl_reboot(daemon)
    first.close()
    with daemon.open() as dev:
        incoming = dev.retrieve_session("a")
        outgoing = dev.create_session("a")
    fd = memfd(b"y")
    outgoing.preserve(fd, 5)
    os.close(fd)

    out_path = daemon.state_dir / "journal.dtb"
    in_path = daemon.state_dir / "journal-incoming.dtb"

    def described(path: Path) -> list[tuple[bytes, list[int]]] | None:
        try:
            image = decode_image(path.read_bytes())
        except (OSError, HandoverError):
            return None
        return [(s.name, [f.token for f in s.files]) for s in image.sessions]

    def journalled() -> bool:
        return described(out_path) == [(b"a", [5])] and described(in_path) == [(b"a", [1])]

    wait_for(journalled, "both journals to describe session 'a'", timeout=5)
    time.sleep(0.3)  # a few more journal ticks
    assert not events(daemon, "journal-failed")

    restart_cold(daemon)
    lost = events(daemon, "session-lost", session="a", files=1)
    assert sorted(e["tokens"] for e in lost) == ["0x1", "0x5"], daemon.log_text()
    assert state(daemon).lost_sessions == 2
    incoming.close()
    outgoing.close()


@pytest.fixture
def luod_factory(luod_factory: Callable[..., Luod]) -> Callable[..., Luod]:
    """These tests pin what a luod without copies reports (``--keeper off``);
    tests/crash/test_luod_crash_survival.py pins the recovery with them."""

    def make(*args: str, **kwargs: object) -> Luod:
        return luod_factory("--keeper", "off", *args, **kwargs)

    return make
