"""The few pieces of systemd's protocols luod speaks, without libsystemd.

* ``sd_notify``: READY/STATUS/STOPPING datagrams to ``$NOTIFY_SOCKET`` so a
  ``Type=notify`` unit knows when luod serves.
* the fd store: ``FDSTORE=1`` with ``FDNAME=`` and the fd (``SCM_RIGHTS``),
  ``FDSTOREREMOVE=1``; what was stored comes back at the next start in
  ``$LISTEN_FDS`` named by ``$LISTEN_FDNAMES``
  (:mod:`liveupdate.server.fdstore`).
* socket activation: a listening socket passed as fd 3 (``$LISTEN_FDS``,
  ``$LISTEN_PID``), so systemd can own the socket and no connection is
  refused even while luod is not running.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from liveupdate import wire

__all__ = ["SD_LISTEN_FDS_START", "fd_store_enabled", "listen_fds", "notify", "notify_fds"]

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; ``False`` when there is none."""
    return notify_fds(assignments, [])


def notify_fds(assignments: Sequence[str], fds: Sequence[int]) -> bool:
    """``KEY=value`` lines with ``fds`` attached (``FDSTORE=1``); ``False`` when
    there is no service manager or it did not take the datagram."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg(["\n".join(assignments).encode()], wire.rights(fds), 0, path)
    except OSError:
        return False
    return True


def fd_store_enabled() -> bool:
    """Whether the service manager keeps fds for us: ``$NOTIFY_SOCKET`` and
    ``$FDSTORE`` (systemd sets it to ``FileDescriptorStoreMax=`` when not 0)."""
    return bool(os.environ.get("NOTIFY_SOCKET")) and fd_store_max() > 0


def fd_store_max() -> int:
    """``FileDescriptorStoreMax=`` as systemd said it (``$FDSTORE``), 0 when unset."""
    try:
        return max(0, int(os.environ.get("FDSTORE", "0")))
    except ValueError:
        return 0


def listen_fd_names() -> list[str]:
    """``$LISTEN_FDNAMES`` (read before :func:`listen_fds` unsets it)."""
    value = os.environ.get("LISTEN_FDNAMES", "")
    return value.split(":") if value else []


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The fds passed by socket activation (empty when not activated).

    They are made close-on-exec; ``LISTEN_*`` variables are removed so that
    children do not believe they were activated too.
    """
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if pid != os.getpid() or count <= 0:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds
