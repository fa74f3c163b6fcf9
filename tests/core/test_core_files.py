"""Files in-process: preserve, unpreserve, retrieve, finish, and what counts as busy."""

from __future__ import annotations

import errno
import os

import pytest
from corelib import ROOT, Rig, content, memfd, struct

from liveupdate import uapi


def _errno(call: object) -> int:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno or 0


def test_a_preserved_fd_becomes_the_orchestrators_and_leaves_the_callers_list(rig: Rig) -> None:
    session = rig.create(b"db")
    fd = memfd(b"kept")
    fds = [fd]
    file = rig.luo.sessions.preserve_file(session, 1, fds)
    assert fds == [] and file.fd == fd
    assert content(file.fd) == b"kept"
    assert ("preserve", 1) in rig.handler.calls


def test_a_token_used_twice_in_one_session_is_eexist(rig: Rig) -> None:
    session = rig.create(b"db")
    rig.preserve(session, 1)
    fd = memfd()
    try:
        assert _errno(lambda: rig.luo.sessions.preserve_file(session, 1, [fd])) == errno.EEXIST
    finally:
        os.close(fd)


def test_a_call_without_exactly_one_fd_is_ebadf(rig: Rig) -> None:
    session = rig.create(b"db")
    arg = struct(uapi.PRESERVE_FD, token=1, fd=-1)
    assert rig.session_call(session, uapi.PRESERVE_FD, arg, fds=[]).ret == -errno.EBADF


def test_a_file_no_handler_takes_is_enoent(rig: Rig) -> None:
    session = rig.create(b"db")
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        assert _errno(lambda: rig.luo.sessions.preserve_file(session, 1, [r])) == errno.ENOENT
    finally:
        os.close(r)
        os.close(w)


def test_the_same_file_in_two_sessions_is_ebusy_until_unpreserved(rig: Rig) -> None:
    first, second = rig.create(b"a"), rig.create(b"b")
    fd = rig.preserve(first, 1)
    dup = os.dup(fd)
    try:
        assert _errno(lambda: rig.luo.sessions.preserve_file(second, 2, [dup])) == errno.EBUSY
        before = rig.luo.sessions.mutations
        arg = struct(uapi.SESSION_UNPRESERVE_FD, token=1)
        assert rig.session_call(first, uapi.SESSION_UNPRESERVE_FD, arg).ret == 0
        assert rig.luo.sessions.mutations > before
        fds = [dup]
        rig.luo.sessions.preserve_file(second, 2, fds)
        assert fds == []
    except BaseException:
        os.close(dup)
        raise


def test_a_file_busy_in_a_session_closed_meanwhile_can_be_preserved(rig: Rig) -> None:
    first, second = rig.create(b"a"), rig.create(b"b")
    dup = os.dup(rig.preserve(first, 1))
    rig.closed.add(id(first))
    fds = [dup]
    rig.luo.sessions.preserve_file(second, 1, fds)
    assert fds == [] and b"a" not in rig.luo.sessions.outgoing


def test_unpreserving_an_unknown_token_is_enoent(rig: Rig) -> None:
    session = rig.create(b"db")
    arg = struct(uapi.SESSION_UNPRESERVE_FD, token=9)
    assert rig.session_call(session, uapi.SESSION_UNPRESERVE_FD, arg).ret == -errno.ENOENT


def test_a_retrieved_file_counts_as_preserved_until_its_session_finishes(rig: Rig) -> None:
    session = rig.create(b"svc")
    rig.preserve(session, 1, b"data")
    rig.luo.sessions.hand_over(session)
    assert len(rig.luo.preserved) == 0  # waiting, not retrieved: free
    rig.luo.retrieve_session(b"svc", ROOT)
    fd = rig.luo.sessions.retrieve_file(session, 1)
    try:
        assert content(fd) == b"data"
        other = rig.create(b"other")
        dup = os.dup(fd)
        assert _errno(lambda: rig.luo.sessions.preserve_file(other, 1, [dup])) == errno.EBUSY
        os.close(dup)
        rig.luo.sessions.finish(session)
        assert len(rig.luo.preserved) == 0
        assert _errno(lambda: rig.luo.sessions.retrieve_file(session, 1)) == errno.ENOENT
    finally:
        os.close(fd)


def test_a_failed_retrieval_is_sticky(rig: Rig) -> None:
    session = rig.create(b"svc")
    rig.preserve(session, 1)
    rig.luo.sessions.hand_over(session)
    rig.handler.fail_retrieve.add(1)
    assert _errno(lambda: rig.luo.sessions.retrieve_file(session, 1)) == errno.EIO
    rig.handler.fail_retrieve.clear()
    assert _errno(lambda: rig.luo.sessions.retrieve_file(session, 1)) == errno.EIO


def test_finish_is_ebusy_while_a_file_refuses_and_forced_when_the_fd_closes(rig: Rig) -> None:
    session = rig.create(b"svc")
    rig.preserve(session, 1)
    rig.luo.sessions.hand_over(session)
    rig.luo.retrieve_session(b"svc", ROOT)
    rig.handler.refuse_finish.add(1)
    finish = struct(uapi.FINISH)
    assert rig.session_call(session, uapi.FINISH, finish).ret == -errno.EBUSY
    assert not session.finished and session.files[1].fd >= 0
    rig.luo.release_session(session)
    assert session.finished and ("finish", 1) in rig.handler.calls


def test_every_file_is_released_even_when_an_unpreserve_fails(rig: Rig) -> None:
    session = rig.create(b"db")
    fds = [rig.preserve(session, token) for token in (1, 2, 3)]
    rig.handler.fail_unpreserve.add(2)
    with pytest.raises(OSError):
        rig.luo.release_session(session)
    assert len(session.files) == 0 and len(rig.luo.preserved) == 0
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed (the rig's fd check proves nothing else leaked)
