"""The pipe handler (``pipe-v1``): anonymous pipes and FIFOs.

Accepts any ``S_ISFIFO`` file: either end of a ``pipe()`` or a FIFO opened
from the filesystem (read, write or, as Linux allows, read-write). The two
ends of one pipe share an inode but are different files: the core tells them
apart by access mode, so both may be preserved, each once.

luod holds the pipe end itself, so bytes written before the update and not
yet read are still in the pipe afterwards; what the data records (which end,
the name, how many bytes were queued at freeze) is for inspection and for
checking the inherited fd.

Handler data, little-endian::

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
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    describe_record,
    fd_link_bytes,
    pack_bytes,
    unpack_bytes,
)

__all__ = ["PipeHandler", "PipeInfo"]

COMPATIBLE = "pipe-v1"
_HEADER = struct.Struct("<BBBBIIQ")
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_ENDS = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}


def queued_bytes(fd: int) -> int:
    """Bytes waiting in the pipe (``FIONREAD``; valid on either end)."""
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _capacity(fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, _F_GETPIPE_SZ))
    except OSError:
        return 0


@dataclass(frozen=True)
class PipeInfo:
    """What ``pipe-v1`` records about a pipe end."""

    accmode: int
    named: bool
    queued: int
    capacity: int
    inode: int
    link: bytes

    @classmethod
    def of(cls, fd: int) -> PipeInfo:
        st = os.fstat(fd)
        accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        link = fd_link_bytes(fd)
        return cls(
            accmode,
            link.startswith(b"/"),
            queued_bytes(fd),
            _capacity(fd),
            st.st_ino,
            link,
        )

    def encode(self) -> bytes:
        header = _HEADER.pack(
            FORMAT_VERSION,
            self.accmode,
            int(self.named),
            0,
            min(self.queued, 0xFFFFFFFF),
            min(self.capacity, 0xFFFFFFFF),
            self.inode,
        )
        return header + pack_bytes(self.link)

    @classmethod
    def decode(cls, data: bytes) -> PipeInfo:
        """Parse ``pipe-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _HEADER.size, COMPATIBLE)
        _v, accmode, named, _reserved, queued, capacity, inode = _HEADER.unpack_from(data)
        if accmode not in _ENDS or named not in (0, 1):
            raise ValueError(f"{COMPATIBLE} data: access mode {accmode}, named {named}")
        link, offset = unpack_bytes(data, _HEADER.size)
        if offset != len(data):
            raise ValueError(f"{COMPATIBLE} data has {len(data) - offset} trailing bytes")
        return cls(accmode, bool(named), queued, capacity, inode, link)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "fifo" if self.named else "pipe",
            "end": _ENDS.get(self.accmode, str(self.accmode)),
            "path": self.link.decode("utf-8", "backslashreplace"),
            "size": self.queued,
            "capacity": self.capacity,
            "inode": self.inode,
        }


class PipeHandler(FileHandler):
    """Preserves pipe ends and FIFOs by holding them open."""

    compatible = COMPATIBLE

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return stat.S_ISFIFO(st.st_mode)

    def freeze(self, file: PreservedFile) -> bytes:
        return PipeInfo.of(file.fd).encode()

    def restore(self, file: PreservedFile) -> None:
        info = decode_record(PipeInfo, file.data)
        st = os.fstat(file.fd)
        if not stat.S_ISFIFO(st.st_mode):
            raise OSError(errno.EINVAL, "inherited fd is not a pipe or FIFO")
        if st.st_ino != info.inode:
            raise OSError(errno.EINVAL, f"inherited pipe is inode {st.st_ino}, not {info.inode}")
        accmode = fcntl.fcntl(file.fd, fcntl.F_GETFL) & os.O_ACCMODE
        if accmode != info.accmode:
            raise OSError(
                errno.EINVAL,
                f"inherited pipe is the {_ENDS.get(accmode)} end, not the "
                f"{_ENDS.get(info.accmode)} end",
            )

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        return describe_record(PipeInfo, file.fd, file.data, "pipe")

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``pipe-v1`` data (for ``luoctl inspect``)."""
        info = PipeInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict()}
