"""The file handler (``file-v1``): open regular files and directories.

Accepts a regular file or a directory that the memfd handler (asked first)
did not take: a file on disk, a named tmpfs file, an open directory. luod
holds the open file itself, so its position, flags and any lock owned by the
open file description carry over, and a file unlinked meanwhile stays
reachable. ``O_PATH`` fds are refused (the core already answers ``EBADF``
for them), and so is every other kind of file: character and block devices
(``/dev/null``), symlinks...

Handler data, little-endian::

    offset  size  field
    0       1     format version (1)
    1       1     kind: 1 regular file, 2 directory
    2       2     reserved, 0
    4       4     open flags (fdinfo "flags": access mode, O_APPEND,
                  O_NONBLOCK, O_DIRECT...; O_CLOEXEC dropped)
    8       8     file position at freeze (fdinfo "pos")
    16      8     st_dev
    24      8     st_ino
    32      2+N   path: u16 length N, then the target of /proc/self/fd/N at
                  preserve time (" (deleted)" appended by the kernel if the
                  file had already been unlinked)

The path is informational: it is where the file was, not how it is found
again (the inherited fd is the file). The next generation checks that the
inherited fd is still the same kind of file with the same ``st_dev`` and
``st_ino``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile
from liveupdate.core.handlers._proc import (
    FORMAT_VERSION,
    check_header,
    decode_record,
    fd_link,
    fd_link_bytes,
    fdinfo,
    open_flags,
    pack_bytes,
    unpack_bytes,
)

__all__ = ["FileInfo", "RegularFileHandler"]

COMPATIBLE = "file-v1"
REGULAR = 1
DIRECTORY = 2
_KINDS = {REGULAR: "file", DIRECTORY: "directory"}
_HEADER = struct.Struct("<BBHIQQQ")
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _kind(st: os.stat_result) -> int:
    if stat.S_ISREG(st.st_mode):
        return REGULAR
    if stat.S_ISDIR(st.st_mode):
        return DIRECTORY
    return 0


@dataclass(frozen=True)
class FileInfo:
    """What ``file-v1`` records about an open file or directory."""

    kind: int
    flags: int
    position: int
    dev: int
    inode: int
    path: bytes

    @classmethod
    def of(cls, fd: int, path: bytes | None = None) -> FileInfo:
        """Read the open file behind ``fd``; ``path`` defaults to its current link."""
        st = os.fstat(fd)
        info = fdinfo(fd)
        try:
            position = int(info.get("pos", "0"))
        except ValueError:
            position = 0
        return cls(
            _kind(st),
            open_flags(info),
            position,
            st.st_dev,
            st.st_ino,
            fd_link_bytes(fd) if path is None else path,
        )

    def encode(self) -> bytes:
        header = _HEADER.pack(
            FORMAT_VERSION, self.kind, 0, self.flags, self.position, self.dev, self.inode
        )
        return header + pack_bytes(self.path)

    @classmethod
    def decode(cls, data: bytes) -> FileInfo:
        """Parse ``file-v1`` data; :class:`ValueError` when malformed."""
        check_header(data, _HEADER.size, COMPATIBLE)
        _v, kind, _reserved, flags, position, dev, inode = _HEADER.unpack_from(data)
        if kind not in _KINDS:
            raise ValueError(f"{COMPATIBLE} data: unknown kind {kind}")
        path, offset = unpack_bytes(data, _HEADER.size)
        if offset != len(data):
            raise ValueError(f"{COMPATIBLE} data has {len(data) - offset} trailing bytes")
        return cls(kind, flags, position, dev, inode, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": _KINDS.get(self.kind, str(self.kind)),
            "path": self.path.decode("utf-8", "backslashreplace"),
            "position": self.position,
            "flags": self.flags,
            "dev": self.dev,
            "inode": self.inode,
        }


class RegularFileHandler(FileHandler):
    """Preserves open regular files and directories by holding them open."""

    compatible = COMPATIBLE

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        if not _kind(st):
            return False
        # Anonymous-inode files (a pidfd on some kernels) may look regular;
        # they belong to their own handlers.
        if fd_link(fd).startswith("anon_inode:"):
            return False
        try:
            return not fcntl.fcntl(fd, fcntl.F_GETFL) & _O_PATH
        except OSError:
            return False

    def preserve(self, file: PreservedFile) -> None:
        file.state["path"] = fd_link_bytes(file.fd)

    def freeze(self, file: PreservedFile) -> bytes:
        path = file.state.get("path")
        return FileInfo.of(file.fd, path if isinstance(path, bytes) else None).encode()

    def restore(self, file: PreservedFile) -> None:
        info = decode_record(FileInfo, file.data)
        st = os.fstat(file.fd)
        if _kind(st) != info.kind:
            raise OSError(errno.EINVAL, f"inherited fd is not a {_KINDS[info.kind]}")
        if (st.st_dev, st.st_ino) != (info.dev, info.inode):
            raise OSError(
                errno.EINVAL,
                f"inherited file is {st.st_dev}:{st.st_ino}, not {info.dev}:{info.inode}",
            )

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        try:
            if file.fd >= 0:
                path = file.state.get("path")
                info = FileInfo.of(file.fd, path if isinstance(path, bytes) else None)
                desc = info.to_dict()
                if info.kind == REGULAR:
                    desc["size"] = os.fstat(file.fd).st_size
                return desc
            return FileInfo.decode(file.data).to_dict()
        except (OSError, ValueError):
            return {"type": "file"}

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``file-v1`` data (for ``luoctl inspect``)."""
        info = FileInfo.decode(data)
        return {"version": FORMAT_VERSION, **info.to_dict()}
