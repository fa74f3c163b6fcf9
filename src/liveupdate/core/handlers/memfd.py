"""The memfd handler (``memfd-v1``): memory that survives the update.

Like Linux's ``mm/memfd_luo.c`` it accepts any *unlinked* shmem file: a memfd,
an ``O_TMPFILE`` or an unlinked file on tmpfs. A tmpfs file that still has a
name is refused, because its name would let it be reached (and changed)
outside the orchestrator's control. Unlike Linux, hugetlb memfds are accepted
and the file's size is not locked while preserved: the memory is shared with
the holder rather than copied, so nothing needs freezing.

Handler data (little-endian): ``u64 size, u64 position, u32 seals`` at freeze
time. It is informational (``luoctl inspect``): the inherited fd *is* the
file, so whatever was written after the freeze is carried over too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile

__all__ = ["MemfdHandler"]

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_DATA = struct.Struct("<QQI")
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
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


class MemfdHandler(FileHandler):
    """Preserves unlinked shmem files (memfds) by holding them open."""

    compatible = "memfd-v1"

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

    def freeze(self, file: PreservedFile) -> bytes:
        st = os.fstat(file.fd)
        pos = os.lseek(file.fd, 0, os.SEEK_CUR)
        return _DATA.pack(st.st_size, pos, _seals(file.fd))

    def restore(self, file: PreservedFile) -> None:
        if len(file.data) != _DATA.size:
            raise OSError(errno.EINVAL, f"memfd-v1 data of {len(file.data)} bytes")
        if not stat.S_ISREG(os.fstat(file.fd).st_mode):
            raise OSError(errno.EINVAL, "inherited memfd is not a regular file")

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        desc: dict[str, Any] = {"type": "memfd"}
        if file.fd >= 0:
            desc["size"] = os.fstat(file.fd).st_size
        elif len(file.data) == _DATA.size:
            desc["size"] = _DATA.unpack(file.data)[0]
        return desc

    @staticmethod
    def decode(data: bytes) -> dict[str, int]:
        """The fields of a ``memfd-v1`` data blob (for inspection)."""
        size, pos, seals = _DATA.unpack(data)
        return {"size": size, "position": pos, "seals": seals}

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """:meth:`decode` for ``luoctl inspect``; :class:`ValueError` when malformed."""
        if len(data) != _DATA.size:
            raise ValueError(f"memfd-v1 data of {len(data)} bytes, expected {_DATA.size}")
        return {"type": "memfd", **MemfdHandler.decode(data)}
