"""The PTY handler (``pty-v1``): pseudo-terminal masters.

Accepts a PTY master: a character device of major 5, minor 2 (what an open
of ``/dev/ptmx`` or ``/dev/pts/ptmx`` returns, e.g. ``os.openpty()``'s first
fd). luod holds the master, so the terminal stays up across the update: the
processes on its slave (``/dev/pts/N``) keep running, see no hangup, and
bytes in either direction stay queued. Slaves themselves are not accepted.

Handler data, little-endian::

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
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, FileKey, PreservedFile
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    describe_record,
    fdinfo,
    open_flags,
)

__all__ = ["PtyHandler", "PtyInfo", "pts_index"]

COMPATIBLE = "pty-v1"
PTMX_MAJOR = 5
PTMX_MINOR = 2
TIOCGPTN = 0x80045430
_DATA = struct.Struct("<BBHII")


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


@dataclass(frozen=True)
class PtyInfo:
    """What ``pty-v1`` records about a PTY master."""

    index: int
    flags: int

    @classmethod
    def of(cls, fd: int) -> PtyInfo:
        return cls(pts_index(fd), open_flags(fdinfo(fd)))

    def encode(self) -> bytes:
        return _DATA.pack(FORMAT_VERSION, 0, 0, self.index, self.flags)

    @classmethod
    def decode(cls, data: bytes) -> PtyInfo:
        """Parse ``pty-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _DATA.size, COMPATIBLE)
        if len(data) != _DATA.size:
            raise ValueError(f"{COMPATIBLE} data of {len(data)} bytes, expected {_DATA.size}")
        _v, _r1, _r2, index, flags = _DATA.unpack(data)
        return cls(index, flags)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pty", "pts": self.index, "path": f"/dev/pts/{self.index}"}


class PtyHandler(FileHandler):
    """Preserves PTY masters by holding them open."""

    compatible = COMPATIBLE

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

    def freeze(self, file: PreservedFile) -> bytes:
        return PtyInfo.of(file.fd).encode()

    def restore(self, file: PreservedFile) -> None:
        recorded = decode_record(PtyInfo, file.data)
        if not is_pty_master(os.fstat(file.fd)):
            raise OSError(errno.EINVAL, "inherited fd is not a PTY master")
        index = pts_index(file.fd)
        if index != recorded.index:
            raise OSError(
                errno.EINVAL, f"inherited PTY master is pts {index}, not {recorded.index}"
            )

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        return describe_record(PtyInfo, file.fd, file.data, "pty")

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``pty-v1`` data (for ``luoctl inspect``)."""
        info = PtyInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict(), "flags": info.flags}
