"""Who holds which socket: the census behind ghost-hold detection.

:mod:`liveupdate.server.holds` decides whether the client's end of one of
luod's connections is still held by a process; this module gathers the facts
it decides on, each with one system interface:

* :func:`take_census` walks ``/proc/PID/fd`` (and the table of any thread
  with its own) for ``socket:[INODE]`` links: which processes hold which
  sockets, and whether some fd tables could not be read (:class:`Census`);
* :func:`unix_peer_inode` asks the kernel (``NETLINK_SOCK_DIAG``) for the
  peer of an accepted Unix socket (the client's end of a device connection);
* :func:`inodes_in_queues` peeks into the receive queues of the sockets luod
  holds for fds in flight (``SCM_RIGHTS`` sent, not yet received).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from liveupdate import sockdiag, wire
from liveupdate.core.handlers.socket import borrowed
from liveupdate.events import event

__all__ = ["Census", "inodes_in_queues", "take_census", "unix_peer_inode"]

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
    for found in sockdiag.unix_sockets(sockdiag.SHOW_PEER, inode=inode, timeout=1.0):
        if found.inode == inode:
            return found.peer or None
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
                got = wire.fds_of(ancdata)
                fds.extend(got)
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


#: The inode of the initial pid namespace, fixed by the kernel
#: (``PROC_PID_INIT_INO`` in ``include/linux/proc_ns.h``).
_INIT_PID_NS_INO = 0xEFFFFFFC


def _blind_spot() -> str:
    """Why luod cannot see every process's fd table at all ("" if it can)."""
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return "/proc is not mounted for luod's pid namespace"
        # A /proc mounted for a child pid namespace (a container) shows only
        # that namespace, and NSpid there lists a single pid: only the
        # namespace's own identity tells that processes outside are invisible.
        if os.stat("/proc/self/ns/pid").st_ino != _INIT_PID_NS_INO:
            return "luod runs in a child pid namespace: processes outside it are invisible"
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
