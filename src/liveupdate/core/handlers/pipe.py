"""The pipe handler (``pipe-v1``): anonymous pipes and FIFOs.

Accepts any ``S_ISFIFO`` file: either end of a ``pipe()`` or a FIFO opened
from the filesystem (read, write or, as Linux allows, read-write). The two
ends of one pipe share an inode but are different files: the core tells them
apart by access mode, so both may be preserved, each once.

luod holds the pipe end itself, so bytes written before the update and not
yet read are still in the pipe afterwards; what the data records (which end,
the name, how many bytes were queued at freeze) is for inspection and for
checking the inherited fd.

Handler data (:class:`liveupdate.handler_abi.PipeRecord`), little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     access mode: 0 read end (O_RDONLY), 1 write end (O_WRONLY), 2 O_RDWR
    2       1     1 if a named FIFO, 0 for an anonymous pipe
    3       1     reserved, 0
    4       4     bytes queued in the pipe at freeze (FIONREAD)
    8       4     pipe capacity in bytes (F_GETPIPE_SZ; 0 if unknown)
    12      8     inode (st_ino)
    20      2+N   name: u16 length N, then the target of /proc/self/fd/N as
                  luod saw it at freeze: "pipe:[INODE]" for an anonymous
                  pipe, the FIFO's absolute path (" (deleted)" appended by
                  the kernel if it was unlinked)
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import termios

from liveupdate.core.file import PreservedFile
from liveupdate.core.handlers._proc import fd_link_bytes
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import PipeRecord
from liveupdate.handler_abi.records import PIPE_ENDS

__all__ = ["PipeHandler", "read_pipe"]

COMPATIBLE = PipeRecord.compatible
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def queued_bytes(fd: int) -> int:
    """Bytes waiting in the pipe (``FIONREAD``; valid on either end)."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _capacity(fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except OSError:
        return 0


def read_pipe(fd: int) -> PipeRecord:
    """What ``pipe-v1`` records about the pipe end ``fd`` (reading no byte of it)."""
    st = os.fstat(fd)
    accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    link = fd_link_bytes(fd)
    return PipeRecord(
        accmode, link.startswith(b"/"), queued_bytes(fd), _capacity(fd), st.st_ino, link
    )


class PipeHandler(RecordHandler[PipeRecord]):
    """Preserves pipe ends and FIFOs by holding them open."""

    compatible = COMPATIBLE
    record = PipeRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return stat.S_ISFIFO(st.st_mode)

    def capture(self, file: PreservedFile) -> PipeRecord:
        return read_pipe(file.fd)

    def check(self, file: PreservedFile, recorded: PipeRecord) -> None:
        st = os.fstat(file.fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise OSError(errno.EINVAL, "inherited fd is not a pipe or FIFO")
        if st.st_ino != recorded.inode:
            raise OSError(
                errno.EINVAL, f"inherited pipe is inode {st.st_ino}, not {recorded.inode}"
            )
        accmode = fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_ACCMODE
        if accmode != recorded.accmode:
            raise OSError(
                errno.EINVAL,
                f"inherited pipe is the {PIPE_ENDS.get(accmode)} end, not the "
                f"{PIPE_ENDS.get(recorded.accmode)} end",
            )
