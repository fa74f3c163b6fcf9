"""Who holds the device: the processes behind an ``EBUSY`` at open.

The device admits one opener at a time. When an open is refused, an
operator's first question is *who* has it; :func:`device_holders` answers it
with two system interfaces, read-only:

* for luod's socket, ``NETLINK_SOCK_DIAG`` dumps the established Unix
  sockets with their bound file and their peer: luod's ends of the
  connections accepted on the device socket share the listener's file, and
  their peers are the client ends (session fds are socketpairs, never
  accepted there, so every such connection is a device opener);
* ``/proc/PID/fd`` maps those peer inodes (or, for a kernel's character
  device, the device node itself) to processes.

A process of another user has an fd table this user cannot read: it is
counted in :attr:`Holders.unseen`, not named. Nothing here is needed to use
the device; any failure of these interfaces just means "not found".
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from liveupdate import sockdiag

__all__ = ["Holder", "Holders", "device_holders"]

_COMMAND_LENGTH = 120


@dataclass(frozen=True)
class Holder:
    """One process holding the device."""

    pid: int
    #: Its command line (``comm`` when it has none), shortened; "" if unreadable.
    command: str


@dataclass(frozen=True)
class Holders:
    """What :func:`device_holders` found."""

    #: The processes found holding the device, by pid.
    found: tuple[Holder, ...] = ()
    #: Holding ends found in no fd table this user may read (another user's
    #: process, or an fd in flight in a socket queue).
    unseen: int = 0

    def describe(self) -> str:
        """``held by pid 1234 (agent --serve)``, in words for a message."""
        parts = [f"pid {h.pid}" + (f" ({h.command})" if h.command else "") for h in self.found]
        if self.unseen:
            parts.append(
                "a process this user cannot see"
                if self.unseen == 1
                else f"{self.unseen} processes this user cannot see"
            )
        if not parts:
            return "held by a process that could not be found"
        return "held by " + ", ".join(parts)


def _kernel_dev(st_dev: int) -> int:
    """``st_dev`` as the kernel's internal ``dev_t`` (what sock_diag reports)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def _peers_of_listener(path: str) -> set[int]:
    """Inodes of the client ends of the connections accepted on the socket ``path``."""
    try:
        st = os.stat(path)
    except OSError:
        return set()
    bound = (st.st_ino, _kernel_dev(st.st_dev))
    established = sockdiag.unix_sockets(
        sockdiag.SHOW_VFS | sockdiag.SHOW_PEER, sockdiag.ESTABLISHED, timeout=2.0
    )
    return {s.peer for s in established if s.vfs == bound and s.peer}


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        raw = b""
    text = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    if not text:
        try:
            with open(f"/proc/{pid}/comm", errors="replace") as f:
                text = f.read()
        except OSError:
            return ""
    # One line, nothing a terminal would interpret: a message must stay one line.
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= _COMMAND_LENGTH else text[: _COMMAND_LENGTH - 3] + "..."


def _pids() -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return []


def device_holders(path: str) -> Holders:
    """The processes (other than this one) holding the device at ``path`` open.

    ``path`` is luod's device socket or a kernel's character device, as
    resolved by :func:`liveupdate.paths.resolve_device`.
    """
    try:
        st = os.stat(path)
    except OSError:
        return Holders()
    if stat.S_ISCHR(st.st_mode):
        wanted_links: set[str] = set()
        rdev = st.st_rdev
        peers: set[int] = set()
    else:
        rdev = -1
        peers = _peers_of_listener(path)
        wanted_links = {f"socket:[{peer}]" for peer in peers}
        if not peers:
            return Holders()
    found: dict[int, Holder] = {}
    seen: set[str] = set()
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or another user's: counted as unseen below
        for fd in fds:
            link = f"/proc/{pid}/fd/{fd}"
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target in wanted_links:
                seen.add(target)
            elif rdev >= 0 and target.startswith("/"):
                try:
                    held = os.stat(link)
                except OSError:
                    continue
                if not stat.S_ISCHR(held.st_mode) or held.st_rdev != rdev:
                    continue
            else:
                continue
            found.setdefault(pid, Holder(pid, _command(pid)))
    return Holders(tuple(found[pid] for pid in sorted(found)), len(wanted_links - seen))
