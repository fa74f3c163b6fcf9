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
* :func:`check_fd_reserve`, the fds luod keeps free for its own work.

Pure policy: nothing here holds state; the session set measures the usage
it checks against these limits.
"""

from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass

__all__ = [
    "Limits",
    "Owner",
    "Usage",
    "check_fd_reserve",
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
    # A quarter of the table at most: a tiny RLIMIT_NOFILE stays usable.
    reserve = min(limits.fd_reserve, soft // 4)
    if reserve <= 0:
        return
    if held + reserve + _FD_COUNT_MARGIN < soft:
        return
    in_use = len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
    if in_use + reserve >= soft:
        raise OSError(
            errno.EMFILE,
            f"luod holds {in_use} fds of {soft}; the last {reserve} are kept for "
            "its own work (a reboot)",
        )
