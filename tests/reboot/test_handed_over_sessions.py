"""Handed-over sessions (LUOD_SESSION_UPDATE) waiting for their successor.

A session handed over in place waits, as an incoming session, until the
successor retrieves it; it must outlive its fd, further reboots, and a new
outgoing session of the same name. Each test runs against a real luod and a
real ``luoctl reboot``; each pins a behaviour that once broke.
"""

from __future__ import annotations

import ctypes

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import (
    Luod,
    assert_retrieves,
    luoctl,
    luoctl_reboot,
    preserved_session,
    raw_send,
    sessions,
    state,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.luod_only


def test_closing_the_fd_right_after_update_keeps_the_session_handed_over(luod: Luod) -> None:
    """UPDATE, then the session fd closed before the reply is read: still handed over.

    Broke once (review finding H2): closing the fd right after sending the
    UPDATE lost the session and its files.
    """
    session = preserved_session(luod, "closed-after-update", b"precious")
    update = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update))
    raw_send(session, uapi.LUOD_SESSION_UPDATE, bytes(update))
    session.close()  # at once: the reply is never read

    got: list[liveupdate.Session] = []

    def retrieved() -> bool:
        with luod.open() as dev:
            try:
                got.append(dev.retrieve_session("closed-after-update"))
            except liveupdate.NotFoundError:
                return False
        return True

    # The update may still be on its way; once handed over, it must stay so.
    assert wait_until(retrieved, timeout=5), (
        f"session lost by closing its fd after UPDATE:\n{luod.log_text()}"
    )
    with got[0] as handed_over:
        assert_retrieves(handed_over, 1, b"precious")
        handed_over.finish()


def test_reboot_refuses_a_name_both_waiting_and_outgoing(luod: Luod) -> None:
    """A reboot with a waiting handed-over session and an outgoing one of one name fails.

    Broke once (review finding H5): the reboot was not refused cleanly. It
    must fail with EEXIST naming the session, leave the state and generation
    as they were, and go on once the waiting session is taken.
    """
    waiting = preserved_session(luod, "twice", b"old-state")
    waiting.update()
    outgoing = preserved_session(luod, "twice", b"new-state")
    before = state(luod)

    for args in ((), ("--no-exec",)):
        result = luoctl(luod.socket, "reboot", "--wait", "10", *args)
        assert result.returncode != 0, (args, result.stdout, luod.log_text()[-3000:])
        # luoctl's one-line error: user interface, not a log.
        message = result.stdout + result.stderr
        assert "twice" in message, message
        assert "(EEXIST)" in message, message
        after = state(luod)
        assert after.state == before.state, after
        assert after.state != uapi.LuodState.FROZEN
        assert after.generation == before.generation
        assert "twice" in after.last_error, after.last_error
        assert not (luod.state_dir / "reboot-in-progress").exists()
        with luod.open() as dev:
            dev.create_session(f"other{len(args)}").close()

    # Once the waiting session is taken by its successor, the reboot goes on.
    with luod.open() as dev:
        successor = dev.retrieve_session("twice")
    assert_retrieves(successor, 1, b"old-state")
    successor.finish()
    successor.close()
    luoctl_reboot(luod)
    with luod.open() as dev:
        incoming = dev.retrieve_session("twice")
    with incoming:
        assert_retrieves(incoming, 1, b"new-state")
        incoming.finish()
    # Held open until now: the outgoing session had to cross the reboot.
    outgoing.close()
    waiting.close()


def test_a_handed_over_session_waits_across_two_reboots(luod: Luod) -> None:
    """A handed-over session not yet retrieved survives any number of reboots.

    Broke once (review finding M3): the session did not survive the second
    reboot.
    """
    session = preserved_session(luod, "waits", b"x")
    session.update()
    session.close()

    luoctl_reboot(luod)
    assert sessions(luod) == [("waits", "incoming")]
    luoctl_reboot(luod)
    assert sessions(luod) == [("waits", "incoming")]
    with luod.open() as dev:
        successor = dev.retrieve_session("waits")
    with successor:
        assert_retrieves(successor, 1, b"x")
        successor.finish()
    wait_for(lambda: sessions(luod) == [], "the session to be released")
