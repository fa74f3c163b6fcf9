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

Handler data (:class:`liveupdate.handler_abi.SocketRecord`), little-endian::

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

from liveupdate.core.file import PreservedFile
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import SocketRecord, encode_address, format_address
from liveupdate.handler_abi.socket import ACCEPTED_SOCKETS as ACCEPTED

__all__ = ["ACCEPTED", "SocketHandler", "borrowed", "format_address", "read_socket"]

COMPATIBLE = SocketRecord.compatible


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


def read_socket(fd: int) -> SocketRecord:
    """What ``socket-v1`` records about the socket ``fd`` (never closing it)."""
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
    return SocketRecord(family, type_, proto, listening, st.st_ino, local, peer)


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


class SocketHandler(RecordHandler[SocketRecord]):
    """Preserves TCP/UDP (IPv4, IPv6) and Unix sockets by holding them open."""

    compatible = COMPATIBLE
    record = SocketRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        if not stat.S_ISSOCK(st.st_mode):
            return False
        try:
            with borrowed(fd) as sock:
                return _kind(sock) in ACCEPTED and not _talks_to_luod(sock)
        except OSError:
            return False

    def capture(self, file: PreservedFile) -> SocketRecord:
        return read_socket(file.fd)

    def check(self, file: PreservedFile, recorded: SocketRecord) -> None:
        st = os.fstat(file.fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EINVAL, "inherited fd is not a socket")
        if st.st_ino != recorded.inode:
            raise OSError(
                errno.EINVAL, f"inherited socket is inode {st.st_ino}, not {recorded.inode}"
            )
        with borrowed(file.fd) as sock:
            kind = _kind(sock)
        expected = (recorded.family, recorded.type, recorded.protocol)
        if kind != expected:
            raise OSError(errno.EINVAL, f"inherited socket is {kind}, not {expected}")
