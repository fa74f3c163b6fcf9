"""Framing of the LUO ioctl ABI over luod's Unix sockets (wire protocol 1.1).

The protocol is deliberately thin (see ``wire.md``): a 16-byte hello when a
device connection opens, then one request message per ioctl (8-byte header +
the caller's struct bytes) answered by one reply message (8-byte header + the
bytes written back). File descriptors travel as ``SCM_RIGHTS``.

Revision 1.1 adds *channels*, announced in the hello's ``features`` word
(the word 1.0 reserved): a caller that shares a device or session fd with
other processes sends a :data:`BIND_CMD` message carrying one end of a fresh
socketpair, and luod serves that end as a private connection to the same
device or session. Replies then reach the caller that asked, as they do for
the kernel's ``ioctl(2)``. Every 1.0 exchange is unchanged, so a 1.0 client
keeps working against a 1.1 luod (``docs/concepts/wire.md``).

Both sides use this module: the daemon to decode requests and encode
replies, the client library to do the reverse. It knows nothing about what
the structs mean.

Two traps of the standard library are avoided here on purpose:

* ``socket.recv_fds`` ignores its flags and returns inheritable fds; we call
  ``recvmsg`` with ``MSG_CMSG_CLOEXEC`` ourselves.
* When the ancillary buffer is too small the kernel closes the fds that did
  not fit and sets ``MSG_CTRUNC``; we report that instead of losing them
  silently.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "BIND",
    "BIND_CMD",
    "FEATURES",
    "FEATURE_CHANNELS",
    "HELLO",
    "HELLO_MAGIC",
    "MAX_ARG_LEN",
    "MAX_FDS_PER_MESSAGE",
    "PROTOCOL_VERSION",
    "REPLY_HEADER",
    "REQUEST_HEADER",
    "FramingError",
    "Hello",
    "Message",
    "Request",
    "close_fds",
    "decode_bind",
    "decode_hello",
    "decode_reply",
    "decode_request",
    "encode_bind",
    "encode_hello",
    "encode_reply",
    "encode_request",
    "fds_of",
    "parse_hello",
    "recv_message",
    "rights",
    "send_message",
]

#: ``L U O D`` read as a native little-endian u32.
HELLO_MAGIC = 0x444F554C
#: The major version: it changes only when a 1.0 client could no longer work.
PROTOCOL_VERSION = 1
#: magic, version, status (0 or -errno), features (1.0: reserved, 0).
HELLO = struct.Struct("<IIiI")
#: ``features`` bit: luod serves :data:`BIND_CMD` (revision 1.1).
FEATURE_CHANNELS = 1 << 0
#: Every feature this side implements; a successful hello announces them.
FEATURES = FEATURE_CHANNELS
#: The ``cmd`` of a BIND message. Its type byte (0x42) is not LUO's (0xBA),
#: so no ioctl number can take it, and a 1.0 luod answers it ``ENOTTY``.
BIND_CMD = 0x4201
#: A BIND message's argument: ``u32 size`` (8), ``u32 flags`` (0).
BIND = struct.Struct("<II")
#: cmd, arg_len.
REQUEST_HEADER = struct.Struct("<II")
#: ret (0 or -errno), out_len.
REPLY_HEADER = struct.Struct("<iI")
#: The largest argument accepted (the cap ``copy_struct_from_user`` suggests).
MAX_ARG_LEN = 65536
#: Linux refuses more than SCM_MAX_FD (253) fds in one SCM_RIGHTS message.
MAX_FDS_PER_MESSAGE = 253
#: The placeholder the daemon puts in an ``fd`` field it returns as SCM_RIGHTS.
FD_PLACEHOLDER = -1

_INT_SIZE = array.array("i").itemsize
#: struct ucred: pid, uid, gid.
_CREDS = struct.Struct("iII")

# The socket module's MSG_* are enum.IntFlag members: every ``|`` and ``&``
# on them runs enum code. These are computed once, as plain ints, for the
# calls every request makes.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_SCM_CREDENTIALS = int(socket.SCM_CREDENTIALS)
#: Ancillary space for the most fds one message may carry, and for creds.
_ANC_FDS = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * _INT_SIZE)
_ANC_CREDS = socket.CMSG_SPACE(_CREDS.size)


class FramingError(Exception):
    """A message that does not follow the framing; ``errno`` is the reply to give."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


# -- hello -------------------------------------------------------------------


