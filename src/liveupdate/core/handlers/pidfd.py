"""The pidfd handler (``pidfd-v1``): process handles that survive the update.

Accepts an fd whose ``/proc/self/fd`` link reads ``anon_inode:[pidfd]``
(``pidfd_open()``, ``clone(CLONE_PIDFD)``). luod holds the pidfd itself, so
after the update it still refers to the same process: it can be polled for
exit, signalled with ``pidfd_send_signal()``, or waited for with
``waitid(P_PIDFD)`` by the process's parent. A pid alone could have been
reused meanwhile; a pidfd cannot.

Handler data, little-endian::

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
import struct
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    describe_record,
    fd_link,
    fdinfo,
    open_flags,
)

__all__ = ["PidfdHandler", "PidfdInfo"]

COMPATIBLE = "pidfd-v1"
LINK = "anon_inode:[pidfd]"
_DATA = struct.Struct("<BBHiI")


@dataclass(frozen=True)
class PidfdInfo:
    """What ``pidfd-v1`` records about a pidfd."""

    pid: int
    flags: int

    @classmethod
    def of(cls, fd: int) -> PidfdInfo:
        info = fdinfo(fd)
        try:
            pid = int(info["Pid"])
        except (KeyError, ValueError):
            raise OSError(errno.EINVAL, "fdinfo has no Pid") from None
        return cls(pid, open_flags(info))

    def encode(self) -> bytes:
        return _DATA.pack(FORMAT_VERSION, 0, 0, self.pid, self.flags)

    @classmethod
    def decode(cls, data: bytes) -> PidfdInfo:
        """Parse ``pidfd-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _DATA.size, COMPATIBLE)
        if len(data) != _DATA.size:
            raise ValueError(f"{COMPATIBLE} data of {len(data)} bytes, expected {_DATA.size}")
        _v, _r1, _r2, pid, flags = _DATA.unpack(data)
        return cls(pid, flags)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pidfd", "pid": self.pid, "nonblock": bool(self.flags & os.O_NONBLOCK)}


class PidfdHandler(FileHandler):
    """Preserves pidfds by holding them open."""

    compatible = COMPATIBLE

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return fd_link(fd) == LINK

    def freeze(self, file: PreservedFile) -> bytes:
        return PidfdInfo.of(file.fd).encode()

    def restore(self, file: PreservedFile) -> None:
        recorded = decode_record(PidfdInfo, file.data)
        if fd_link(file.fd) != LINK:
            raise OSError(errno.EINVAL, "inherited fd is not a pidfd")
        now = PidfdInfo.of(file.fd)
        # A pidfd's pid never changes; it only turns to -1 once reaped.
        if recorded.pid > 0 and now.pid not in (recorded.pid, -1):
            raise OSError(errno.EINVAL, f"inherited pidfd is pid {now.pid}, not {recorded.pid}")

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        return describe_record(PidfdInfo, file.fd, file.data, "pidfd")

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``pidfd-v1`` data (for ``luoctl inspect``)."""
        info = PidfdInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict(), "flags": info.flags}
