"""Holds luod cannot see: connections kept open only by fds in flight.

luod learns that a client is gone when the client's end of a connection is
closed. An fd sent with ``SCM_RIGHTS`` and not yet received is not closed,
though: it lives in the receive queue of some socket, held by no process.
When that socket is one luod itself holds (a preserved socket), the cycle
never breaks by itself: the client's end of luod's own device connection (or
of a session) sits in a queue that luod keeps alive, so luod never sees the
hang-up. The device then answers ``EBUSY`` forever, a session outlives its
client and counts against the limits.

This module tells such a *ghost* from a real hold. The census walks
``/proc/PID/fd`` (and the table of any thread with its own) for
``socket:[INODE]`` links; an endpoint whose peer socket (the client's end)
no process holds is a suspect, and a ghost only when a census
:data:`GRACE` seconds later still finds no holder, so an fd merely
travelling through a legitimate hand-off is never taken for one, and the
peer is proven parked in a queue luod itself holds (:func:`inodes_in_queues`)
or, where allowed, no fd table was unreadable. The rules, and why, are in
:class:`HoldWatch` and ``docs/security.md``. What the transport does with a
ghost (close it, as the client would have) is the transport's business.

The peer of a session's socketpair is known (luod creates both ends); the
peer of an accepted device connection is asked from the kernel with
``NETLINK_SOCK_DIAG`` (:func:`unix_peer_inode`).
"""

from __future__ import annotations

import array
import enum
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from liveupdate.core.handlers.socket import borrowed
from liveupdate.server.logs import event

__all__ = [
    "GRACE",
    "Census",
    "HoldState",
    "HoldWatch",
    "Verdict",
    "inodes_in_queues",
    "take_census",
    "unix_peer_inode",
]

#: Seconds an endpoint's peer must stay in flight (seen so by two censuses
#: this far apart) before the endpoint counts as a ghost. A legitimate
#: hand-off (sendmsg, then the receiver's recvmsg) is far shorter.
GRACE = 1.0
#: A census younger than this is reused: a client hammering a busy device
#: costs luod one walk of /proc per this many seconds, not one per open.
CENSUS_REUSE = 0.25
#: How often "holds cannot be checked" is logged at most.
_UNKNOWN_WARN_EVERY = 60.0

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/unix_diag.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x01
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 0x04
_UNIX_DIAG_PEER = 2
_INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSGHDR = struct.Struct("=IHHII")
#: struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2].
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")
#: struct unix_diag_msg: family, type, state, pad, ino, cookie[2].
_UNIX_DIAG_MSG = struct.Struct("=BBBBI2I")
_RTATTR = struct.Struct("=HH")
_SOCKET_LINK = "socket:["
#: Linux's SO_PEEK_OFF (3.4), not in every Python's socket module.
_SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
#: Bounds of one walk of the queues luod holds: sockets walked, and peeks
#: per socket (a sender's queue is bounded by its send buffer, and the fds
#: in flight per user by its RLIMIT_NOFILE, far below both).
_MAX_SOCKETS = 1024
_MAX_PEEKS = 4096
_PEEK_BUF = 65536
_PEEK_ANCILLARY = socket.CMSG_SPACE(253 * 4)  # SCM_MAX_FD ints


def unix_peer_inode(inode: int) -> int | None:
    """The inode of the peer of the Unix socket ``inode``, from the kernel.

    An exact lookup (``NETLINK_SOCK_DIAG``, ``UDIAG_SHOW_PEER``) of one
    socket. ``None`` when unknown: no such socket, no peer, or sock_diag
    unavailable (``CONFIG_UNIX_DIAG`` off, or refused in a container).
    """
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    except OSError:
        return None
    with nl:
        req = _UNIX_DIAG_REQ.pack(
            socket.AF_UNIX,
            0,
            0,
            0xFFFFFFFF,  # every state
            inode,
            _UDIAG_SHOW_PEER,
            _INET_DIAG_NOCOOKIE,
            _INET_DIAG_NOCOOKIE,
        )
        hdr = _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
        try:
            nl.settimeout(1.0)  # the kernel answers at once; never hang luod
            nl.sendto(hdr + req, (0, 0))
            data = nl.recv(8192)
        except OSError:
            return None
    return _parse_peer(data, inode)


