"""The dispatch tables of ``luod --compat=linux``: Linux's numbers, Linux's errnos.

What is pinned is what Linux 7.3 answered in ``../shared/kernel-vm``
(``semantics.md``, "Observed on a real LUO kernel", and the probe of this
mode's guide): an nr outside the fd's table is ``EINVAL`` whatever its type,
direction and size bits, before any argument byte is read; inside the table,
a number that is not the entry's is ``EFAULT`` when its ``size`` cannot be
read, else ``ENOTTY``. The contract's tables answer ``ENOTTY`` first.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from liveupdate import uapi
from liveupdate.core.tables import device_table, session_table
from liveupdate.dispatch import DispatchTable, IoctlOp, Reply, dispatch

#: A readable size, in case the number were looked at further.
GOOD = struct.pack("=I", 72) + bytes(68)
IOWR_BA00 = (3 << 30) | (72 << 16) | 0xBA00

DEVICE_ANSWERS = [
    (0xBA02, GOOD, errno.EINVAL),  # past the table
    (0xBA7F, GOOD, errno.EINVAL),
    (0xBA40, GOOD, errno.EINVAL),  # a session number
    (0xBA80, GOOD, errno.EINVAL),  # luod's LUOD_IOCTL_GET_STATE
    (0xBA8F, GOOD, errno.EINVAL),
    (0xBB02, GOOD, errno.EINVAL),  # another type, nr past the table
    (0x541B, GOOD, errno.EINVAL),  # FIONREAD, nr 0x1b
    (0xBA02, b"", errno.EINVAL),  # no byte read before the range check
    (0xBB00, GOOD, errno.ENOTTY),  # nr 0, not the entry's number
    (0x5401, GOOD, errno.ENOTTY),  # TCGETS, nr 1
    (IOWR_BA00, GOOD, errno.ENOTTY),
    (0xBB00, b"", errno.EFAULT),  # the size is read before the number is compared
    (0x5401, b"\0\0", errno.EFAULT),
    (IOWR_BA00, b"", errno.EFAULT),
]

SESSION_ANSWERS = [
    (0xBA44, GOOD, errno.EINVAL),
    (0xBA3F, GOOD, errno.EINVAL),
    (0xBA00, GOOD, errno.EINVAL),  # a device number
    (0xBAC0, GOOD, errno.EINVAL),  # luod's LUOD_SESSION_UPDATE
    (0xBAC3, GOOD, errno.EINVAL),
    (0xBB44, GOOD, errno.EINVAL),
    (0xBB40, GOOD, errno.ENOTTY),
    (0xBB40, b"", errno.EFAULT),
]


def _id(case: tuple[int, bytes, int]) -> str:
    cmd, arg, err = case
    return f"{cmd:#x}-{len(arg)}-bytes-{errno.errorcode[err]}"


@pytest.mark.parametrize(("cmd", "arg", "err"), DEVICE_ANSWERS, ids=map(_id, DEVICE_ANSWERS))
def test_linux_exact_device_table_answers_unknown_numbers_as_linux(
    cmd: int, arg: bytes, err: int
) -> None:
    # The context is never reached: no entry matches.
    assert dispatch(device_table(linux_exact=True), cmd, arg, None) == Reply(-err)  # type: ignore[arg-type]


@pytest.mark.parametrize(("cmd", "arg", "err"), SESSION_ANSWERS, ids=map(_id, SESSION_ANSWERS))
def test_linux_exact_session_table_answers_unknown_numbers_as_linux(
    cmd: int, arg: bytes, err: int
) -> None:
    table = session_table(linux_exact=True)
    reply = dispatch(table, cmd, arg, None, uapi.SessionDirection.OUTGOING)  # type: ignore[arg-type]
    assert reply == Reply(-err)


@pytest.mark.parametrize("cmd", [0xBA02, 0xBA7F, 0xBB00, 0x541B, IOWR_BA00], ids=hex)
@pytest.mark.parametrize("arg", [GOOD, b""], ids=["size-72", "no-argument"])
def test_the_contracts_table_answers_every_unknown_number_enotty(cmd: int, arg: bytes) -> None:
    assert dispatch(device_table(), cmd, arg, None) == Reply(-errno.ENOTTY)  # type: ignore[arg-type]


def test_linux_exact_tables_hold_linuxs_numbers_alone() -> None:
    assert sorted(device_table(linux_exact=True).ops) == [0x00, 0x01]
    assert sorted(session_table(linux_exact=True).ops) == [0x40, 0x41, 0x42, 0x43]
    # luod's own tables keep the extensions.
    assert uapi._IOC_NR(uapi.LUOD_IOCTL_GET_STATE) in device_table().ops
    assert uapi._IOC_NR(uapi.LUOD_SESSION_UPDATE) in session_table().ops


def test_a_linux_exact_table_still_runs_its_entries() -> None:
    seen: list[bytes] = []

    def handler(ctx: None, obj: ctypes.Structure) -> None:
        seen.append(bytes(obj))

    info = uapi.GET_NAME
    table: DispatchTable[None] = DispatchTable(
        uapi.FdKind.SESSION, [IoctlOp(info, handler)], linux_exact=True
    )
    arg = struct.pack("=II", info.sizeof, 0) + bytes(info.sizeof - 8)
    assert dispatch(table, info.cmd, arg, None) == Reply(0, arg)
    assert seen == [arg]
    # A one-entry table: its one nr is the whole range.
    assert dispatch(table, info.cmd + 1, arg, None) == Reply(-errno.EINVAL)
    assert dispatch(table, info.cmd - 1, arg, None) == Reply(-errno.EINVAL)


def test_a_linux_exact_table_needs_an_entry() -> None:
    with pytest.raises(ValueError, match="at least one entry"):
        DispatchTable(uapi.FdKind.DEVICE, [], linux_exact=True)
