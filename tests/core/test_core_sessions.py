"""Sessions in-process: create, retrieve, release, hand over, names, owners, state."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from corelib import ALICE, BOB, ROOT, Rig, named, struct

from liveupdate import uapi
from liveupdate.core import reboot
from liveupdate.core.luo import LuoState

OUT = uapi.SessionDirection.OUTGOING
IN = uapi.SessionDirection.INCOMING


def _fields(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [r.__dict__["fields"] for r in caplog.records if r.getMessage() == name]


def test_a_created_session_is_outgoing_and_counts_as_a_change(rig: Rig) -> None:
    before = rig.luo.sessions.mutations
    session = rig.create(b"db", ALICE)
    assert session.direction == OUT and session.owner == ALICE
    assert rig.luo.sessions.outgoing == {b"db": session}
    assert rig.luo.sessions.mutations > before


def test_a_second_outgoing_session_of_the_same_name_is_eexist(rig: Rig) -> None:
    rig.create(b"db")
    reply = rig.device(uapi.CREATE_SESSION, named(uapi.CREATE_SESSION, b"db"))
    assert reply.ret == -errno.EEXIST


def test_a_name_whose_session_was_closed_meanwhile_is_free(rig: Rig) -> None:
    old = rig.create(b"db")
    rig.closed.add(id(old))  # the client closed its fd; the close is in flight
    new = rig.create(b"db")
    assert new is not old and rig.luo.sessions.outgoing[b"db"] is new


@pytest.mark.parametrize("raw", [b"", b"\0name", b"x" * 64])
def test_a_name_that_is_empty_or_not_terminated_is_einval(rig: Rig, raw: bytes) -> None:
    reply = rig.device(uapi.CREATE_SESSION, named(uapi.CREATE_SESSION, raw))
    assert reply.ret == -errno.EINVAL
    assert not rig.luo.sessions.outgoing


def test_the_longest_name_is_63_bytes_and_bytes_after_the_nul_are_ignored(rig: Rig) -> None:
    reply = rig.device(uapi.CREATE_SESSION, named(uapi.CREATE_SESSION, b"n" * 63))
    assert reply.ret == 0 and reply.fd is not None
    reply2 = rig.device(uapi.CREATE_SESSION, named(uapi.CREATE_SESSION, b"ab\0junk"))
    assert reply2.ret == 0 and reply2.fd is not None
    assert set(rig.luo.sessions.outgoing) == {b"n" * 63, b"ab"}
    for fd in (reply.fd, reply2.fd):
        os.close(fd)


def test_create_is_ebusy_while_frozen_for_a_reboot(rig: Rig) -> None:
    reboot.start_reboot(rig.luo, rig.host, no_exec=True)
    assert rig.luo.state == LuoState.FROZEN
    with pytest.raises(OSError) as info:
        rig.luo.create_session(b"late", ROOT)
    assert info.value.errno == errno.EBUSY


def test_a_handed_over_session_is_retrieved_once_by_its_owner_only(rig: Rig) -> None:
    session = rig.create(b"svc", ALICE)
    rig.preserve(session, 1)
    rig.luo.sessions.hand_over(session)
    assert session.direction == IN and session.waiting
    with pytest.raises(OSError) as refused:
        rig.luo.retrieve_session(b"svc", BOB)
    assert refused.value.errno == errno.EACCES
    assert rig.luo.retrieve_session(b"svc", ALICE) is session
    with pytest.raises(OSError) as again:
        rig.luo.retrieve_session(b"svc", ALICE)
    assert again.value.errno == errno.EINVAL
    with pytest.raises(OSError) as missing:
        rig.luo.retrieve_session(b"nothing", ALICE)
    assert missing.value.errno == errno.ENOENT


def test_releasing_an_outgoing_session_unpreserves_its_files_last_first(rig: Rig) -> None:
    session = rig.create(b"db")
    for token in (1, 2, 3):
        rig.preserve(session, token)
    rig.luo.release_session(session)
    assert [c for c in rig.handler.calls if c[0] == "unpreserve"] == [
        ("unpreserve", 3),
        ("unpreserve", 2),
        ("unpreserve", 1),
    ]
    assert not rig.luo.sessions.outgoing and len(rig.luo.preserved) == 0


def test_releasing_a_retrieved_incoming_session_finishes_it_and_frees_its_name(rig: Rig) -> None:
    session = rig.create(b"svc")
    rig.preserve(session, 7)
    rig.luo.sessions.hand_over(session)
    rig.luo.retrieve_session(b"svc", ROOT)
    rig.luo.release_session(session)
    assert ("finish", 7) in rig.handler.calls
    assert b"svc" not in rig.luo.sessions.incoming
    assert rig.luo.state == LuoState.NORMAL


def test_a_kept_on_close_session_is_handed_over_and_says_so(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="liveupdate")
    session = rig.create(b"svc", ALICE)
    rig.preserve(session, 1, b"state")
    reply = rig.session_call(
        session, uapi.SESSION_SET_FLAGS, struct(uapi.SESSION_SET_FLAGS, flags=1), caller=ALICE
    )
    assert reply.ret == 0
    rig.luo.release_session(session)
    assert rig.luo.sessions.incoming[b"svc"] is session and session.waiting
    assert _fields(caplog, "session-kept-on-close") == [{"session": "svc"}]
    assert _fields(caplog, "state-changed") == [{"old": "normal", "new": "updated"}]
    assert rig.states == [LuoState.UPDATED]


def test_a_failed_keep_on_close_releases_the_files_and_says_so(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    session = rig.create(b"svc")
    rig.preserve(session, 1)
    rig.luo.sessions.set_flags(session, uapi.LUOD_SESSION_KEEP_ON_CLOSE)
    rig.handler.fail_freeze.add(1)
    rig.luo.release_session(session)
    assert not rig.luo.sessions.incoming and not rig.luo.sessions.outgoing
    (failed,) = _fields(caplog, "session-keep-on-close-failed")
    assert failed["session"] == "svc" and "refuses to freeze" in str(failed["error"])


def test_finishing_the_last_incoming_session_returns_to_normal(rig: Rig) -> None:
    a, b = rig.create(b"a"), rig.create(b"b")
    rig.luo.sessions.hand_over(a)
    rig.luo.sessions.hand_over(b)
    assert rig.luo.state == LuoState.UPDATED
    rig.luo.sessions.finish(a)
    assert rig.luo.state == LuoState.UPDATED
    rig.luo.sessions.finish(b)
    assert rig.states == [LuoState.UPDATED, LuoState.NORMAL]


def test_an_unprivileged_finish_event_finishes_only_the_callers_sessions(rig: Rig) -> None:
    mine, theirs = rig.create(b"mine", ALICE), rig.create(b"theirs", BOB)
    rig.luo.sessions.hand_over(mine)
    rig.luo.sessions.hand_over(theirs)
    arg = struct(uapi.SET_EVENT, event=uapi.LuodEvent.FINISH)
    assert rig.device(uapi.SET_EVENT, arg, owner=ALICE).ret == 0
    assert set(rig.luo.sessions.incoming) == {b"theirs"}
    assert rig.luo.state == LuoState.UPDATED