def _parse_peer(data: bytes, inode: int) -> int | None:
    if len(data) < _NLMSGHDR.size + _UNIX_DIAG_MSG.size:
        return None
    length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data)
    if kind == _NLMSG_ERROR or length > len(data):
        return None
    msg = _UNIX_DIAG_MSG.unpack_from(data, _NLMSGHDR.size)
    if msg[4] != inode:
        return None
    offset = _NLMSGHDR.size + _UNIX_DIAG_MSG.size
    while offset + _RTATTR.size <= length:
        alen, atype = _RTATTR.unpack_from(data, offset)
        if alen < _RTATTR.size:
            return None
        if atype == _UNIX_DIAG_PEER and alen >= _RTATTR.size + 4:
            (peer,) = struct.unpack_from("=I", data, offset + _RTATTR.size)
            return int(peer) or None
        offset += (alen + 3) & ~3
    return None


def _peek_queue(fd: int) -> list[int]:
    """The fds in flight in the receive queue of the Unix socket ``fd``.

    Walks the queue with ``MSG_PEEK`` from offset 0 (``SO_PEEK_OFF``, put
    back afterwards): nothing is dequeued. Each fd returned is a new
    reference the caller must close. Not a Unix socket, or listening: none.
    """
    fds: list[int] = []
    with borrowed(fd) as sock:
        try:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) != socket.AF_UNIX:
                return fds
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return fds  # a listener's queue holds connections, not messages
            old = sock.getsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF)
            sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, 0)
        except OSError:
            return fds
        try:
            for _ in range(_MAX_PEEKS):
                try:
                    data, ancdata, _flags, _addr = sock.recvmsg(
                        _PEEK_BUF,
                        _PEEK_ANCILLARY,
                        socket.MSG_PEEK | socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC,
                    )
                except OSError:
                    break  # EAGAIN: the end of the queue
                got = 0
                for level, kind, raw in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        ints = array.array("i")
                        ints.frombytes(raw[: len(raw) - len(raw) % ints.itemsize])
                        fds.extend(ints)
                        got += len(ints)
                if not data and not got:
                    break  # an orderly shutdown of a stream peer
        finally:
            try:
                sock.setsockopt(socket.SOL_SOCKET, _SO_PEEK_OFF, old)
            except OSError:
                pass
    return fds


def inodes_in_queues(roots: Iterable[int]) -> set[int]:
    """Inodes of the files in flight in the queues of the sockets ``roots``.

    ``roots`` are luod's own fds (never closed here). A Unix socket found in
    flight is walked in turn, so a file parked two hops away (in a socket
    that is itself in a queue luod holds) is found too. Bounded by
    :data:`_MAX_SOCKETS`. A listener's pending connections cannot be looked
    into without accepting them: what hides there is not found.
    """
    found: set[int] = set()
    walked: set[tuple[int, int]] = set()
    todo: list[tuple[int, bool]] = [(fd, False) for fd in roots]
    try:
        while todo:
            fd, owned = todo.pop()
            try:
                st = os.fstat(fd)
                if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) in walked:
                    continue
                if len(walked) >= _MAX_SOCKETS:
                    event("holds-walk-bounded", logging.WARNING, sockets=len(walked))
                    break
                walked.add((st.st_dev, st.st_ino))
                for inflight in _peek_queue(fd):
                    try:
                        inner = os.fstat(inflight)
                    except OSError:
                        inner = None
                    if inner is not None:
                        found.add(inner.st_ino)
                    if inner is not None and stat.S_ISSOCK(inner.st_mode) and len(todo) < 256:
                        todo.append((inflight, True))
                    else:
                        os.close(inflight)
            finally:
                if owned:
                    os.close(fd)
    finally:
        for fd, owned in todo:
            if owned:
                os.close(fd)
    return found


@dataclass(frozen=True)
class Census:
    """Which processes hold which sockets in their fd tables, at one moment.

    Attributes:
        taken: ``time.monotonic()`` when the census started.
        holders: Socket inode -> pids of the processes holding it.
        blind: Why the census cannot be trusted at all ("" when it can).
        unseen: Why some fd tables could not be read ("" when all were):
            a holder may hide there.
    """

    taken: float
    holders: dict[int, frozenset[int]] = field(default_factory=dict)
    blind: str = ""
    unseen: str = ""


