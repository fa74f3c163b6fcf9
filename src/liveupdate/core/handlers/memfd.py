"""The memfd handler (``memfd-v1``): memory that survives the update.

Like Linux's ``mm/memfd_luo.c`` it accepts any *unlinked* shmem file: a memfd,
an ``O_TMPFILE`` or an unlinked file on tmpfs. A tmpfs file that still has a
name is refused, because its name would let it be reached (and changed)
outside the orchestrator's control. Unlike Linux, hugetlb memfds are accepted
and the file's size is not locked while preserved: the memory is shared with
the holder rather than copied, so nothing needs freezing.

Handler data: :class:`liveupdate.handler_abi.MemfdRecord` (``u64 size, u64
position, u32 seals`` at freeze time, little-endian). It is informational
(``luoctl inspect``): the inherited fd *is* the file, so whatever was written
after the freeze is carried over too.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from liveupdate.core.file import PreservedFile
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import MemfdRecord

__all__ = ["MemfdHandler"]

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)

# dlopen(NULL): libc is already loaded (ctypes.util would import subprocess & co.).
_libc = ctypes.CDLL(None, use_errno=True)
# struct statfs starts with `long f_type`; 120 bytes is its size on 64-bit.
_STATFS_SIZE = 120


def fs_magic(fd: int) -> int:
    """``fstatfs(fd).f_type``: which filesystem the open file lives on."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ctypes.c_long.from_buffer(buf).value) & 0xFFFFFFFF


def _seals(fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, _F_GET_SEALS))
    except OSError:
        return 0


class MemfdHandler(RecordHandler[MemfdRecord]):
    """Preserves unlinked shmem files (memfds) by holding them open."""

    compatible = MemfdRecord.compatible
    record = MemfdRecord

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
            return False
        try:
            return fs_magic(fd) in (TMPFS_MAGIC, HUGETLBFS_MAGIC)
        except OSError:
            return False

    def charged_bytes(self, fd: int, st: os.stat_result) -> int:
        # Its size when preserved: it may grow later (not locked, see the docs).
        return st.st_size

    def capture(self, file: PreservedFile) -> MemfdRecord:
        pos = os.lseek(file.fd, 0, os.SEEK_CUR)
        return MemfdRecord(os.fstat(file.fd).st_size, pos, _seals(file.fd))

    def check(self, file: PreservedFile, recorded: MemfdRecord) -> None:
        if not stat.S_ISREG(os.fstat(file.fd).st_mode):
            raise OSError(errno.EINVAL, "inherited memfd is not a regular file")
