"""The dispatch tables of the device and of session fds.

Each concept module declares its own ioctl entries (:mod:`~liveupdate.core.luo`
the upstream device ioctls and the listing, :mod:`~liveupdate.core.reboot`
the state machine's, :mod:`~liveupdate.core.session_ops` the session fd's);
this module assembles them into the two tables the transport dispatches
through, in the style of fwctl's single ``ucmd_table``.
"""

from __future__ import annotations

from liveupdate import uapi
from liveupdate.core.luo import DEVICE_OPS, DeviceCall
from liveupdate.core.reboot import STATE_OPS
from liveupdate.core.session_ops import SESSION_OPS, SessionCall
from liveupdate.dispatch import DispatchTable

__all__ = ["device_table", "session_table"]


def device_table() -> DispatchTable[DeviceCall]:
    """Every ioctl valid on the device."""
    return DispatchTable(uapi.FdKind.DEVICE, [*DEVICE_OPS, *STATE_OPS])


def session_table() -> DispatchTable[SessionCall]:
    """Every ioctl valid on a session fd."""
    return DispatchTable(uapi.FdKind.SESSION, SESSION_OPS)
