"""An endpoint: one socket luod serves, and what the kernel says about its peer.

Every connection of luod is an :class:`Endpoint`: a device connection
(accepted on the listening socket), luod's end of a session's socketpair, or
a *channel* of either (wire protocol 1.1): a private connection that one
caller bound to a shared device or session fd, so that its replies reach it
and no other process sharing that fd.
The transport (:mod:`liveupdate.server.transport`) serves them; the
ghost-hold watcher (:mod:`liveupdate.server.holds`) asks who holds their
client's end. Who the peer is comes from the kernel, fixed when it
connected (:func:`peer_owner`), never from anything the peer sends.
"""

from __future__ import annotations

import collections
import errno
import select
import socket
import struct
from dataclasses import dataclass, field

from liveupdate.core.luo import DeviceCall
from liveupdate.core.policy import Owner
from liveupdate.core.session import Session
from liveupdate.core.session_ops import SessionCall

__all__ = ["Endpoint", "hung_up", "peer_groups", "peer_owner"]

_CRED = struct.Struct("3i")
_HUNG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)
#: Linux's ``SO_PEERGROUPS`` (4.13), not in every Python's socket module.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups, as of its connect (``SO_PEERGROUPS``).

    Fixed at connect time like ``SO_PEERCRED``: unlike reading
    ``/proc/PID/status`` later, the peer cannot swap them in between.
    Unknown (an older kernel): none.
    """
    for size in (256 * 4, 65536 * 4):  # NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


def peer_owner(sock: socket.socket) -> Owner:
    """``SO_PEERCRED`` (and ``SO_PEERGROUPS``) of a connected Unix socket."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Owner(pid, uid, gid, peer_groups(sock))


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed its end (no waiting)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | _HUNG_UP)
    return any(ev & _HUNG_UP for _fd, ev in poller.poll(0))


@dataclass(eq=False)
class Endpoint:
    """One socket luod serves.

    Attributes:
        sock: The daemon's side, non-blocking.
        owner: The peer's credentials (for a session: its creator's).
        session: ``None`` for a device connection.
        pending: Replies not yet accepted by the peer's socket.
    """

    sock: socket.socket
    owner: Owner
    session: Session | None = None
    pending: collections.deque[tuple[bytes, int | None]] = field(default_factory=collections.deque)
    closed: bool = False
    #: Close after the pending replies without releasing the session.
    detach: bool = False
    #: Inode of the client's end (known for a session's socketpair, asked
    #: from the kernel for a device connection): who holds it tells a live
    #: client from a ghost (see :mod:`liveupdate.server.holds`).
    peer_inode: int | None = None
    #: Waiting for the peer's socket to take a reply (selected for writing).
    writing: bool = False
    #: The call context reused by every call on this endpoint (made at the
    #: first; the transport refreshes what changes per call).
    device_call: DeviceCall | None = None
    session_call: SessionCall | None = None
    #: The last ``SCM_CREDENTIALS`` seen on a session endpoint and the
    #: :class:`Owner` made of them, reused while they repeat.
    sender_creds: tuple[int, int, int] | None = None
    sender: Owner | None = None
    #: A control connection (:mod:`liveupdate.server.control`), not the device.
    control: bool = False
    #: For a channel: the endpoint it was bound to (whose close ends it too).
    main: Endpoint | None = None
    #: For a main endpoint: the channels bound to it, closed with it.
    channels: list[Endpoint] = field(default_factory=list)

    @property
    def kind(self) -> str:
        kind = "session" if self.session is not None else "control" if self.control else "device"
        return kind if self.main is None else kind + "-channel"
