"""The file handler (``file-v1``): open regular files and directories.

Accepts a regular file or a directory that the memfd handler (asked first)
did not take: a file on disk, a named tmpfs file, an open directory. luod
holds the open file itself, so its position, flags and any lock owned by the
open file description carry over, and a file unlinked meanwhile stays
reachable. ``O_PATH`` fds are refused (the core already answers ``EBADF``
for them), and so is every other kind of file: character and block devices
(``/dev/null``), symlinks...

Handler data (:class:`liveupdate.handler_abi.FileRecord`), little-endian::

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
from typing import Any

from liveupdate.core.file import PreservedFile
from liveupdate.core.handlers._proc import fd_link, fd_link_bytes, fdinfo, open_flags
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import FileRecord
from liveupdate.handler_abi.records import FILE_DIRECTORY, FILE_KINDS, FILE_REGULAR

__all__ = ["RegularFileHandler", "read_file"]

COMPATIBLE = FileRecord.compatible
_O_PATH = getattr(os, "O_PATH", 0o10000000)


def _kind(st: os.stat_result) -> int:
    if stat.S_ISREG(st.st_mode):
        return FILE_REGULAR
    if stat.S_ISDIR(st.st_mode):
        return FILE_DIRECTORY
    return 0


def read_file(fd: int, path: bytes | None = None) -> FileRecord:
    """What ``file-v1`` records about the open file ``fd``; ``path``
    defaults to its current ``/proc/self/fd`` link."""
    st = os.fstat(fd)
    info = fdinfo(fd)
    try:
        position = int(info.get("pos", "0"))
    except ValueError:
        position = 0
    link = fd_link_bytes(fd) if path is None else path
    return FileRecord(_kind(st), open_flags(info), position, st.st_dev, st.st_ino, link)


class RegularFileHandler(RecordHandler[FileRecord]):
    """Preserves open regular files and directories by holding them open."""

    compatible = COMPATIBLE
    record = FileRecord

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
        # The path at preserve time: where the file was when it was handed in.
        file.state["path"] = fd_link_bytes(file.fd)

    def capture(self, file: PreservedFile) -> FileRecord:
        path = file.state.get("path")
        return read_file(file.fd, path if isinstance(path, bytes) else None)

    def check(self, file: PreservedFile, recorded: FileRecord) -> None:
        st = os.fstat(file.fd)
        if _kind(st) != recorded.file_kind:
            raise OSError(errno.EINVAL, f"inherited fd is not a {FILE_KINDS[recorded.file_kind]}")
        if (st.st_dev, st.st_ino) != (recorded.dev, recorded.inode):
            raise OSError(
                errno.EINVAL,
                f"inherited file is {st.st_dev}:{st.st_ino}, not {recorded.dev}:{recorded.inode}",
            )

    def describe_live(self, file: PreservedFile) -> dict[str, Any]:
        record = self.capture(file)
        desc = record.to_dict()
        if record.file_kind == FILE_REGULAR:
            desc["size"] = os.fstat(file.fd).st_size
        return desc
