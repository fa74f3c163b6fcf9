"""The device ioctl of participants: ``LUOD_IOCTL_REGISTER_PARTICIPANT``.

Beside :mod:`liveupdate.core.participant` (which owns the participants and
has no knowledge of the device) as :mod:`liveupdate.core.session_ops` is
beside the session set; :mod:`liveupdate.core.tables` adds the entry to the
device's table.
"""

from __future__ import annotations

import ctypes
import errno

from liveupdate import uapi
from liveupdate.core.luo import DeviceCall, LuoState
from liveupdate.core.policy import is_privileged
from liveupdate.core.session_ops import parse_name
from liveupdate.dispatch import IoctlOp

__all__ = ["PARTICIPANT_OPS"]


def _register_participant(call: DeviceCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.luod_register_participant)
    if arg.flags:
        raise OSError(errno.EOPNOTSUPP, f"unknown flags {arg.flags:#x}")
    name = parse_name(arg.name)
    luo = call.luo
    if not is_privileged(call.owner, luo.limits):
        # A participant can veto every live update of the machine.
        raise OSError(
            errno.EACCES,
            f"uid {call.owner.uid} may not register a participant "
            "(root, luod's user or its --admin-group only)",
        )
    if luo.state == LuoState.FROZEN:
        raise OSError(errno.EBUSY, "a live update is in progress")
    _participant, data, fd = luo.participants.register(name, call.owner)
    arg.fd = -1
    arg.data_len = len(data)
    ctypes.memmove(arg.data, data, len(data))
    return fd


#: The participants' device ioctls; :func:`liveupdate.core.tables.device_table` adds them.
PARTICIPANT_OPS: list[IoctlOp[DeviceCall]] = [
    IoctlOp(uapi.REGISTER_PARTICIPANT, _register_participant),
]
