"""The eventfd handler (``eventfd-v1``): event counters that survive the update.

Accepts an fd whose ``/proc/self/fd`` link reads ``anon_inode:[eventfd]``.
luod holds the eventfd itself, so its counter (and any waiter's view of it)
is carried over untouched. The counter is read from
``/proc/self/fdinfo`` (``eventfd-count``), never with ``read()``, which
would consume it.

Handler data (:class:`liveupdate.handler_abi.EventfdRecord`), little-endian::

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

from liveupdate.core.file import FileKey, PreservedFile, file_key
from liveupdate.core.handlers._proc import fd_link, fdinfo, open_flags
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import EventfdRecord
from liveupdate.handler_abi.records import EVENTFD_UNKNOWN_ID as UNKNOWN_ID
from liveupdate.handler_abi.records import EVENTFD_UNKNOWN_SEMAPHORE as UNKNOWN_SEMAPHORE

__all__ = ["EventfdHandler", "read_eventfd"]

COMPATIBLE = EventfdRecord.compatible
LINK = "anon_inode:[eventfd]"


def read_eventfd(fd: int) -> EventfdRecord:
    """What ``eventfd-v1`` records about the eventfd ``fd`` (from its fdinfo)."""
    info = fdinfo(fd)
    try:
        count = int(info["eventfd-count"], 16)
    except (KeyError, ValueError):
        raise OSError(errno.EINVAL, "fdinfo has no eventfd-count") from None
    semaphore = UNKNOWN_SEMAPHORE
    if info.get("eventfd-semaphore", "").isdigit():
        semaphore = 1 if int(info["eventfd-semaphore"]) else 0
    id_ = int(info["eventfd-id"]) if info.get("eventfd-id", "").isdigit() else UNKNOWN_ID
    return EventfdRecord(count, open_flags(info), semaphore, id_)


class EventfdHandler(RecordHandler[EventfdRecord]):
    """Preserves eventfds by holding them open."""

    compatible = COMPATIBLE
    record = EventfdRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return fd_link(fd) == LINK

    def file_key(self, fd: int, st: os.stat_result) -> FileKey:
        """The identity of an eventfd (for a core that asks handlers for it).

        Every eventfd shares one anonymous inode, so ``(st_dev, st_ino)``
        cannot tell two of them apart; the eventfd id can.
        """
        try:
            id_ = read_eventfd(fd).id
        except OSError:
            id_ = UNKNOWN_ID
        if id_ == UNKNOWN_ID:
            return file_key(fd, st)
        return (st.st_dev, st.st_ino, id_)

    def capture(self, file: PreservedFile) -> EventfdRecord:
        return read_eventfd(file.fd)

    def check(self, file: PreservedFile, recorded: EventfdRecord) -> None:
        if fd_link(file.fd) != LINK:
            raise OSError(errno.EINVAL, "inherited fd is not an eventfd")
        now = read_eventfd(file.fd)
        if UNKNOWN_ID not in (now.id, recorded.id) and now.id != recorded.id:
            raise OSError(errno.EINVAL, f"inherited eventfd has id {now.id}, not {recorded.id}")
        if UNKNOWN_SEMAPHORE not in (now.semaphore, recorded.semaphore) and (
            now.semaphore != recorded.semaphore
        ):
            raise OSError(errno.EINVAL, "inherited eventfd's EFD_SEMAPHORE differs")
