"""The socket handler (``socket-v1``): TCP, UDP and Unix sockets.

Accepted: TCP and UDP over IPv4 and IPv6 (``SOCK_STREAM``/``IPPROTO_TCP``,
``SOCK_DGRAM``/``IPPROTO_UDP``), and Unix stream, datagram and seqpacket
sockets; listening, connected, bound or not. Anything else on a socket
(raw, packet, netlink, SCTP, MPTCP, ICMP "ping" sockets...) is left to other
handlers, hence ``ENOENT`` by default.

Like every luod handler it preserves the open socket itself: luod holds a
reference, inherited across the re-exec, so a listening socket keeps its
backlog, a connected one its peer and queued bytes. The data captured at
freeze describes the socket for inspection and lets the next generation check
that the inherited fd is still the same kind of socket.

Handler data, little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     flags: 0x01 listening (SO_ACCEPTCONN), 0x02 peer present
    2       2     family (AF_INET 2, AF_INET6 10, AF_UNIX 1)
    4       2     type (SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5)
    6       2     protocol (IPPROTO_TCP 6, IPPROTO_UDP 17; 0 for Unix)
    8       8     inode of the socket (sockfs st_ino)
    16      2+L   local address: u16 length L, then L bytes
    ..      2+P   peer address, only when flag 0x02: u16 length P, then P bytes

An address is, by family:

* ``AF_INET``: ``u16 port``, then the 4 address bytes (6 bytes);
* ``AF_INET6``: ``u16 port, u32 flowinfo, u32 scope_id``, then the 16
  address bytes (26 bytes);
* ``AF_UNIX``: the ``sun_path`` bytes as the kernel reports them: a path
  (no trailing NUL), an abstract name (starting with a NUL byte), or nothing
  for an unnamed socket (``socketpair``, unbound).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    describe_record,
    pack_bytes,
    unpack_bytes,
)

__all__ = ["SocketHandler", "SocketInfo", "borrowed"]

COMPATIBLE = "socket-v1"
LISTENING = 0x01
HAS_PEER = 0x02

_HEADER = struct.Struct("<BBHHHQ")
_INET = struct.Struct("<H")
_INET6 = struct.Struct("<HII")

_FAMILIES: dict[int, str] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
}
_TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
}

#: (family, type, protocol) -> short name, for every kind this handler takes.
ACCEPTED: dict[tuple[int, int, int], str] = {
    (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP): "tcp",
    (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP): "tcp6",
    (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP): "udp",
    (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP): "udp6",
    (socket.AF_UNIX, socket.SOCK_STREAM, 0): "unix-stream",
    (socket.AF_UNIX, socket.SOCK_DGRAM, 0): "unix-dgram",
    (socket.AF_UNIX, socket.SOCK_SEQPACKET, 0): "unix-seqpacket",
}


@contextmanager
def borrowed(fd: int) -> Iterator[socket.socket]:
    """A :class:`socket.socket` on ``fd`` that never closes it.

    The object is detached on exit, whatever happens: ``fd`` is luod's own
    reference to a preserved file and must outlive it. (Python does not close
    ``fd`` either when the constructor fails, e.g. ``ENOTSOCK``.)

    Python makes a new socket object non-blocking when a process-wide default
    timeout is set (``socket.setdefaulttimeout``); the open file's flags are
    shared with the client, so they are put back at once.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    sock = socket.socket(fileno=fd)
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) != flags:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        yield sock
    finally:
        sock.detach()


def _kind(sock: socket.socket) -> tuple[int, int, int]:
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL),
    )


def encode_address(family: int, addr: Any) -> bytes:
    """The ``socket-v1`` bytes of an address as Python's ``getsockname`` returns it."""
    if family == socket.AF_INET:
        host, port = addr
        return _INET.pack(port) + socket.inet_pton(socket.AF_INET, host)
    if family == socket.AF_INET6:
        host, port, flowinfo, scope_id = addr
        # Python may append "%scope" to a link-local host; the id is kept apart.
        host = host.partition("%")[0]
        return _INET6.pack(port, flowinfo, scope_id) + socket.inet_pton(socket.AF_INET6, host)
    if family == socket.AF_UNIX:
        return addr if isinstance(addr, bytes) else os.fsencode(addr)
    raise ValueError(f"address family {family} is not supported by {COMPATIBLE}")


def format_address(family: int, raw: bytes) -> str:
    """A readable form of ``socket-v1`` address bytes.

    ``1.2.3.4:80``, ``[::1]:80`` (``[fe80::1%2]:80`` with a scope), a Unix
    path, ``@name`` for an abstract name (NUL bytes shown as ``\\x00``), and
    ``""`` for an unnamed Unix socket.
    """
    if family == socket.AF_INET:
        if len(raw) != _INET.size + 4:
            raise ValueError(f"AF_INET address of {len(raw)} bytes")
        (port,) = _INET.unpack_from(raw)
        return f"{socket.inet_ntop(socket.AF_INET, raw[_INET.size :])}:{port}"
    if family == socket.AF_INET6:
        if len(raw) != _INET6.size + 16:
            raise ValueError(f"AF_INET6 address of {len(raw)} bytes")
        port, _flowinfo, scope_id = _INET6.unpack_from(raw)
        host = socket.inet_ntop(socket.AF_INET6, raw[_INET6.size :])
        scope = f"%{scope_id}" if scope_id else ""
        return f"[{host}{scope}]:{port}"
    if family == socket.AF_UNIX:
        if raw[:1] == b"\0":
            name = raw[1:].decode("utf-8", "backslashreplace").replace("\0", "\\x00")
            return "@" + name
        return raw.decode("utf-8", "backslashreplace")
    raise ValueError(f"address family {family} is not supported by {COMPATIBLE}")


