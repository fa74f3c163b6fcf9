"""LUOD_SESSION_SYNC: answered 0 with the cookie unchanged, in order after
every earlier reply; in-process through the dispatcher and against luod."""

from __future__ import annotations

import ctypes
import errno
import socket
from collections.abc import Callable

import pytest
from corelib import Rig, struct

from liveupdate import uapi, wire
from liveupdate.core.session_ops import SessionCall
from liveupdate.dispatch import dispatch
from luodtest import Luod

COOKIE = 0x0123_4567_89AB_CDEF


def _sync_reply(out: bytes) -> uapi.luod_session_sync:
    return uapi.luod_session_sync.from_buffer_copy(out.ljust(uapi.SESSION_SYNC.sizeof, b"\0"))


@pytest.mark.parametrize("incoming", [False, True], ids=["outgoing", "incoming"])
def test_sync_answers_with_its_cookie_on_either_direction(rig: Rig, incoming: bool) -> None:
    session = rig.create(b"shared")
    if incoming:
        rig.luo.sessions.hand_over(session)
    reply = rig.session_call(session, uapi.SESSION_SYNC, struct(uapi.SESSION_SYNC, cookie=COOKIE))
    assert reply.ret == 0 and reply.fd is None
    assert _sync_reply(reply.out).cookie == COOKIE
    assert len(reply.out) == uapi.SESSION_SYNC.sizeof


def test_sync_with_reserved_set_is_einval(rig: Rig) -> None:
    session = rig.create(b"shared")
    arg = struct(uapi.SESSION_SYNC, reserved=1, cookie=COOKIE)
    assert rig.session_call(session, uapi.SESSION_SYNC, arg).ret == -errno.EINVAL


def test_sync_from_an_older_caller_without_a_cookie_is_einval(rig: Rig) -> None:
    session = rig.create(b"shared")
    short = (8).to_bytes(4, "little") + bytes(4)  # size and reserved, no cookie
    call = SessionCall(rig.luo.sessions, session, [], None, None)
    reply = dispatch(rig.sestable, uapi.LUOD_SESSION_SYNC, short, call, session.direction)
    assert reply.ret == -errno.EINVAL  # the cookie is mandatory


def _call(sock: socket.socket, cmd: int, arg: ctypes.Structure) -> None:
    wire.send_message(sock, wire.encode_request(cmd, bytes(arg)))


def _reply(sock: socket.socket) -> tuple[int, bytes]:
    return wire.decode_reply(sock.recv(wire.REPLY_HEADER.size + wire.MAX_ARG_LEN))


@pytest.mark.luod_only
def test_luod_answers_sync_after_every_earlier_reply(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory()
    with daemon.open() as dev:
        session = dev.create_session("shared")
        sock = socket.socket(fileno=session.fileno())
        try:
            name = struct(uapi.GET_NAME)
            _call(sock, uapi.LIVEUPDATE_SESSION_GET_NAME, name)
            _call(sock, uapi.LUOD_SESSION_SYNC, struct(uapi.SESSION_SYNC, cookie=COOKIE))
            bad = struct(uapi.SESSION_SYNC, reserved=7, cookie=COOKIE)
            _call(sock, uapi.LUOD_SESSION_SYNC, bad)
            ret, out = _reply(sock)
            got = uapi.liveupdate_session_get_name.from_buffer_copy(out)
            assert ret == 0 and uapi.decode_name(got.name) == b"shared"
            ret, out = _reply(sock)
            assert ret == 0 and _sync_reply(out).cookie == COOKIE
            assert _reply(sock)[0] == -errno.EINVAL
        finally:
            sock.detach()
            session.close()
