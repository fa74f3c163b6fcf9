"""``liveupdate.inherited_session()``: what a service started by ``luoctl run`` inherits.

The environment is built here the way ``luoctl run`` builds it, around real
session fds of a real luod; ``LUOD_SESSION_UPDATE`` hands a session over (it
becomes incoming under the same name) the way an update of the service does.
"""

from __future__ import annotations

import os

import pytest

import liveupdate
from liveupdate import uapi
from liveupdate.client.service import (
    NEXT_SESSION_FD_ENV,
    SESSION_FD_ENV,
    SESSION_NAME_ENV,
    SESSION_STATE_ENV,
)
from luodtest import Luod, memfd, read_all

pytestmark = pytest.mark.luod_only


def own_fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def handed_over(luod: Luod, name: str, files: dict[int, bytes]) -> liveupdate.Session:
    """An incoming session ``name`` holding ``files``, as after an update of the service."""
    with luod.open() as dev:
        session = dev.create_session(name)
    for token, data in files.items():
        fd = memfd(data)
        session.preserve(fd, token)
        os.close(fd)
    session.update()
    session.close()
    with luod.open() as dev:
        return dev.retrieve_session(name)


def test_outside_luoctl_run_there_is_no_inherited_session() -> None:
    assert liveupdate.inherited_session({}) is None
    assert liveupdate.inherited_session({SESSION_NAME_ENV: "svc"}) is None


def test_an_unknown_session_state_is_refused_naming_the_variable() -> None:
    env = {SESSION_FD_ENV: "0", SESSION_STATE_ENV: "sideways"}
    with pytest.raises(ValueError, match=f"{SESSION_STATE_ENV}='sideways'"):
        liveupdate.inherited_session(env)


