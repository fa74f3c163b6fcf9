"""luod's control socket: read the state and drive the state machine while
another process holds the device.

The device admits one opener at a time; the control socket (``luod
--control-socket``, by default ``control`` next to the device socket) admits
any number, and answers four calls only: ``GET_STATE``, ``SET_EVENT``,
``LIST_SESSIONS`` and ``REGISTER_PARTICIPANT``, with the same owner checks
as on the device. It speaks the
device's wire protocol, so the socket transport and the device's own
methods serve it unchanged::

    from liveupdate.client.control import control_path, open_control

    with open_control(control_path()) as control:  # None: no control socket
        control.set_event(uapi.LuodEvent.REBOOT)
"""

from __future__ import annotations

import os
import stat
from types import TracebackType
from typing import Self

from liveupdate import paths, uapi
from liveupdate.client.device import Device, StateInfo
from liveupdate.client.listing import SessionListing
from liveupdate.client.participant import Participant, register_participant
from liveupdate.client.transport import SocketTransport

__all__ = ["Control", "control_path", "open_control"]


class Control:
    """An open control connection: the state machine, not the sessions."""

    def __init__(self, fd: int, path: str) -> None:
        # A Device over the same transport: the three calls are the device's.
        self._conn = Device(fd, SocketTransport(), path)
        #: The path it was opened at.
        self.path = path

    def fileno(self) -> int:
        return self._conn.fileno()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def get_state(self) -> StateInfo:
        """LUOD_IOCTL_GET_STATE, as :meth:`Device.get_state`."""
        return self._conn.get_state()

    def set_event(self, event: uapi.LuodEvent, flags: int = 0) -> int:
        """LUOD_IOCTL_SET_EVENT, as :meth:`Device.set_event` (root, luod's user or
        ``--admin-group`` for PREPARE, CANCEL and REBOOT)."""
        return self._conn.set_event(event, flags)

    def list_sessions(self, name: str | bytes | None = None, files: bool = True) -> SessionListing:
        """LUOD_IOCTL_LIST_SESSIONS, as :meth:`Device.list_sessions`."""
        return self._conn.list_sessions(name, files)

    def register_participant(self, name: str | bytes) -> Participant:
        """LUOD_IOCTL_REGISTER_PARTICIPANT, as :meth:`Device.register_participant`,
        without waiting for the device another process may hold."""
        return register_participant(self._conn, name)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<liveupdate.Control {self.path!r} {state}>"


def control_path(device: str | os.PathLike[str] | None = None) -> str | None:
    """The control socket of the luod serving ``device`` (resolved as
    :func:`~liveupdate.open_device` does), if one exists there; ``None`` for a
    kernel's character device or when there is no socket at that path."""
    resolved = paths.resolve_device(device)
    try:
        if stat.S_ISCHR(os.stat(resolved).st_mode):
            return None
    except OSError:
        pass
    path = paths.control_path_for(resolved)
    try:
        return path if stat.S_ISSOCK(os.stat(path).st_mode) else None
    except OSError:
        return None


def open_control(path: str | os.PathLike[str], timeout: float | None = 10.0) -> Control:
    """Connect to luod's control socket at ``path``.

    Never busy: the control socket has no single-opener rule. ``timeout``
    bounds the connect and the hello (``ETIMEDOUT``).
    """
    resolved = os.fspath(path)
    return Control(SocketTransport().open(resolved, timeout), resolved)