class Hello(NamedTuple):
    """A decoded hello."""

    #: 0, or the negative errno that refused the open.
    status: int
    #: The features the daemon serves (``FEATURE_*``; 0 from a 1.0 daemon).
    features: int


def encode_hello(status: int = 0) -> bytes:
    """The daemon's first message on a device connection (status 0 or -errno).

    A refused open announces no features: the connection closes after it, and
    the refusal stays byte for byte what protocol 1.0 sends.
    """
    return HELLO.pack(HELLO_MAGIC, PROTOCOL_VERSION, status, FEATURES if status == 0 else 0)


def parse_hello(data: bytes) -> Hello:
    """Check a hello and return its status and features.

    Raises :class:`FramingError` (``EPROTO``) when the peer does not speak
    this protocol. Feature bits this side does not know are ignored: a
    later revision only adds what a client must ask for.
    """
    if len(data) != HELLO.size:
        raise FramingError(errno.EPROTO, f"hello of {len(data)} bytes, expected {HELLO.size}")
    magic, version, status, features = HELLO.unpack(data)
    if magic != HELLO_MAGIC:
        raise FramingError(errno.EPROTO, f"bad hello magic {magic:#x}")
    if version != PROTOCOL_VERSION:
        raise FramingError(errno.EPROTO, f"unsupported protocol version {version}")
    return Hello(int(status), int(features))


def decode_hello(data: bytes) -> int:
    """Check a hello and return its status (0 or a negative errno); see :func:`parse_hello`."""
    return parse_hello(data).status


# -- channels (1.1) ------------------------------------------------------------


def encode_bind(flags: int = 0) -> bytes:
    """A BIND message; one end of a fresh socketpair goes with it as ``SCM_RIGHTS``."""
    return encode_request(BIND_CMD, BIND.pack(BIND.size, flags))


def decode_bind(arg: bytes) -> None:
    """Check a BIND message's argument (the fd it carries is the caller's to check).

    Raises :class:`FramingError`: ``EFAULT`` when ``size`` claims more bytes
    than were sent, ``EINVAL`` for a ``size`` below the struct or flags set
    (none is defined yet).
    """
    if len(arg) < 4:
        raise FramingError(errno.EFAULT, f"BIND argument of {len(arg)} bytes")
    (size,) = struct.unpack_from("<I", arg)
    if size > len(arg):
        raise FramingError(errno.EFAULT, f"BIND size {size} but {len(arg)} bytes sent")
    if size < BIND.size:
        raise FramingError(errno.EINVAL, f"BIND size {size} below {BIND.size}")
    _size, flags = BIND.unpack_from(arg)
    if flags:
        raise FramingError(errno.EINVAL, f"unknown BIND flags {flags:#x}")


# -- requests and replies ---------------------------------------------------


class Request(NamedTuple):
    """A decoded request: the ioctl number and the caller's argument bytes.

    A named tuple rather than a frozen dataclass: one is made per call, and
    a tuple is made several times faster.
    """

    cmd: int
    arg: bytes


def encode_request(cmd: int, arg: bytes | bytearray | memoryview) -> bytes:
    """One request message: header then the argument bytes as the caller holds them."""
    return REQUEST_HEADER.pack(cmd & 0xFFFFFFFF, len(arg)) + bytes(arg)


def decode_request(data: bytes | bytearray | memoryview, length: int | None = None) -> Request:
    """Decode a request, applying the framing checks of ``wire.md`` in order.

    ``length`` is the true length of the message when ``data`` holds only a
    truncated prefix of it (a message longer than any valid request). A
    zero-length message is a close and must be handled before calling this.

    Raises :class:`FramingError` with ``EFAULT`` (short message, ``arg_len``
    not matching the bytes sent) or ``E2BIG`` (``arg_len`` over the cap).
    """
    total = len(data) if length is None else length
    if total < REQUEST_HEADER.size:
        raise FramingError(errno.EFAULT, f"request of {total} bytes is shorter than its header")
    cmd, arg_len = REQUEST_HEADER.unpack_from(data)
    if arg_len != total - REQUEST_HEADER.size:
        raise FramingError(
            errno.EFAULT,
            f"arg_len {arg_len} but {total - REQUEST_HEADER.size} argument bytes",
        )
    if arg_len > MAX_ARG_LEN:
        raise FramingError(errno.E2BIG, f"arg_len {arg_len} exceeds {MAX_ARG_LEN}")
    return Request(cmd, bytes(memoryview(data)[REQUEST_HEADER.size : total]))


