"""What a session may hold: files luod refuses, and a refused file leaves no trace.

Each test runs against a real luod with real fds; each pins a behaviour that
once broke (the docstrings say how).
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import Luod, events, fds_settle, memfd, raw_send, sessions, state, wait_for

pytestmark = pytest.mark.luod_only


def test_preserving_luods_own_device_or_session_fd_is_refused(luod: Luod) -> None:
    """A client's own luod device or session fd cannot be preserved into a session.

    Broke once (review finding H1): luod accepted it, then held its own
    client's end and never saw that connection close.
    """
    dev = luod.open()
    session = dev.create_session("own-fds")
    baseline = luod.fd_count()
    # ENOENT ("no handler can preserve this kind of file"): luod would hold
    # its own client's end and never see it close.
    with pytest.raises(liveupdate.NotFoundError) as exc:
        session.preserve(dev.fileno(), 1)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(liveupdate.NotFoundError) as exc:
        session.preserve(session.fileno(), 2)
    assert exc.value.errno == errno.ENOENT
    # Nothing of the client was kept (a refused fd is closed, maybe just
    # after the reply).
    wait_for(lambda: luod.fd_count() <= baseline, "luod to drop the refused fds")
    dev.close()
    session.close()

    # The device opens again (no EBUSY) and the session was released: its
    # name is free.
    wait_for(
        lambda: bool(events(luod, "session-released", session="own-fds")),
        "the session to be released",
    )
    for _ in range(2):
        with luod.open(timeout=2.0) as again:
            again.create_session("own-fds").close()
    wait_for(lambda: sessions(luod) == [], "the sessions to be released")


def test_preserving_a_file_its_session_already_holds_is_busy_and_leaks_nothing(
    luod: Luod,
) -> None:
    """PRESERVE_FD of a file the session already holds is EBUSY, even if never answered.

    Broke once (review finding H7): a second PRESERVE_FD of the same file,
    with the session closed before the reply was read, leaked in luod.
    """
    baseline = luod.fd_count()
    with luod.open() as dev:
        session = dev.create_session("held-twice")
    fd = memfd(b"x")
    try:
        session.preserve(fd, 1)
        with pytest.raises(liveupdate.DeviceBusyError):
            session.preserve(fd, 2)  # the session holds it already: EBUSY
        assert session.get_name() == b"held-twice"  # and the session lives on
        # The same file again under another token, the session closed before
        # the reply is read.
        arg = uapi.liveupdate_session_preserve_fd(
            size=ctypes.sizeof(uapi.liveupdate_session_preserve_fd), fd=fd, token=2
        )
        raw_send(session, uapi.LIVEUPDATE_SESSION_PRESERVE_FD, bytes(arg), [fd])
        session.close()
        wait_for(lambda: sessions(luod) == [], "the session to be released")
        fds_settle(luod, baseline)
        assert state(luod).preserved_files == 0

        # The file is free again: another session may preserve it.
        with luod.open() as dev:
            other = dev.create_session("held-twice-b")
        with other:
            other.preserve(fd, 7)
            assert state(luod).preserved_files == 1
    finally:
        os.close(fd)
    wait_for(lambda: sessions(luod) == [], "the second session to be released")
    fds_settle(luod, baseline)