def test_a_fresh_start_restores_nothing_and_preserves_into_its_own_session(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("fresh-svc")
    with session:
        # No state and no name given: outgoing, named by asking luod.
        svc = liveupdate.inherited_session({SESSION_FD_ENV: str(session.fileno())})
        assert svc is not None
        assert (svc.name, svc.state) == ("fresh-svc", "outgoing")
        assert svc.outgoing is svc.session
        assert svc.restore(luod.socket) == {}
        fd = memfd(b"first run's state")
        svc.outgoing.preserve(fd, 5)
        os.close(fd)
        with luod.open() as dev:
            (entry,) = dev.list_sessions("fresh-svc").sessions
        assert [f.token for f in entry.files or ()] == [5]


def test_restore_takes_over_every_file_and_carries_it_to_the_next_session(luod: Luod) -> None:
    incoming = handed_over(luod, "svc", {1: b"listener", 2: b"connection"})
    with luod.open() as dev:
        outgoing = dev.create_session("svc")
    env = {
        SESSION_FD_ENV: str(incoming.fileno()),
        SESSION_NAME_ENV: "svc",
        SESSION_STATE_ENV: "incoming",
        NEXT_SESSION_FD_ENV: str(outgoing.fileno()),
    }
    svc = liveupdate.inherited_session(env)
    assert svc is not None and svc.state == "incoming"
    assert svc.outgoing is svc.next_session
    assert svc.tokens(luod.socket) == [1, 2]

    fds = svc.restore(luod.socket)

    try:
        assert {t: read_all(fd) for t, fd in fds.items()} == {1: b"listener", 2: b"connection"}
        # The incoming session is finished (it holds nothing, until its fd
        # closes); the outgoing one holds every file for the next update.
        assert svc.tokens(luod.socket) == []
        with luod.open() as dev:
            listing = dev.list_sessions("svc").sessions
        held = {e.direction: sorted(f.token for f in e.files or ()) for e in listing}
        assert held == {uapi.SessionDirection.INCOMING: [], uapi.SessionDirection.OUTGOING: [1, 2]}
    finally:
        for fd in fds.values():
            os.close(fd)
        incoming.close()
        outgoing.close()


def test_restore_after_a_crash_mid_restore_keeps_the_file_just_retrieved(luod: Luod) -> None:
    """A predecessor that crashed after preserving some files again left their
    tokens in the outgoing session: the incoming file wins, nothing is EEXIST."""
    incoming = handed_over(luod, "crashy", {7: b"the real state"})
    with luod.open() as dev:
        outgoing = dev.create_session("crashy")
    leftover = memfd(b"a half-restored copy")
    outgoing.preserve(leftover, 7)
    env = {
        SESSION_FD_ENV: str(incoming.fileno()),
        SESSION_STATE_ENV: "incoming",
        NEXT_SESSION_FD_ENV: str(outgoing.fileno()),
    }
    svc = liveupdate.inherited_session(env)
    assert svc is not None

    fds = svc.restore(luod.socket)

    try:
        assert read_all(fds[7]) == b"the real state"
        # The outgoing session holds the retrieved file now, not the leftover:
        # hand it over and look.
        outgoing.update()
        outgoing.close()
        with luod.open() as dev, dev.retrieve_session("crashy") as nxt:
            fd = nxt.retrieve(7)
            try:
                assert os.path.samestat(os.fstat(fd), os.fstat(fds[7]))
                assert not os.path.samestat(os.fstat(fd), os.fstat(leftover))
            finally:
                os.close(fd)
            nxt.finish()
    finally:
        for fd in fds.values():
            os.close(fd)
        os.close(leftover)
        incoming.close()


def test_a_restore_that_fails_closes_every_file_it_retrieved(luod: Luod) -> None:
    incoming = handed_over(luod, "miswired", {1: b"a", 2: b"b"})
    # Miswired: the "next" session is the incoming one, where nothing can be preserved.
    env = {
        SESSION_FD_ENV: str(incoming.fileno()),
        SESSION_STATE_ENV: "incoming",
        NEXT_SESSION_FD_ENV: str(incoming.fileno()),
    }
    svc = liveupdate.inherited_session(env)
    assert svc is not None
    svc.next_session = liveupdate.Session.from_fd(
        os.dup(incoming.fileno()), uapi.SessionDirection.INCOMING
    )
    # Adopted fds call through channels of this process's own (wire 1.1):
    # bound at the first call, they are the objects' until closed.
    svc.session.get_name()
    svc.next_session.get_name()
    before = own_fds()
    with pytest.raises(liveupdate.LiveUpdateError):
        svc.restore(luod.socket)
    assert own_fds() == before  # the two retrieved fds were closed
    svc.next_session.close()
    incoming.close()


def test_a_deferred_restore_preserves_again_from_the_loop_what_is_still_open(luod: Luod) -> None:
    incoming = handed_over(luod, "svc", {1: b"listener", 2: b"gone", 3: b"a", 4: b"b"})
    with luod.open() as dev:
        outgoing = dev.create_session("svc")
    env = {
        SESSION_FD_ENV: str(incoming.fileno()),
        SESSION_NAME_ENV: "svc",
        SESSION_STATE_ENV: "incoming",
        NEXT_SESSION_FD_ENV: str(outgoing.fileno()),
    }
    svc = liveupdate.inherited_session(env)
    assert svc is not None

    def outgoing_tokens() -> list[int]:
        with luod.open() as dev:
            listing = dev.list_sessions("svc").sessions
        out = [e for e in listing if e.direction == uapi.SessionDirection.OUTGOING]
        return sorted(f.token for f in out[0].files or ())

    fds = svc.restore(luod.socket, defer=True)
    try:
        # Retrieved and the incoming session finished; nothing preserved again yet.
        assert sorted(fds) == [1, 2, 3, 4] and svc.pending == 4
        assert svc.tokens(luod.socket) == []
        assert outgoing_tokens() == []
        svc.unpreserve(2)  # a client left before its connection was preserved again
        assert svc.pending == 3
        assert svc.preserve_pending(2) == 1  # a few a turn, in order
        assert outgoing_tokens() == [1, 3]
        assert svc.preserve_pending() == 0
        assert outgoing_tokens() == [1, 3, 4]
        assert svc.preserve_pending() == 0  # nothing left: no call
    finally:
        for fd in fds.values():
            os.close(fd)
        incoming.close()
        outgoing.close()
