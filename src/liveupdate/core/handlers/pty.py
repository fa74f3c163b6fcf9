"""The PTY handler (``pty-v1``): pseudo-terminal masters.

Accepts a PTY master: a character device of major 5, minor 2 (what an open
of ``/dev/ptmx`` or ``/dev/pts/ptmx`` returns, e.g. ``os.openpty()``'s first
fd). luod holds the master, so the terminal stays up across the update: the
processes on its slave (``/dev/pts/N``) keep running, see no hangup, and
bytes in either direction stay queued. Slaves themselves are not accepted.

Handler data (:class:`liveupdate.handler_abi.PtyRecord`), little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     reserved, 0
    2       2     reserved, 0
    4       4     pts index N of the slave /dev/pts/N (fdinfo "tty-index",
                  else the TIOCGPTN ioctl)
    8       4     open file flags at freeze (fdinfo "flags", O_CLOEXEC dropped)

The next generation checks that the inherited fd is still a PTY master with
the same index.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

from liveupdate.core.file import FileKey, PreservedFile
from liveupdate.core.handlers._proc import fdinfo, open_flags
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import PtyRecord

__all__ = ["PtyHandler", "pts_index"]

COMPATIBLE = PtyRecord.compatible
PTMX_MAJOR = 5
PTMX_MINOR = 2
TIOCGPTN = 0x80045430


def is_pty_master(st: os.stat_result) -> bool:
    """Whether ``st`` is the character device of a PTY master (5:2)."""
    return (
        stat.S_ISCHR(st.st_mode)
        and os.major(st.st_rdev) == PTMX_MAJOR
        and os.minor(st.st_rdev) == PTMX_MINOR
    )


def pts_index(fd: int) -> int:
    """The index N of the master's slave ``/dev/pts/N``."""
    value = fdinfo(fd).get("tty-index", "")
    if value.isdigit():
        return int(value)
    raw = fcntl.ioctl(fd, TIOCGPTN, b"\0\0\0\0")
    return int(struct.unpack("I", raw)[0])


class PtyHandler(RecordHandler[PtyRecord]):
    """Preserves PTY masters by holding them open."""

    compatible = COMPATIBLE
    record = PtyRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        if not is_pty_master(st):
            return False
        try:
            pts_index(fd)
        except OSError:
            return False
        return True

    def file_key(self, fd: int, st: os.stat_result) -> FileKey:
        """The identity of a master (for a core that asks handlers for it).

        Every master opened from one ``ptmx`` shares its inode; the pts
        index tells them apart.
        """
        return (st.st_dev, st.st_ino, pts_index(fd))

    def capture(self, file: PreservedFile) -> PtyRecord:
        return PtyRecord(pts_index(file.fd), open_flags(fdinfo(file.fd)))

    def check(self, file: PreservedFile, recorded: PtyRecord) -> None:
        if not is_pty_master(os.fstat(file.fd)):
            raise OSError(errno.EINVAL, "inherited fd is not a PTY master")
        index = pts_index(file.fd)
        if index != recorded.index:
            raise OSError(
                errno.EINVAL, f"inherited PTY master is pts {index}, not {recorded.index}"
            )
