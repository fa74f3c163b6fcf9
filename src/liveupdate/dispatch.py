"""The one generic ioctl dispatcher.

Modelled on ``fwctl_fops_ioctl()``: a table per kind of fd maps ioctl numbers
to an :class:`IoctlOp` (the ABI facts of :class:`liveupdate.uapi.IoctlInfo`
plus a handler). :func:`dispatch` alone reads the caller's ``size``,
validates it, builds the zero-filled struct the handler works on and copies
the reply out. Handlers never see a size or a raw buffer; they receive a
fully initialised ``ctypes`` struct and either return normally (success) or
raise :class:`OSError` carrying the errno of the contract.

The order of the checks is fixed by ``uapi.md`` ("Dispatch order") and must
not change: ENOTTY, EFAULT, direction EINVAL, minimum-size EINVAL, E2BIG,
handler on a zero-filled copy, ``min(size, sizeof)`` bytes back, nothing
back on failure. A Linux-exact table (``luod --compat=linux``) answers an
unknown number in Linux's order instead (:meth:`DispatchTable.unknown`).
"""

from __future__ import annotations

import ctypes
import errno
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from liveupdate import uapi

__all__ = ["DispatchTable", "IoctlOp", "Reply", "dispatch"]

Ctx = TypeVar("Ctx")

#: A handler receives the per-call context and the struct to work on. It
#: returns the fd to hand back for ``fd_out`` ioctls (``None`` otherwise) and
#: reports failure by raising :class:`OSError`.
Handler = Callable[[Ctx, ctypes.Structure], "int | None"]

_SIZE = struct.Struct("=I")


@dataclass(frozen=True)
class IoctlOp(Generic[Ctx]):
    """One dispatch table entry: what the ABI says, and who implements it."""

    info: uapi.IoctlInfo
    handler: Handler[Ctx]


class Reply(NamedTuple):
    """The outcome of one call.

    A named tuple rather than a frozen dataclass: one is made per call.

    Attributes:
        ret: 0 or a negative errno, as a kernel ioctl handler returns it.
        out: The bytes to copy back to the caller: ``min(size, sizeof)``
            bytes of the updated struct on success, empty on failure.
        fd: The fd a successful ``fd_out`` ioctl hands back, else ``None``.
            Ownership passes to whoever sends the reply.
    """

    ret: int
    out: bytes = b""
    fd: int | None = None

    @classmethod
    def error(cls, err: int) -> Reply:
        return cls(-err)


class _Entry(NamedTuple, Generic[Ctx]):
    """What :func:`dispatch` needs of one table entry, computed once per table
    (``IoctlInfo.min_size`` and ``sizeof`` are computed on every access)."""

    op: IoctlOp[Ctx]
    handler: Handler[Ctx]
    struct: type[ctypes.Structure]
    direction: uapi.SessionDirection | None
    min_size: int
    sizeof: int


class DispatchTable(Generic[Ctx]):
    """The ioctl table of one kind of fd, indexed by nr like fwctl's.

    ``linux_exact`` answers a number the table lacks as Linux 7.3 does
    rather than as the contract says (``luod --compat=linux``): ``EINVAL``
    for an nr outside the table's range, whatever its type, direction and
    size bits, without reading the argument; else, once the ``size`` could
    be read (``EFAULT``), ``ENOTTY``. Linux indexes an array by nr and
    compares the full number only after reading the size.
    """

    def __init__(
        self, kind: uapi.FdKind, ops: Iterable[IoctlOp[Ctx]], *, linux_exact: bool = False
    ) -> None:
        self.kind = kind
        self._ops: dict[int, IoctlOp[Ctx]] = {}
        for op in ops:
            nr = uapi._IOC_NR(op.info.cmd)
            if op.info.on is not kind:
                raise ValueError(f"{op.info.name} is not a {kind.value} ioctl")
            if nr in self._ops:
                raise ValueError(f"two entries for nr {nr:#x}")
            self._ops[nr] = op
        # Keyed by the full number: a hit has the LUO type byte, a known nr
        # and no direction or size bits, all in one dictionary lookup.
        self._entries: dict[int, _Entry[Ctx]] = {
            op.info.cmd: _Entry(
                op, op.handler, op.info.struct, op.info.direction, op.info.min_size, op.info.sizeof
            )
            for op in self._ops.values()
        }
        #: The nr range Linux's array covers, in Linux-exact mode only.
        self.linux_range: tuple[int, int] | None = None
        if linux_exact:
            if not self._ops:
                raise ValueError("a Linux-exact table needs at least one entry")
            self.linux_range = (min(self._ops), max(self._ops))

    @property
    def ops(self) -> Mapping[int, IoctlOp[Ctx]]:
        """The entries, by nr."""
        return self._ops

    def lookup(self, cmd: int) -> IoctlOp[Ctx] | None:
        """The entry for ``cmd``, or ``None`` when the fd does not support it."""
        entry = self._entries.get(cmd)
        return None if entry is None else entry.op

    def unknown(self, cmd: int, arg: bytes | bytearray | memoryview) -> Reply:
        """The answer to ``cmd`` when the table has no entry for it."""
        if self.linux_range is None:
            return _ENOTTY
        low, high = self.linux_range
        if not low <= uapi._IOC_NR(cmd) <= high:
            return _EINVAL
        return _EFAULT if len(arg) < _SIZE.size else _ENOTTY


def dispatch(
    table: DispatchTable[Ctx],
    cmd: int,
    arg: bytes | bytearray | memoryview,
    ctx: Ctx,
    direction: uapi.SessionDirection | None = None,
) -> Reply:
    """Run one ioctl ``cmd`` with argument bytes ``arg`` through ``table``.

    ``arg`` is everything the caller's memory holds for the call (the wire's
    argument bytes). ``direction`` is the direction of the session the call
    is made on, ``None`` for the device. Handler exceptions other than
    :class:`OSError` propagate: they are bugs, not caller mistakes.
    """
    entry = table._entries.get(cmd)
    if entry is None:
        return table.unknown(cmd, arg)
    _op, handler, struct_type, valid_on, least, known = entry
    if len(arg) < _SIZE.size:
        return _EFAULT
    (size,) = _SIZE.unpack_from(arg)
    if len(arg) < size:
        return _EFAULT
    if valid_on is not None and direction is not None and direction != valid_on:
        return _EINVAL
    if size < least:
        return _EINVAL
    if size > known:
        tail = memoryview(arg)[known:size].tobytes()
        if tail != bytes(len(tail)):
            return _E2BIG
        obj = struct_type.from_buffer_copy(arg)
    elif size == known:
        obj = struct_type.from_buffer_copy(arg)
    else:
        # Zero-filled struct with the caller's bytes on top: an older, shorter
        # struct reads its missing tail as zero.
        obj = struct_type.from_buffer_copy(bytes(memoryview(arg)[:size]) + bytes(known - size))
    try:
        fd = handler(ctx, obj)
    except OSError as exc:
        return Reply.error(exc.errno or errno.EINVAL)
    out = bytes(obj)
    return Reply(0, out if size >= known else out[:size], fd)


_ENOTTY = Reply.error(errno.ENOTTY)
_EFAULT = Reply.error(errno.EFAULT)
_EINVAL = Reply.error(errno.EINVAL)
_E2BIG = Reply.error(errno.E2BIG)
