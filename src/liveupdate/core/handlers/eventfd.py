"""The eventfd handler (``eventfd-v1``): event counters that survive the update.

Accepts an fd whose ``/proc/self/fd`` link reads ``anon_inode:[eventfd]``.
luod holds the eventfd itself, so its counter (and any waiter's view of it)
is carried over untouched. The counter is read from
``/proc/self/fdinfo`` (``eventfd-count``), never with ``read()``, which
would consume it.

Handler data, little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     EFD_SEMAPHORE: 0 no, 1 yes, 255 unknown (kernel without
                  the fdinfo line)
    2       2     reserved, 0
    4       4     open file flags at freeze (fdinfo "flags", O_CLOEXEC
                  dropped; O_NONBLOCK = EFD_NONBLOCK)
    8       8     counter at freeze (fdinfo "eventfd-count")
    16      8     eventfd id (fdinfo "eventfd-id"), 2**64-1 if unknown

The counter is informational: whatever happens to the eventfd after the
freeze is carried over too. The id identifies the eventfd: the next
generation checks that the inherited fd has the same one.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, FileKey, PreservedFile, file_key
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    describe_record,
    fd_link,
    fdinfo,
    open_flags,
)

__all__ = ["EventfdHandler", "EventfdInfo"]

COMPATIBLE = "eventfd-v1"
LINK = "anon_inode:[eventfd]"
UNKNOWN_ID = 0xFFFF_FFFF_FFFF_FFFF
UNKNOWN_SEMAPHORE = 0xFF
_DATA = struct.Struct("<BBHIQQ")


@dataclass(frozen=True)
class EventfdInfo:
    """What ``eventfd-v1`` records about an eventfd."""

    count: int
    flags: int
    semaphore: int
    id: int

    @classmethod
    def of(cls, fd: int) -> EventfdInfo:
        info = fdinfo(fd)
        try:
            count = int(info["eventfd-count"], 16)
        except (KeyError, ValueError):
            raise OSError(errno.EINVAL, "fdinfo has no eventfd-count") from None
        semaphore = UNKNOWN_SEMAPHORE
        if info.get("eventfd-semaphore", "").isdigit():
            semaphore = 1 if int(info["eventfd-semaphore"]) else 0
        id_ = int(info["eventfd-id"]) if info.get("eventfd-id", "").isdigit() else UNKNOWN_ID
        return cls(count, open_flags(info), semaphore, id_)

    def encode(self) -> bytes:
        return _DATA.pack(FORMAT_VERSION, self.semaphore, 0, self.flags, self.count, self.id)

    @classmethod
    def decode(cls, data: bytes) -> EventfdInfo:
        """Parse ``eventfd-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _DATA.size, COMPATIBLE)
        if len(data) != _DATA.size:
            raise ValueError(f"{COMPATIBLE} data of {len(data)} bytes, expected {_DATA.size}")
        _v, semaphore, _reserved, flags, count, id_ = _DATA.unpack(data)
        return cls(count, flags, semaphore, id_)

    def to_dict(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "type": "eventfd",
            "count": self.count,
            "flags": self.flags,
            "nonblock": bool(self.flags & os.O_NONBLOCK),
        }
        if self.semaphore != UNKNOWN_SEMAPHORE:
            desc["semaphore"] = bool(self.semaphore)
        if self.id != UNKNOWN_ID:
            desc["id"] = self.id
        return desc


class EventfdHandler(FileHandler):
    """Preserves eventfds by holding them open."""

    compatible = COMPATIBLE

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return fd_link(fd) == LINK

    def file_key(self, fd: int, st: os.stat_result) -> FileKey:
        """The identity of an eventfd (for a core that asks handlers for it).

        Every eventfd shares one anonymous inode, so ``(st_dev, st_ino)``
        cannot tell two of them apart; the eventfd id can.
        """
        try:
            id_ = EventfdInfo.of(fd).id
        except OSError:
            id_ = UNKNOWN_ID
        if id_ == UNKNOWN_ID:
            return file_key(fd, st)
        return (st.st_dev, st.st_ino, id_)

    def freeze(self, file: PreservedFile) -> bytes:
        return EventfdInfo.of(file.fd).encode()

    def restore(self, file: PreservedFile) -> None:
        recorded = decode_record(EventfdInfo, file.data)
        if fd_link(file.fd) != LINK:
            raise OSError(errno.EINVAL, "inherited fd is not an eventfd")
        now = EventfdInfo.of(file.fd)
        if UNKNOWN_ID not in (now.id, recorded.id) and now.id != recorded.id:
            raise OSError(errno.EINVAL, f"inherited eventfd has id {now.id}, not {recorded.id}")
        if UNKNOWN_SEMAPHORE not in (now.semaphore, recorded.semaphore) and (
            now.semaphore != recorded.semaphore
        ):
            raise OSError(errno.EINVAL, "inherited eventfd's EFD_SEMAPHORE differs")

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        return describe_record(EventfdInfo, file.fd, file.data, "eventfd")

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``eventfd-v1`` data (for ``luoctl inspect``)."""
        info = EventfdInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict()}
