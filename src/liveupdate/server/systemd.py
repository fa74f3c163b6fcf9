"""The few pieces of systemd's protocols luod speaks, without libsystemd.

* ``sd_notify``: READY/STATUS/STOPPING datagrams to ``$NOTIFY_SOCKET`` so a
  ``Type=notify`` unit knows when luod serves.
* socket activation: a listening socket passed as fd 3 (``$LISTEN_FDS``,
  ``$LISTEN_PID``), so systemd can own the socket and no connection is
  refused even while luod is not running.
"""

from __future__ import annotations

import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify"]

SD_LISTEN_FDS_START = 3


def notify(*assignments: str) -> bool:
    """Send ``KEY=value`` lines to the service manager; ``False`` when there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), path)
    except OSError:
        return False
    return True


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
