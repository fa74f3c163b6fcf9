"""Who may do what, and how much luod holds for whom.

The kernel has no counterpart: ``/dev/liveupdate`` is root's alone, so
``kernel/liveupdate/`` never asks who is calling. luod serves every user of a
machine, so the checks the kernel leaves to file permissions live here, in
one place (``docs/security.md`` is the policy in prose):

* :class:`Owner`, the credentials of a caller (``SO_PEERCRED``), kept with
  every session it creates;
* :func:`may_access` (a session's owner and root only), :func:`is_privileged`
  (who drives the state machine) and :func:`quota_exempt`;
* :class:`Limits` and :class:`Usage`, the global limits and per-uid quotas;
* :func:`check_fd_reserve`, the fds luod keeps free for its own work, and
  :class:`FdBudget`, what a preserved file costs in fds once the crash copies
  are kept (two: one in luod, one in the copies) and how many the copies hold.

Pure policy: nothing here holds state; the session set measures the usage
it checks against these limits.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from dataclasses import dataclass

from liveupdate import uapi
from liveupdate.events import event

__all__ = [
    "FdBudget",
    "Limits",
    "Owner",
    "Usage",
    "check_fd_reserve",
    "fd_reserve",
    "fds_open",
    "is_privileged",
    "may_access",
    "quota_exempt",
]

#: One MiB, for the defaults below.
_MIB = 1 << 20

#: A held fd costs luod an fd: counting its table exactly is costly (a
#: directory listing), so it is only done once this close to the limit.
_FD_COUNT_MARGIN = 256


@dataclass(frozen=True)
class Owner:
    """Credentials of a caller (``SO_PEERCRED``); a session keeps its creator's.

    ``groups``: the peer's supplementary groups when the transport knows them
    (``SO_PEERGROUPS``, taken at connect time like the rest); not kept in
    the handover image.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Limits:
    """Configurable limits and the access policy (``docs/security.md``).

    Every preserved file and session costs luod an fd. The ``*_per_uid``
    quotas bound what one uid can make luod hold (outgoing sessions and
    unfinished incoming ones, with their files), so that one user cannot
    starve the others; 0 disables a quota. uid 0 and luod's own uid are
    exempt: they can stop luod anyway. ``fd_reserve`` fds of luod's table
    are kept free for its own work (a reboot needs some), whoever asks.
    """

    max_sessions: int = 4096
    max_files: int = 1024
    max_sessions_per_uid: int = 1024
    max_files_per_uid: int = 4096
    #: Bytes of memfd (size at preserve time) one uid may have preserved.
    max_memfd_bytes_per_uid: int = 4096 * _MIB
    fd_reserve: int = 64
    #: Members of this group (primary or supplementary) may drive the state
    #: machine like root; ``None``: root and luod's own uid only.
    admin_gid: int | None = None
    #: Participants registered at once (REGISTER_PARTICIPANT answers ENOMEM beyond).
    max_participants: int = 64
    #: How long luod waits for a participant's answer to one event, in ms.
    participant_timeout_ms: int = uapi.LUOD_PARTICIPANT_TIMEOUT_MS


@dataclass
class Usage:
    """What luod holds for one uid (the quotas' measure)."""

    sessions: int = 0
    files: int = 0
    memfd_bytes: int = 0


def may_access(owner: Owner, caller: Owner | None) -> bool:
    """Whether ``caller`` may use a session ``owner`` created: root and the
    owner's uid may, nobody else.

    An unknown caller (no credentials came with the call) is refused: the
    check fails closed.
    """
    return caller is not None and (caller.uid == 0 or caller.uid == owner.uid)


def is_privileged(owner: Owner, limits: Limits) -> bool:
    """Who may drive the state machine: uid 0, luod's own uid, the admin group."""
    if owner.uid in (0, os.geteuid()):
        return True
    gid = limits.admin_gid
    return gid is not None and (owner.gid == gid or gid in owner.groups)


def quota_exempt(owner: Owner) -> bool:
    """uid 0 and luod's own uid are not held to the per-uid quotas."""
    return owner.uid in (0, os.geteuid())


def fd_reserve(limits: Limits, soft: int) -> int:
    """The fds of a table of ``soft`` kept free: ``limits.fd_reserve``, at most
    a quarter of the table, so that a tiny ``RLIMIT_NOFILE`` stays usable."""
    if soft == resource.RLIM_INFINITY:
        return limits.fd_reserve
    return max(0, min(limits.fd_reserve, soft // 4))


def fds_open() -> int:
    """The fds this process has open now (a directory listing: not for a hot path)."""
    return len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd


def check_fd_reserve(limits: Limits, held: int) -> None:
    """``EMFILE`` when holding one more fd would eat into luod's reserve.

    ``held``: an estimate of the fds luod holds for its callers (one per
    session and per file). The reserve keeps a reboot (image, pre-flight
    pipes, exec) and the operator's own device connection possible however
    much is held.
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return
    reserve = fd_reserve(limits, soft)
    if reserve <= 0:
        return
    if held + reserve + _FD_COUNT_MARGIN < soft:
        return
    in_use = fds_open()
    if in_use + reserve >= soft:
        raise OSError(
            errno.EMFILE,
            f"luod holds {in_use} fds of {soft}; the last {reserve} are kept for "
            "its own work (a reboot)",
        )


@dataclass
class FdBudget:
    """What one preserved file costs in fds, and how many files the crash copies hold.

    With the copies on, every preserved file is held twice: by luod, and by
    the keeper or systemd's fd store (``docs/concepts/crash-safety.md``).
    luod's own table is bounded by :func:`check_fd_reserve`; the copies' by
    ``copy_capacity``: the files the keeper's ``RLIMIT_NOFILE`` (less the same
    reserve) or ``FileDescriptorStoreMax=`` (less the two state slots) can
    take. A file beyond it would be held by luod alone and lost by a crash
    without a word, so PRESERVE_FD refuses it (``ENOSPC``), whoever asks.

    The daemon sets it once its copies are open; every generation of one
    daemon shares it (it travels in the orchestrator's hooks).
    """

    #: Where the copies are kept (:class:`~liveupdate.uapi.LuodCopies`).
    copies: uapi.LuodCopies = uapi.LuodCopies.OFF
    #: Files the copies can hold; ``None``: bounded by luod's own table only.
    copy_capacity: int | None = None
    #: What the copies are called in an error message (the option to raise).
    capacity_source: str = ""
    #: Refusing now: said once (``copies-full``) until a file goes again.
    full: bool = False

    @property
    def fds_per_file(self) -> int:
        """1 without copies, 2 with them (one fd in luod, one in the copies)."""
        return 1 if self.copies == uapi.LuodCopies.OFF else 2

    def check_copy_room(self, files_held: int) -> None:
        """``ENOSPC`` when the copies cannot take one more file than ``files_held``
        (said once in the log, ``copies-full``, until a file goes again)."""
        capacity = self.copy_capacity
        if capacity is None or files_held < capacity:
            if self.full:
                self.full = False
            return
        if not self.full:
            self.full = True
            event(
                "copies-full",
                logging.WARNING,
                files=capacity,
                bound=self.capacity_source,
                consequence="PRESERVE_FD answers ENOSPC until a file is released",
            )
        raise OSError(
            errno.ENOSPC,
            f"the crash copies hold at most {capacity} files ({self.capacity_source}); "
            "one more would be lost by a crash of luod",
        )
