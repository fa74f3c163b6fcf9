"""The control socket: the state machine without the single-opener device.

The device (``--socket``) admits one opener at a time, as ``/dev/liveupdate``
does, and a long-running agent keeps it open. An operator must still be able
to read the state and start a live update then (on Linux an open
``/dev/liveupdate`` does not block a kexec either), so luod listens on a
second socket, ``--control-socket``, with its own mode and group:

* it speaks the device's wire protocol (:mod:`liveupdate.wire`: the hello,
  then one reply per request) and is served by the same event loop and the
  same dispatcher;
* its table holds four ioctls only: ``LUOD_IOCTL_GET_STATE``,
  ``LUOD_IOCTL_SET_EVENT``, ``LUOD_IOCTL_LIST_SESSIONS`` and
  ``LUOD_IOCTL_REGISTER_PARTICIPANT``, with the owner checks they have on
  the device (the caller's ``SO_PEERCRED``). Sessions are neither created
  nor retrieved here: anything else is ``ENOTTY``. Participants register
  here too: they are privileged callers like the operator, and must not
  wait for the device (all of them register again right after each live
  update, inside their blackout);
* any number of connections at once;
* the listener is handed to the next generation like the device's.
"""

from __future__ import annotations

from liveupdate import uapi
from liveupdate.core.luo import DEVICE_OPS, DeviceCall
from liveupdate.core.participant_ops import PARTICIPANT_OPS
from liveupdate.core.reboot import STATE_OPS
from liveupdate.dispatch import DispatchTable

__all__ = ["CONTROL_IOCTLS", "control_table"]

#: What a control connection may call.
CONTROL_IOCTLS = frozenset({uapi.LUOD_IOCTL_GET_STATE, uapi.LUOD_IOCTL_SET_EVENT,
                            uapi.LUOD_IOCTL_LIST_SESSIONS,
                            uapi.LUOD_IOCTL_REGISTER_PARTICIPANT})  # fmt: skip


def control_table() -> DispatchTable[DeviceCall]:
    """The device's entries for :data:`CONTROL_IOCTLS`, and nothing else."""
    ops = [
        op for op in (*DEVICE_OPS, *STATE_OPS, *PARTICIPANT_OPS) if op.info.cmd in CONTROL_IOCTLS
    ]
    return DispatchTable(uapi.FdKind.DEVICE, ops)