def _blind_spot() -> str:
    """Why luod cannot see every process's fd table at all ("" if it can)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return "/proc is not mounted for luod's pid namespace"
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("NSpid:") and len(line.split()) > 2:
                    return "luod runs in a child pid namespace: processes outside it are invisible"
        if os.geteuid() != 0:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and fields[4] == "/proc":
                        hidden = {o for o in fields[-1].split(",") if o.startswith("hidepid=")}
                        if hidden - {"hidepid=0", "hidepid=off"}:
                            return "/proc hides other users' processes (hidepid)"
    except OSError as exc:
        return f"cannot read /proc: {exc.strerror}"
    return ""


def _read_links(fd_dir: str, holders: dict[int, set[int]], pid: int) -> str:
    """Record every socket in ``fd_dir``; why some link could not be read, or ""."""
    try:
        names = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return ""  # the task exited meanwhile: it holds nothing any more
    except OSError as exc:
        return f"{fd_dir}: {exc.strerror}"
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        except OSError as exc:
            return f"{fd_dir}: {exc.strerror}"
        if link.startswith(_SOCKET_LINK) and link.endswith("]"):
            holders.setdefault(int(link[len(_SOCKET_LINK) : -1]), set()).add(pid)
    return ""


def take_census(proc: str = "/proc") -> Census:
    """Walk every task's fd table; see :class:`Census`.

    Threads normally share their process's table; one that does not
    (``unshare(CLONE_FILES)``) is walked too when its fd numbers differ.
    """
    taken = time.monotonic()
    blind = _blind_spot()
    if blind:
        return Census(taken, blind=blind)
    holders: dict[int, set[int]] = {}
    unseen: list[str] = []
    try:
        entries = os.listdir(proc)
    except OSError as exc:
        return Census(taken, blind=f"cannot list {proc}: {exc.strerror}")
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        leader = f"{proc}/{entry}/fd"
        why = _read_links(leader, holders, pid)
        if why:
            unseen.append(why)
            continue
        try:
            tasks = os.listdir(f"{proc}/{entry}/task")
            leader_fds = set(os.listdir(leader))
        except OSError:
            continue  # exited meanwhile
        for tid in tasks:
            task_fd = f"{proc}/{entry}/task/{tid}/fd"
            try:
                if tid == entry or set(os.listdir(task_fd)) == leader_fds:
                    continue
            except OSError:
                continue
            why = _read_links(task_fd, holders, pid)
            if why:
                unseen.append(why)
    summary = ""
    if unseen:
        summary = unseen[0] + (f" (and {len(unseen) - 1} more)" if len(unseen) > 1 else "")
    return Census(taken, {ino: frozenset(pids) for ino, pids in holders.items()}, unseen=summary)


class HoldState(enum.Enum):
    """What holds the client's end of one of luod's endpoints."""

    #: One or more processes have it in their fd table.
    HELD = "held"
    #: No process luod can see holds it; not (yet) proven a ghost.
    IN_FLIGHT = "in-flight"
    #: A ghost: see :meth:`HoldWatch.verdict`.
    GHOST = "ghost"
    #: Cannot tell (peer unknown, or /proc cannot be trusted).
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Verdict:
    state: HoldState
    holders: frozenset[int] = frozenset()
    why: str = ""

    def describe(self) -> str:
        """``pid,pid`` for a held endpoint, else the state's name."""
        if self.state == HoldState.HELD:
            return ",".join(str(pid) for pid in sorted(self.holders))
        return str(self.state.value)


K = TypeVar("K")


