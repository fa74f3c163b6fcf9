"""The pidfd handler (``pidfd-v1``): process handles that survive the update.

Accepts an fd whose ``/proc/self/fd`` link reads ``anon_inode:[pidfd]``
(``pidfd_open()``, ``clone(CLONE_PIDFD)``). luod holds the pidfd itself, so
after the update it still refers to the same process: it can be polled for
exit, signalled with ``pidfd_send_signal()``, or waited for with
``waitid(P_PIDFD)`` by the process's parent. A pid alone could have been
reused meanwhile; a pidfd cannot.

Handler data (:class:`liveupdate.handler_abi.PidfdRecord`), little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     reserved, 0
    2       2     reserved, 0
    4       4     pid at freeze, signed (fdinfo "Pid": -1 once the process
                  has exited and been reaped, 0 when it is outside luod's
                  pid namespace)
    8       4     open file flags at freeze (fdinfo "flags", O_CLOEXEC
                  dropped; O_NONBLOCK = PIDFD_NONBLOCK)

The next generation checks that the inherited fd is a pidfd and, while the
process is alive, that it is the same pid.
"""

from __future__ import annotations

import errno
import os

from liveupdate.core.file import PreservedFile
from liveupdate.core.handlers._proc import fd_link, fdinfo, open_flags
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import PidfdRecord

__all__ = ["PidfdHandler", "read_pidfd"]

COMPATIBLE = PidfdRecord.compatible
LINK = "anon_inode:[pidfd]"


def read_pidfd(fd: int) -> PidfdRecord:
    """What ``pidfd-v1`` records about the pidfd ``fd`` (from its fdinfo)."""
    info = fdinfo(fd)
    try:
        pid = int(info["Pid"])
    except (KeyError, ValueError):
        raise OSError(errno.EINVAL, "fdinfo has no Pid") from None
    return PidfdRecord(pid, open_flags(info))


class PidfdHandler(RecordHandler[PidfdRecord]):
    """Preserves pidfds by holding them open."""

    compatible = COMPATIBLE
    record = PidfdRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return fd_link(fd) == LINK

    def capture(self, file: PreservedFile) -> PidfdRecord:
        return read_pidfd(file.fd)

    def check(self, file: PreservedFile, recorded: PidfdRecord) -> None:
        if fd_link(file.fd) != LINK:
            raise OSError(errno.EINVAL, "inherited fd is not a pidfd")
        now = read_pidfd(file.fd)
        # A pidfd's pid never changes; it only turns to -1 once reaped.
        if recorded.pid > 0 and now.pid not in (recorded.pid, -1):
            raise OSError(errno.EINVAL, f"inherited pidfd is pid {now.pid}, not {recorded.pid}")