@dataclass(frozen=True)
class SocketInfo:
    """What ``socket-v1`` records about a socket."""

    family: int
    type: int
    protocol: int
    listening: bool
    inode: int
    local: bytes
    peer: bytes | None

    @classmethod
    def of(cls, fd: int) -> SocketInfo:
        """Read the socket behind ``fd`` (never closing it)."""
        st = os.fstat(fd)
        with borrowed(fd) as sock:
            family, type_, proto = _kind(sock)
            listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            local = encode_address(family, sock.getsockname())
            try:
                peer: bytes | None = encode_address(family, sock.getpeername())
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    raise
                peer = None
        return cls(family, type_, proto, listening, st.st_ino, local, peer)

    def encode(self) -> bytes:
        flags = (LISTENING if self.listening else 0) | (HAS_PEER if self.peer is not None else 0)
        header = _HEADER.pack(
            FORMAT_VERSION, flags, self.family, self.type, self.protocol, self.inode
        )
        data = header + pack_bytes(self.local)
        if self.peer is not None:
            data += pack_bytes(self.peer)
        return data

    @classmethod
    def decode(cls, data: bytes) -> SocketInfo:
        """Parse ``socket-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _HEADER.size, COMPATIBLE)
        _version, flags, family, type_, proto, inode = _HEADER.unpack_from(data)
        if flags & ~(LISTENING | HAS_PEER):
            raise ValueError(f"{COMPATIBLE} data has unknown flags {flags:#x}")
        local, offset = unpack_bytes(data, _HEADER.size)
        peer: bytes | None = None
        if flags & HAS_PEER:
            peer, offset = unpack_bytes(data, offset)
        if offset != len(data):
            raise ValueError(f"{COMPATIBLE} data has {len(data) - offset} trailing bytes")
        return cls(family, type_, proto, bool(flags & LISTENING), inode, local, peer)

    @property
    def kind(self) -> str:
        """``tcp``, ``udp6``, ``unix-seqpacket``... (numbers for an unknown kind)."""
        return ACCEPTED.get(
            (self.family, self.type, self.protocol),
            f"{self.family}/{self.type}/{self.protocol}",
        )

    def to_dict(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "type": "socket",
            "socket": self.kind,
            "family": _FAMILIES.get(self.family, str(self.family)),
            "socktype": _TYPES.get(self.type, str(self.type)),
            "protocol": self.protocol,
            "listening": self.listening,
            "inode": self.inode,
            "address": format_address(self.family, self.local),
        }
        if self.peer is not None:
            desc["peer"] = format_address(self.family, self.peer)
        return desc


def _talks_to_luod(sock: socket.socket) -> bool:
    """A Unix socket whose peer is this very process: a device or session fd of luod.

    Preserving one would make luod hold its own client's end, so it could
    never see that end close: the device would stay busy and the session
    alive forever.
    """
    if sock.family != socket.AF_UNIX:
        return False
    try:
        # A listening socket's "peer" credentials are its own owner's.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    return int(struct.unpack("3i", creds)[0]) == os.getpid()


class SocketHandler(FileHandler):
    """Preserves TCP/UDP (IPv4, IPv6) and Unix sockets by holding them open."""

    compatible = COMPATIBLE

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        if not stat.S_ISSOCK(st.st_mode):
            return False
        try:
            with borrowed(fd) as sock:
                return _kind(sock) in ACCEPTED and not _talks_to_luod(sock)
        except OSError:
            return False

    def freeze(self, file: PreservedFile) -> bytes:
        try:
            return SocketInfo.of(file.fd).encode()
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None

    def restore(self, file: PreservedFile) -> None:
        info = decode_record(SocketInfo, file.data)
        st = os.fstat(file.fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, "inherited fd is not a socket")
        if st.st_ino != info.inode:
            raise OSError(errno.EINVAL, f"inherited socket is inode {st.st_ino}, not {info.inode}")
        with borrowed(file.fd) as sock:
            kind = _kind(sock)
        if kind != (info.family, info.type, info.protocol):
            raise OSError(
                errno.EINVAL,
                f"inherited socket is {kind}, not {(info.family, info.type, info.protocol)}",
            )

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        return describe_record(SocketInfo, file.fd, file.data, "socket")

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``socket-v1`` data (for ``luoctl inspect``)."""
        info = SocketInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict()}
