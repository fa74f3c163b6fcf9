"""Asking the kernel about Unix sockets: ``NETLINK_SOCK_DIAG`` (``unix_diag``).

Two questions are asked of it, read-only: who is the peer of one socket
(luod, for the client end of a connection it accepted), and which
established sockets are bound to which file and connected to which peer
(``luoctl``, for who holds the device). Both go through :func:`unix_sockets`:
one request, then the replies parsed into :class:`UnixSocket` records.

Any failure of the interface (no ``CONFIG_UNIX_DIAG``, refused in a
container, a reply that does not parse) yields fewer records, never an
exception: the callers treat "not found" as an answer.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

__all__ = ["ALL_STATES", "ESTABLISHED", "SHOW_PEER", "SHOW_VFS", "UnixSocket", "unix_sockets"]

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/unix_diag.h>
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x01
_NLM_F_DUMP = 0x300
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
#: ``unix_diag_req.udiag_show`` bits.
SHOW_VFS = 0x02
SHOW_PEER = 0x04
_UNIX_DIAG_VFS = 1
_UNIX_DIAG_PEER = 2
#: ``unix_diag_req.udiag_states``: established sockets (``1 << TCP_ESTABLISHED``), or all.
ESTABLISHED = 1 << 1
ALL_STATES = 0xFFFFFFFF
_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
#: struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2].
_REQUEST = struct.Struct("=BBHIII2I")
#: struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
_MESSAGE = struct.Struct("=BBBBI2I")
_RTATTR = struct.Struct("=HH")
#: struct unix_diag_vfs: inode and device of the bound socket file.
_VFS = struct.Struct("=II")
_PEER = struct.Struct("=I")
#: Bounds: a dump of a busy host's Unix sockets is a few MiB at most.
_MAX_DUMP_BYTES = 64 << 20


class UnixSocket(NamedTuple):
    """One socket the kernel described."""

    inode: int
    #: ``(inode, kernel dev_t)`` of the file it is bound to (``SHOW_VFS``), or ``None``.
    vfs: tuple[int, int] | None
    #: The inode of its peer (``SHOW_PEER``); 0: none.
    peer: int


def unix_sockets(
    show: int, states: int = ALL_STATES, inode: int = 0, timeout: float = 1.0
) -> list[UnixSocket]:
    """The Unix sockets of this network namespace in ``states``, or the one
    socket ``inode`` (an exact lookup); ``show`` says what to describe.

    Never blocks longer than ``timeout``: the kernel answers at once.
    """
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
    except OSError:
        return []
    dump = inode == 0
    found: list[UnixSocket] = []
    with nl:
        req = _REQUEST.pack(socket.AF_UNIX, 0, 0, states, inode, show, _NOCOOKIE, _NOCOOKIE)
        flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else 0)
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), _SOCK_DIAG_BY_FAMILY, flags, 1, 0)
        try:
            nl.settimeout(timeout)
            nl.sendto(hdr + req, (0, 0))
            total = 0
            while total < _MAX_DUMP_BYTES:
                data = nl.recv(1 << 16)
                total += len(data)
                # An exact lookup is answered with one message and no DONE.
                if _parse(data, found) or not data or not dump:
                    break
        except OSError:
            pass
    return found


def _parse(data: bytes, found: list[UnixSocket]) -> bool:
    """Append the sockets of one datagram of replies; True at their end."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            return True  # malformed: stop rather than guess
        if kind in (_NLMSG_DONE, _NLMSG_ERROR):
            return True
        body = offset + _NLMSGHDR.size
        if length >= _NLMSGHDR.size + _MESSAGE.size:
            inode = _MESSAGE.unpack_from(data, body)[4]
            vfs: tuple[int, int] | None = None
            peer = 0
            attr = body + _MESSAGE.size
            end = offset + length
            while attr + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, attr)
                if alen < _RTATTR.size or attr + alen > end:
                    break
                payload = attr + _RTATTR.size
                if atype == _UNIX_DIAG_VFS and alen >= _RTATTR.size + _VFS.size:
                    vfs = _VFS.unpack_from(data, payload)
                elif atype == _UNIX_DIAG_PEER and alen >= _RTATTR.size + _PEER.size:
                    (peer,) = _PEER.unpack_from(data, payload)
                attr += (alen + 3) & ~3
            found.append(UnixSocket(inode, vfs, peer))
        offset += (length + 3) & ~3
    return False
