"""luod's side of channels (wire 1.1): what a BIND binds, refuses, and ends.

Raw sockets against a real luod: every refusal is answered on the fd the
BIND came on with the errno ``docs/concepts/wire.md`` gives, leaves that fd
working, and leaks nothing in luod.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
from collections.abc import Callable, Iterator

import pytest

import liveupdate
from liveupdate import uapi, wire
from liveupdate.server.transport import MAX_CHANNELS
from luodtest import Luod, copies_settled, fds_settle, memfd, wait_for

pytestmark = pytest.mark.luod_only


def _call(
    sock: socket.socket, cmd: int, arg: bytes, fds: list[int] | None = None
) -> tuple[int, bytes]:
    wire.send_message(sock, wire.encode_request(cmd, arg), fds or [])
    msg = wire.recv_message(sock, 1 << 17)
    wire.close_fds(msg.fds)
    assert msg.length, "luod closed the connection"
    return wire.decode_reply(msg.data)


def _get_name(sock: socket.socket) -> bytes:
    arg = uapi.liveupdate_session_get_name(size=ctypes.sizeof(uapi.liveupdate_session_get_name))
    ret, out = _call(sock, uapi.LIVEUPDATE_SESSION_GET_NAME, bytes(arg))
    assert ret == 0
    return uapi.decode_name(uapi.liveupdate_session_get_name.from_buffer_copy(out).name)


def _bind(shared: socket.socket) -> socket.socket:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wire.send_message(shared, wire.encode_bind(), [theirs.fileno()])
    theirs.close()
    ours.settimeout(10)
    assert wire.decode_reply(ours.recv(64)) == (0, b"")
    return ours


@pytest.fixture
def session_sock(luod: Luod) -> Iterator[tuple[liveupdate.Device, socket.socket]]:
    with liveupdate.open_device(luod.socket) as dev:
        session = dev.create_session("chan")
        sock = socket.socket(fileno=session.detach())
        sock.settimeout(10)
        yield dev, sock
        sock.close()


def _refusal(shared: socket.socket, message: bytes, fds: list[int]) -> int:
    wire.send_message(shared, message, fds)
    ret, _out = wire.decode_reply(shared.recv(64))
    return -ret


def test_a_channel_serves_the_same_session(
    session_sock: tuple[liveupdate.Device, socket.socket],
) -> None:
    _dev, shared = session_sock
    channel = _bind(shared)
    assert _get_name(channel) == b"chan"
    assert _get_name(shared) == b"chan"
    channel.close()
    # Closing a channel releases nothing.
    assert _get_name(shared) == b"chan"


def test_a_bind_without_an_fd_is_ebadf(
    session_sock: tuple[liveupdate.Device, socket.socket],
) -> None:
    _dev, shared = session_sock
    assert _refusal(shared, wire.encode_bind(), []) == errno.EBADF
    assert _get_name(shared) == b"chan"


def test_a_bind_with_two_fds_is_ebadf(
    session_sock: tuple[liveupdate.Device, socket.socket],
) -> None:
    _dev, shared = session_sock
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert _refusal(shared, wire.encode_bind(), [a.fileno(), b.fileno()]) == errno.EBADF
    a.close()
    b.close()


@pytest.mark.parametrize("kind", ["memfd", "stream", "hung-up"])
def test_a_bind_of_anything_but_a_connected_seqpacket_socket_is_einval(
    luod: Luod, session_sock: tuple[liveupdate.Device, socket.socket], kind: str
) -> None:
    dev, shared = session_sock
    copies_settled(dev)
    baseline = luod.fd_count()
    if kind == "memfd":
        fd = memfd(b"x")
    elif kind == "stream":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.close()
        fd = theirs.detach()
    else:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.close()  # nobody could read the acknowledgement
        fd = theirs.detach()
    assert _refusal(shared, wire.encode_bind(), [fd]) == errno.EINVAL
    os.close(fd)
    assert _get_name(shared) == b"chan"
    fds_settle(luod, baseline)


@pytest.mark.parametrize(
    ("arg", "err"),
    [
        (wire.BIND.pack(8, 1), errno.EINVAL),
        (wire.BIND.pack(4, 0)[:4], errno.EINVAL),
        (b"\0", errno.EFAULT),
    ],
    ids=["flags", "size-below-struct", "short"],
)
def test_a_malformed_bind_is_refused_on_its_fd(
    session_sock: tuple[liveupdate.Device, socket.socket], arg: bytes, err: int
) -> None:
    _dev, shared = session_sock
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert _refusal(shared, wire.encode_request(wire.BIND_CMD, arg), [theirs.fileno()]) == err
    theirs.close()
    ours.settimeout(10)
    assert ours.recv(16) == b""  # luod closed the fd it was sent
    ours.close()


def test_channels_beyond_the_limit_are_emfile(
    luod: Luod, session_sock: tuple[liveupdate.Device, socket.socket]
) -> None:
    dev, shared = session_sock
    copies_settled(dev)
    baseline = luod.fd_count()
    channels = [_bind(shared) for _ in range(MAX_CHANNELS)]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert _refusal(shared, wire.encode_bind(), [b.fileno()]) == errno.EMFILE
    a.close()
    b.close()
    assert _get_name(channels[-1]) == b"chan"
    for channel in channels:
        channel.close()
    fds_settle(luod, baseline)
    # Closed channels no longer count.
    _bind(shared).close()


def test_the_release_of_the_session_ends_its_channels(
    session_sock: tuple[liveupdate.Device, socket.socket],
) -> None:
    dev, shared = session_sock
    channel = _bind(shared)
    shared.close()
    wait_for(lambda: "chan" not in [s.name for s in dev.list_sessions().sessions])
    channel.settimeout(10)
    assert channel.recv(16) == b""


def test_a_device_channel_belongs_to_its_binder_not_to_the_opener(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev:
        ready_r, ready_w = os.pipe()
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            # The library binds a channel on the inherited device fd.
            with dev.create_session("by-child"):
                os.write(ready_w, b"1")
                os.read(done_r, 1)
            os._exit(0)
        assert os.read(ready_r, 1) == b"1"
        assert dev.list_sessions("by-child").sessions[0].pid == pid
        os.write(done_w, b"1")
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def test_a_reboot_closes_every_channel(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev:
        session = dev.create_session("across")
        keep = memfd(b"kept")
        session.preserve(keep, 1)
        shared = socket.socket(fileno=os.dup(session.fileno()))
        channel = _bind(shared)
        dev.set_event(uapi.LuodEvent.PREPARE)
        dev.set_event(uapi.LuodEvent.REBOOT)
    channel.settimeout(10)
    assert channel.recv(16) == b""
    with (
        liveupdate.open_device(luod.socket, timeout=10) as dev,
        dev.retrieve_session("across") as incoming,
    ):
        os.close(incoming.retrieve(1))
    os.close(keep)
    shared.close()


def test_a_handover_asked_on_a_channel_hands_over_the_session_fd(
    session_sock: tuple[liveupdate.Device, socket.socket],
) -> None:
    dev, shared = session_sock
    channel = _bind(shared)
    arg = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update))
    assert _call(channel, uapi.LUOD_SESSION_UPDATE, bytes(arg))[0] == 0
    # The session's fd and its channel die once the reply is out; the
    # session waits for its successor instead of being released.
    shared.settimeout(10)
    assert shared.recv(16) == b""
    assert channel.recv(16) == b""
    assert "chan" in [s.name for s in dev.list_sessions().sessions]


def test_channels_stop_at_luods_fd_reserve(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory("--fd-reserve", "32")
    # A small table, so that filling it is quick (a re-exec would keep it).
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (160, 160))
    with liveupdate.open_device(daemon.socket) as dev:
        session = dev.create_session("reserve")
        shared = socket.socket(fileno=session.detach())
        shared.settimeout(10)
        channels = []
        for _ in range(160):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            wire.send_message(shared, wire.encode_bind(), [theirs.fileno()])
            theirs.close()
            ours.settimeout(10)
            ack = ours.recv(64)
            if not ack:  # refused: the answer is on the shared fd
                ours.close()
                break
            channels.append(ours)
        else:
            raise AssertionError("luod bound a channel into its fd reserve")
        assert wire.decode_reply(shared.recv(64)) == (-errno.EMFILE, b"")
        # What luod holds besides (its log, listeners, copies...) takes a few more.
        assert 160 - 32 - 32 < len(channels) < 160 - 32, len(channels)
        # The reserve is intact: the operator's own connections still work.
        assert dev.get_state().state == uapi.LuodState.NORMAL
        for channel in channels:
            channel.close()
        _bind(shared).close()
        shared.close()
