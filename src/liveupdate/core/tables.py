"""The dispatch tables of the device and of session fds.

Each concept module declares its own ioctl entries (:mod:`~liveupdate.core.luo`
the upstream device ioctls and the listing, :mod:`~liveupdate.core.reboot`
the state machine's, :mod:`~liveupdate.core.participant_ops` the participants',
:mod:`~liveupdate.core.session_ops` the session fd's);
this module assembles them into the two tables the transport dispatches
through, in the style of fwctl's single ``ucmd_table``. In Linux-exact mode
(``luod --compat=linux``) the tables hold Linux's entries alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from liveupdate import uapi
from liveupdate.core.luo import DEVICE_OPS, DeviceCall
from liveupdate.core.participant_ops import PARTICIPANT_OPS
from liveupdate.core.reboot import STATE_OPS
from liveupdate.core.session_ops import SESSION_OPS, SessionCall
from liveupdate.dispatch import DispatchTable, IoctlOp

__all__ = ["device_table", "session_table", "upstream"]

Op = TypeVar("Op", bound=IoctlOp[Any])


def upstream(ops: Iterable[Op]) -> list[Op]:
    """The entries Linux has: the extensions' nrs start at their own bases."""
    return [op for op in ops if uapi._IOC_NR(op.info.cmd) < uapi.LUOD_CMD_BASE]


def device_table(linux_exact: bool = False) -> DispatchTable[DeviceCall]:
    """Every ioctl valid on the device; Linux's alone, answered as Linux
    answers the rest, when ``linux_exact`` (``luod --compat=linux``)."""
    ops = [*DEVICE_OPS, *STATE_OPS, *PARTICIPANT_OPS]
    if linux_exact:
        return DispatchTable(uapi.FdKind.DEVICE, upstream(ops), linux_exact=True)
    return DispatchTable(uapi.FdKind.DEVICE, ops)


def session_table(linux_exact: bool = False) -> DispatchTable[SessionCall]:
    """Every ioctl valid on a session fd (Linux's alone when ``linux_exact``)."""
    if linux_exact:
        return DispatchTable(uapi.FdKind.SESSION, upstream(SESSION_OPS), linux_exact=True)
    return DispatchTable(uapi.FdKind.SESSION, SESSION_OPS)