class HoldWatch(Generic[K]):
    """Tells ghosts from holds for endpoints keyed by ``K``.

    An endpoint whose peer no visible process holds becomes a *suspect*,
    remembered with the time of that census. It is a ghost when a census at
    least :data:`GRACE` seconds later still finds no holder, and either

    * the peer sits in a queue luod itself holds (``queued``): luod keeps
      it alive, a cycle nobody else can break, whatever hides in fd tables
      luod could not read; or
    * every fd table could be read and ``strict`` is false: nobody can
      ever use that end except by receiving it from wherever it is parked.

    :meth:`due` says when the earliest suspect can be confirmed, so the
    event loop can look again by itself.

    Args:
        queued: Inodes of the files in flight in the queues luod holds
            (:func:`inodes_in_queues` over luod's fds); asked only when a
            suspect's grace is over.
        grace: See :data:`GRACE`.
        reuse: See :data:`CENSUS_REUSE`.
        census: Takes a census.
        clock: ``time.monotonic`` or a stand-in.
    """

    def __init__(
        self,
        queued: Callable[[], set[int]],
        grace: float = GRACE,
        reuse: float = CENSUS_REUSE,
        census: Callable[[], Census] = take_census,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace = grace
        self.reuse = reuse
        self._queued = queued
        self._take = census
        self._clock = clock
        self._last: Census | None = None
        self._last_queued: tuple[float, set[int]] | None = None
        self._suspects: dict[K, float] = {}
        self._warned = -_UNKNOWN_WARN_EVERY

    def census(self, force: bool = False, not_before: float | None = None) -> Census:
        """The latest census, taken anew when older than ``reuse`` seconds,
        when ``force``d, or when older than ``not_before`` (if that has passed).
        """
        now = self._clock()
        last = self._last
        if (
            force
            or last is None
            or now - last.taken >= self.reuse
            or (not_before is not None and last.taken < not_before <= now)
        ):
            last = self._last = self._take()
            event(
                "holds-census",
                logging.DEBUG,
                sockets=len(last.holders),
                blind=last.blind or None,
                unseen=last.unseen or None,
            )
            if (last.blind or last.unseen) and now - self._warned >= _UNKNOWN_WARN_EVERY:
                self._warned = now
                event("holds-partly-unseen", logging.WARNING, reason=last.blind or last.unseen)
        return last

    def _in_luods_queues(self, census: Census, inode: int) -> bool:
        cached = self._last_queued
        if cached is None or cached[0] != census.taken:
            cached = self._last_queued = (census.taken, self._queued())
        return inode in cached[1]

    def verdict(
        self, key: K, peer_inode: int | None, *, strict: bool, force: bool = False
    ) -> Verdict:
        """Who holds ``peer_inode``, the client's end of ``key``.

        ``strict``: a ghost needs the cycle proof (the peer in one of luod's
        queues) even when every fd table was read; for endpoints whose close
        loses something (a session's files).
        """
        first = self._suspects.get(key)
        census = self.census(force, None if first is None else first + self.grace)
        if census.blind or peer_inode is None:
            self._suspects.pop(key, None)
            return Verdict(HoldState.UNKNOWN, why=census.blind or "the peer socket is unknown")
        pids = census.holders.get(peer_inode)
        if pids:
            self._suspects.pop(key, None)
            return Verdict(HoldState.HELD, pids)
        if first is None:
            self._suspects[key] = census.taken
            return Verdict(HoldState.IN_FLIGHT, why=census.unseen)
        if census.taken - first < self.grace:
            return Verdict(HoldState.IN_FLIGHT, why=census.unseen)
        # Two looks a grace apart: it was not merely passing through.
        if self._in_luods_queues(census, peer_inode):
            return Verdict(HoldState.GHOST, why="parked in a socket queue luod holds")
        if not strict and not census.unseen:
            return Verdict(HoldState.GHOST, why="held by no process")
        # Parked where a process may still receive it: not ours to break.
        self._suspects.pop(key, None)
        return Verdict(
            HoldState.IN_FLIGHT,
            why=census.unseen or "parked in a queue luod does not hold",
        )

    def suspects(self) -> list[K]:
        return list(self._suspects)

    def forget(self, key: K) -> None:
        """``key`` is closed: nothing to confirm any more."""
        self._suspects.pop(key, None)

    def keep_only(self, keep: Iterable[K]) -> None:
        """Forget every suspect not in ``keep`` (closed meanwhile)."""
        alive = set(keep)
        for key in [k for k in self._suspects if k not in alive]:
            del self._suspects[key]

    def due(self) -> float | None:
        """Seconds until the earliest suspect can be confirmed (``None``: none)."""
        if not self._suspects:
            return None
        return max(0.0, min(self._suspects.values()) + self.grace - self._clock())
