"""Wire protocol v1: framing of hello, requests and replies, and fd passing.

The socket tests use real ``socketpair(AF_UNIX, SOCK_SEQPACKET)`` pairs, the
transport luod uses for device and session connections.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from liveupdate import wire
from liveupdate.wire import FramingError

SETTINGS = settings(max_examples=100, deadline=None)


def _u32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


def _s32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder, signed=True)


# ---------------------------------------------------------------------------
# hello
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [0, -errno.EBUSY, -errno.EIO])
def test_hello_roundtrip(status: int) -> None:
    hello = wire.encode_hello(status)
    # Only an accepted open announces features: a refusal stays 1.0's bytes.
    features = wire.FEATURES if status == 0 else 0
    assert hello == _u32(wire.HELLO_MAGIC) + _u32(1) + _s32(status) + _u32(features)
    assert hello[:4] == b"LUOD"
    assert wire.decode_hello(hello) == status
    assert wire.parse_hello(hello) == wire.Hello(status, features)


def test_hello_default_status() -> None:
    assert wire.decode_hello(wire.encode_hello()) == 0


def test_hello_unknown_feature_bits_are_ignored() -> None:
    hello = wire.encode_hello()[:12] + _u32(0xDEADBEEF)
    assert wire.decode_hello(hello) == 0
    assert wire.parse_hello(hello).features == 0xDEADBEEF


def test_hello_announces_channels() -> None:
    assert wire.parse_hello(wire.encode_hello()).features & wire.FEATURE_CHANNELS


def test_bind_message_roundtrip() -> None:
    req = wire.decode_request(wire.encode_bind())
    assert req.cmd == wire.BIND_CMD
    assert req.arg == wire.BIND.pack(wire.BIND.size, 0)
    wire.decode_bind(req.arg)
    # A longer struct (a later revision's) is accepted when its tail is sent.
    wire.decode_bind(wire.BIND.pack(12, 0) + bytes(4))


@pytest.mark.parametrize(
    ("arg", "err"),
    [
        (b"", errno.EFAULT),
        (b"\x08\x00", errno.EFAULT),
        (wire.BIND.pack(16, 0), errno.EFAULT),
        (wire.BIND.pack(4, 0)[:4], errno.EINVAL),
        (wire.BIND.pack(8, 1), errno.EINVAL),
    ],
    ids=["empty", "short", "size-past-end", "size-below-struct", "flags"],
)
def test_bind_argument_errors(arg: bytes, err: int) -> None:
    with pytest.raises(FramingError) as exc:
        wire.decode_bind(arg)
    assert exc.value.errno == err


def test_hello_bad_magic() -> None:
    hello = b"XUOD" + wire.encode_hello()[4:]
    with pytest.raises(FramingError, match="magic") as exc:
        wire.decode_hello(hello)
    assert exc.value.errno == errno.EPROTO


@pytest.mark.parametrize("version", [0, 2, 0xFFFFFFFF])
def test_hello_bad_version(version: int) -> None:
    hello = wire.encode_hello()[:4] + _u32(version) + wire.encode_hello()[8:]
    with pytest.raises(FramingError, match="version") as exc:
        wire.decode_hello(hello)
    assert exc.value.errno == errno.EPROTO


@pytest.mark.parametrize("length", [0, 1, 8, 15, 17, 32])
def test_hello_bad_length(length: int) -> None:
    data = (wire.encode_hello() * 2)[:length]
    with pytest.raises(FramingError, match=f"hello of {length} bytes") as exc:
        wire.decode_hello(data)
    assert exc.value.errno == errno.EPROTO


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.binary(max_size=200))
def test_request_roundtrip(cmd: int, arg: bytes) -> None:
    msg = wire.encode_request(cmd, arg)
    assert msg[:8] == struct.pack("=II", cmd, len(arg))
    for view in (msg, bytearray(msg), memoryview(msg)):
        req = wire.decode_request(view)
        assert req == wire.Request(cmd, arg)
        assert type(req.arg) is bytes


def test_request_cmd_is_masked_to_u32() -> None:
    assert wire.decode_request(wire.encode_request(-1, b"")).cmd == 0xFFFFFFFF
    assert wire.encode_request(0x1_0000_BA00, b"")[:4] == _u32(0xBA00)


def test_request_accepts_any_buffer() -> None:
    arg = bytearray(b"\x08\0\0\0\0\0\0\0")
    assert wire.encode_request(0xBA42, arg) == wire.encode_request(0xBA42, memoryview(arg))


@pytest.mark.parametrize("length", range(1, 8))
def test_request_shorter_than_header_is_efault(length: int) -> None:
    with pytest.raises(FramingError) as exc:
        wire.decode_request(b"\xff" * length)
    assert exc.value.errno == errno.EFAULT


def test_request_empty_is_efault() -> None:
    # A zero-length message is a close, handled before decoding; decoding one anyway
    # is still a framing error rather than a crash.
    with pytest.raises(FramingError):
        wire.decode_request(b"")


@SETTINGS
@given(st.binary(max_size=100), st.integers(0, 2**32 - 1))
def test_request_arg_len_mismatch_is_efault(arg: bytes, arg_len: int) -> None:
    if arg_len == len(arg):
        arg_len += 1
    msg = struct.pack("=II", 0xBA00, arg_len) + arg
    with pytest.raises(FramingError, match="arg_len") as exc:
        wire.decode_request(msg)
    assert exc.value.errno == errno.EFAULT


def test_request_arg_len_cap() -> None:
    ok = wire.encode_request(0xBA00, bytes(wire.MAX_ARG_LEN))
    assert len(wire.decode_request(ok).arg) == 65536
    big = wire.encode_request(0xBA00, bytes(wire.MAX_ARG_LEN + 1))
    with pytest.raises(FramingError, match="exceeds") as exc:
        wire.decode_request(big)
    assert exc.value.errno == errno.E2BIG


def test_request_mismatch_is_checked_before_the_cap() -> None:
    msg = struct.pack("=II", 0xBA00, 100000) + bytes(10)
    with pytest.raises(FramingError) as exc:
        wire.decode_request(msg)
    assert exc.value.errno == errno.EFAULT


def test_truncated_request_with_true_length() -> None:
    """A message that did not fit the receive buffer is judged on its true length."""
    true_len = 8 + 70000
    prefix = struct.pack("=II", 0xBA00, 70000) + bytes(100)
    with pytest.raises(FramingError) as exc:
        wire.decode_request(prefix, length=true_len)
    assert exc.value.errno == errno.E2BIG
    # A header that lies about the length is EFAULT, whatever the length.
    liar = struct.pack("=II", 0xBA00, 16) + bytes(100)
    with pytest.raises(FramingError) as exc:
        wire.decode_request(liar, length=true_len)
    assert exc.value.errno == errno.EFAULT
    # Short by its true length.
    with pytest.raises(FramingError) as exc:
        wire.decode_request(b"\0" * 8, length=5)
    assert exc.value.errno == errno.EFAULT
    # An exact length behaves like no length.
    msg = wire.encode_request(0xBA01, b"abcd")
    assert wire.decode_request(msg, length=len(msg)) == wire.decode_request(msg)


def test_framing_error() -> None:
    err = FramingError(errno.E2BIG, "too big")
    assert err.errno == errno.E2BIG
    assert str(err) == "too big"
    assert isinstance(err, Exception)


# ---------------------------------------------------------------------------
# replies
# ---------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=200))
def test_reply_roundtrip_success(out: bytes) -> None:
    msg = wire.encode_reply(0, out)
    assert msg[:8] == struct.pack("=iI", 0, len(out))
    assert wire.decode_reply(msg) == (0, out)


@pytest.mark.parametrize("err", [errno.ENOTTY, errno.E2BIG, errno.EINVAL, errno.EFAULT])
def test_reply_roundtrip_error(err: int) -> None:
    msg = wire.encode_reply(-err)
    assert msg == _s32(-err) + _u32(0)
    assert wire.decode_reply(msg) == (-err, b"")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0" * 7,
        struct.pack("=iI", 0, 4) + b"abc",  # out_len larger than what follows
        struct.pack("=iI", 0, 2) + b"abc",  # out_len smaller than what follows
        struct.pack("=iI", -errno.EINVAL, 3) + b"abc",  # failure with bytes
        struct.pack("=iI", -errno.EINVAL, 0) + b"abc",  # failure with stray bytes
    ],
)
def test_reply_malformed(data: bytes) -> None:
    with pytest.raises(FramingError) as exc:
        wire.decode_reply(data)
    assert exc.value.errno == errno.EPROTO


# ---------------------------------------------------------------------------
# Sockets and SCM_RIGHTS
# ---------------------------------------------------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        yield a, b


@pytest.fixture
def tmpfile() -> Iterator[int]:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    try:
        yield fd
    finally:
        os.close(fd)


def test_message_without_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wire.send_message(a, b"hello")
    msg = wire.recv_message(b, 100)
    assert msg == wire.Message(b"hello", 5, [], False)
    assert not msg.truncated


def test_messages_keep_their_boundaries(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    for data in (b"one", b"two", wire.encode_request(0xBA42, bytes(8))):
        wire.send_message(a, data)
    assert wire.recv_message(b, 1000).data == b"one"
    assert wire.recv_message(b, 1000).data == b"two"
    assert wire.decode_request(wire.recv_message(b, 1000).data).cmd == 0xBA42


def test_fds_are_cloexec_and_the_same_file(
    pair: tuple[socket.socket, socket.socket], tmpfile: int
) -> None:
    a, b = pair
    os.set_inheritable(tmpfile, True)  # the sender's flag must not travel
    wire.send_message(a, b"x", [tmpfile])
    msg = wire.recv_message(b, 16, maxfds=1)
    assert msg.data == b"x"
    assert not msg.fds_truncated
    assert len(msg.fds) == 1
    (fd,) = msg.fds
    try:
        assert fd != tmpfile
        assert os.get_inheritable(fd) is False
        assert os.get_inheritable(tmpfile) is True
        # The same open file description: data and the file offset are shared.
        assert os.write(fd, b"written through the received fd") == 31
        assert os.lseek(tmpfile, 0, os.SEEK_CUR) == 31
        assert os.pread(tmpfile, 100, 0) == b"written through the received fd"
        os.write(tmpfile, b"!")
        assert os.pread(fd, 100, 0) == b"written through the received fd!"
    finally:
        os.close(fd)


def test_several_fds_in_order(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        wire.send_message(a, b"pipe", [r, w])
        msg = wire.recv_message(b, 16)
        assert len(msg.fds) == 2
        try:
            assert all(not os.get_inheritable(fd) for fd in msg.fds)
            os.write(msg.fds[1], b"through the pipe")
            assert os.read(r, 100) == b"through the pipe"
            os.write(w, b"back")
            assert os.read(msg.fds[0], 100) == b"back"
        finally:
            wire.close_fds(msg.fds)
    finally:
        wire.close_fds([r, w])


def test_true_length_of_a_long_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    data = bytes(range(256)) * 273 + bytes(112)
    assert len(data) == 70000
    wire.send_message(a, data)
    msg = wire.recv_message(b, 64)
    assert msg.length == 70000
    assert msg.data == data[:64]
    assert msg.truncated
    # The rest was discarded: the next message is a new one.
    wire.send_message(a, b"next")
    assert wire.recv_message(b, 64).data == b"next"


def test_oversized_request_through_the_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    """How the daemon sees an argument above the cap: truncated, judged on its length."""
    a, b = pair
    wire.send_message(a, wire.encode_request(0xBA00, bytes(70000)))
    msg = wire.recv_message(b, wire.REQUEST_HEADER.size + wire.MAX_ARG_LEN)
    assert msg.truncated
    with pytest.raises(FramingError) as exc:
        wire.decode_request(msg.data, length=msg.length)
    assert exc.value.errno == errno.E2BIG


def test_too_many_fds_for_the_buffer(
    pair: tuple[socket.socket, socket.socket], tmpfile: int
) -> None:
    a, b = pair
    wire.send_message(a, b"fds", [tmpfile] * 8)
    msg = wire.recv_message(b, 16, maxfds=1)
    try:
        assert msg.fds_truncated
        assert msg.data == b"fds"
        # What did fit is handed over (and can be closed), the rest the kernel closed.
        assert 1 <= len(msg.fds) < 8
        for fd in msg.fds:
            assert os.fstat(fd).st_ino == os.fstat(tmpfile).st_ino
            assert not os.get_inheritable(fd)
    finally:
        wire.close_fds(msg.fds)


def test_no_room_for_fds_at_all(pair: tuple[socket.socket, socket.socket], tmpfile: int) -> None:
    a, b = pair
    wire.send_message(a, b"fds", [tmpfile, tmpfile, tmpfile])
    msg = wire.recv_message(b, 16, maxfds=0)
    wire.close_fds(msg.fds)
    assert msg.fds_truncated
    assert msg.fds == []


def test_the_most_fds_one_message_carries(
    pair: tuple[socket.socket, socket.socket], tmpfile: int
) -> None:
    a, b = pair
    wire.send_message(a, b"many", [tmpfile] * wire.MAX_FDS_PER_MESSAGE)
    msg = wire.recv_message(b, 16)
    try:
        assert not msg.fds_truncated
        assert len(msg.fds) == wire.MAX_FDS_PER_MESSAGE == 253
    finally:
        wire.close_fds(msg.fds)


def test_more_than_253_fds_is_refused(
    pair: tuple[socket.socket, socket.socket], tmpfile: int
) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="253"):
        wire.send_message(a, b"x", [tmpfile] * 254)


def test_sender_credentials_are_reported(
    pair: tuple[socket.socket, socket.socket], tmpfile: int
) -> None:
    a, b = pair
    # With SO_PASSCRED every message also carries SCM_CREDENTIALS.
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    wire.send_message(a, b"creds", [tmpfile])
    msg = wire.recv_message(b, 16, creds=True)
    try:
        assert msg.data == b"creds"
        assert len(msg.fds) == 1
        assert os.fstat(msg.fds[0]).st_ino == os.fstat(tmpfile).st_ino
        assert msg.creds == (os.getpid(), os.getuid(), os.getgid())
    finally:
        wire.close_fds(msg.fds)


def test_no_credentials_without_passcred(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wire.send_message(a, b"plain")
    assert wire.recv_message(b, 16).creds is None


def test_recv_flags_are_passed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(BlockingIOError):
        wire.recv_message(b, 16, flags=socket.MSG_DONTWAIT)
    wire.send_message(a, b"peek")
    assert wire.recv_message(b, 16, flags=socket.MSG_PEEK).data == b"peek"
    assert wire.recv_message(b, 16).data == b"peek"


def test_peer_close_is_a_zero_length_message(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    msg = wire.recv_message(b, 16)
    assert msg == wire.Message(b"", 0)
    assert not msg.truncated


def test_close_fds_tolerates_closed_fds(tmpfile: int) -> None:
    r, w = os.pipe()
    dup = os.dup(tmpfile)
    os.close(w)
    wire.close_fds([r, w, dup, r])
    for fd in (r, dup):
        with pytest.raises(OSError):
            os.fstat(fd)
    wire.close_fds([])


def test_a_reused_buffer_returns_each_message_as_its_own_copy(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    buffer = bytearray(64)
    wire.send_message(a, b"first message")
    wire.send_message(a, b"two")
    first = wire.recv_message(b, 64, buffer=buffer)
    second = wire.recv_message(b, 64, buffer=buffer)
    # The second receive overwrote the buffer, not the first message's data.
    assert (first.data, second.data) == (b"first message", b"two")
    assert isinstance(first.data, bytes)


def test_a_buffer_of_another_size_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    wire.send_message(a, b"kept")
    with pytest.raises(ValueError, match="16 bytes given for 64"):
        wire.recv_message(b, 64, buffer=bytearray(16))
    assert wire.recv_message(b, 64).data == b"kept"  # nothing was read


def test_rights_and_fds_of_carry_fds_through_any_sendmsg() -> None:
    assert wire.rights([]) == []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        a.sendmsg([b"x"], wire.rights([r, w]))
        _data, ancdata, _flags, _addr = b.recvmsg(16, socket.CMSG_SPACE(8), socket.MSG_CMSG_CLOEXEC)
        got = wire.fds_of(ancdata)
        assert len(got) == 2
        for x, y in zip(got, [r, w], strict=True):
            assert os.path.samestat(os.fstat(x), os.fstat(y))
        wire.close_fds(got)
        assert wire.fds_of([(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12))]) == []
    finally:
        wire.close_fds([r, w])
        a.close()
        b.close()