def encode_reply(ret: int, out: bytes = b"") -> bytes:
    """One reply message: ``ret`` (0 or -errno), then the bytes written back."""
    return REPLY_HEADER.pack(ret, len(out)) + out


def decode_reply(data: bytes) -> tuple[int, bytes]:
    """Decode a reply into ``(ret, out)``; ``EPROTO`` when malformed."""
    if len(data) < REPLY_HEADER.size:
        raise FramingError(errno.EPROTO, f"reply of {len(data)} bytes")
    ret, out_len = REPLY_HEADER.unpack_from(data)
    if out_len != len(data) - REPLY_HEADER.size or (ret != 0 and out_len != 0):
        raise FramingError(errno.EPROTO, "reply length does not match its header")
    return int(ret), bytes(data[REPLY_HEADER.size :])


# -- sending and receiving with SCM_RIGHTS -----------------------------------


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds``, ignoring those already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """``fds`` as the ancillary data of one ``sendmsg``: one ``SCM_RIGHTS``
    record, or none for no fd."""
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def fds_of(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every ``SCM_RIGHTS`` record in ``recvmsg``'s ancillary data
    (a record cut short keeps its whole fds; any other record is ignored)."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % _INT_SIZE]))
    return fds


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one message with ``fds`` attached as a single ``SCM_RIGHTS`` record."""
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ValueError(f"at most {MAX_FDS_PER_MESSAGE} fds fit in one message")
    sock.sendmsg([data], rights(fds))


@dataclass(slots=True)
class Message:
    """One received message.

    Attributes:
        data: The bytes received (at most the buffer size asked for).
        length: The true length of the message; larger than ``len(data)`` when
            it did not fit (the rest was discarded by the kernel).
        fds: Close-on-exec fds received with it; the caller owns them.
        fds_truncated: ``MSG_CTRUNC``: fds were sent that did not fit and the
            kernel closed them.
        creds: The sender's ``(pid, uid, gid)`` when the socket has
            ``SO_PASSCRED`` set (the kernel attaches them to every message).
    """

    data: bytes
    length: int
    fds: list[int] = field(default_factory=list)
    fds_truncated: bool = False
    creds: tuple[int, int, int] | None = None

    @property
    def truncated(self) -> bool:
        return self.length > len(self.data)


def recv_message(
    sock: socket.socket,
    bufsize: int,
    maxfds: int = MAX_FDS_PER_MESSAGE,
    flags: int = 0,
    creds: bool = False,
    buffer: bytearray | None = None,
) -> Message:
    """Receive one message with ``recvmsg(MSG_CMSG_CLOEXEC | MSG_TRUNC)``.

    ``MSG_TRUNC`` makes the kernel report the message's true length even when
    it is longer than ``bufsize``, so an oversized request can be told apart
    from a lying header. Every fd received is returned (close-on-exec), even
    when the message is otherwise unusable, so the caller can close it.
    ``creds`` makes room for the sender's ``SCM_CREDENTIALS`` (the socket
    needs ``SO_PASSCRED``). ``buffer``, of ``bufsize`` bytes, is received
    into instead of a new one: a loop that receives one message at a time
    reuses one rather than allocating and zeroing ``bufsize`` bytes per
    message (the data returned is a copy).
    """
    if buffer is None:
        buffer = bytearray(bufsize)
    elif len(buffer) != bufsize:
        raise ValueError(f"a buffer of {len(buffer)} bytes given for {bufsize}")
    anc = _ANC_FDS if maxfds == MAX_FDS_PER_MESSAGE else socket.CMSG_SPACE(maxfds * _INT_SIZE)
    nbytes, ancdata, msg_flags, _addr = sock.recvmsg_into(
        [buffer],
        anc + _ANC_CREDS if creds else anc,
        flags | _RECV_FLAGS,
    )
    sender = None
    for level, kind, payload in ancdata:
        # SCM_RIGHTS records are fds_of's; anything else AF_UNIX may attach
        # (SCM_SECURITY...) is ignored.
        if level == _SOL_SOCKET and kind == _SCM_CREDENTIALS:
            sender = _CREDS.unpack_from(payload)
    return Message(
        bytes(memoryview(buffer)[: min(nbytes, bufsize)]),
        nbytes,
        fds_of(ancdata) if ancdata else [],
        bool(msg_flags & _MSG_CTRUNC),
        sender,
    )
