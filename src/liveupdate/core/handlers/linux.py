"""What files ``luod --compat=linux`` preserves, and how, to behave as Linux 7.3.

Linux preserves one kind of file, through ``mm/memfd_luo.c``: an unlinked
shmem file (a memfd, an ``O_TMPFILE`` or an unlinked file on tmpfs). Every
other file is ``ENOENT``, hugetlb memfds included. While it is preserved, the
file's size is locked (``ftruncate``, a write past the end: ``EPERM``). The
next kernel fills a *new* shmem file with the contents: it has no name
(``/proc`` shows ``/ (deleted)``), the position and the seals the file had
when it was preserved, and no size lock.

:class:`LinuxMemfdHandler` reproduces what userspace can:

* the size lock is the seals ``F_SEAL_GROW | F_SEAL_SHRINK``, added at
  PRESERVE_FD when the memfd allows sealing. Seals are permanent: the lock
  outlives an unpreserve, and a memfd made without ``MFD_ALLOW_SEALING``
  (or an ``O_TMPFILE``) cannot be locked at all;
* in the next generation the inherited file is replaced by a copy in a new
  memfd named ``""`` (``/memfd: (deleted)``: a memfd's name always starts
  with ``memfd:``), with the recorded position and the seals recorded at
  PRESERVE_FD (the lock luod added is not among them), so it can grow again.

:class:`LinuxRegistry` asks that handler alone when a file is preserved; the
other handlers stay registered so that an image holding other kinds of files
(written by luod in its own mode before a crash) is still restored whole.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable

from liveupdate.core.file import FileHandler, HandlerRegistry, PreservedFile
from liveupdate.core.handlers import builtin_handlers, load_plugins
from liveupdate.core.handlers.memfd import TMPFS_MAGIC, MemfdHandler, fs_magic
from liveupdate.handler_abi import MemfdRecord

__all__ = ["SIZE_LOCK", "LinuxMemfdHandler", "LinuxRegistry", "linux_registry"]

_F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x0001)
#: The seals that stand for Linux's size lock.
SIZE_LOCK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004)
#: Bytes per copy step when ``copy_file_range`` cannot copy between the two files.
_CHUNK = 1 << 20
#: The key of the seals a file had when it was preserved, in ``PreservedFile.state``.
_SEALS_BEFORE = "seals-before-lock"


def _seals(fd: int) -> int:
    try:
        return int(fcntl.fcntl(fd, _F_GET_SEALS))
    except OSError:
        return _F_SEAL_SEAL  # not a memfd: no seal can be added either


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Bytes ``[start, end)`` of ``src`` to the same offsets of ``dst``; no
    file position moves (the source's is shared with its old holder)."""
    offset = start
    while offset < end:
        try:
            n = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            n = os.pwrite(dst, os.pread(src, min(_CHUNK, end - offset), offset), offset)
        if n == 0:
            return  # the file shrank meanwhile (it could not be locked): done
        offset += n


def _data_ranges(src: int, size: int) -> list[tuple[int, int]]:
    """The ranges of ``src`` that hold data (a sparse memfd stays sparse).

    Asked on a second open of the file (``/proc/self/fd``), whose position is
    its own; the whole file when that cannot be done.
    """
    try:
        probe = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [(0, size)]
    ranges: list[tuple[int, int]] = []
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(probe, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # only a hole is left
                return [(0, size)]
            end = min(os.lseek(probe, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            pos = end
    finally:
        os.close(probe)
    return ranges


def fresh_copy(src: int, position: int, seals: int) -> int:
    """A new memfd named ``""`` with ``src``'s contents, at ``position``,
    sealed with ``seals``: the file Linux's next kernel makes (close-on-exec)."""
    fd = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = os.fstat(src).st_size
        os.ftruncate(fd, size)
        for start, end in _data_ranges(src, size):
            _copy_range(src, fd, start, end)
        os.lseek(fd, position, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, _F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LinuxMemfdHandler(MemfdHandler):
    """``memfd-v1`` as Linux 7.3 preserves it (see the module's docstring).

    Its data is :class:`MemfdRecord`, written as :class:`MemfdHandler` writes
    it, so an image of either mode is restored by the other; the seals it
    records are those the file had when it was preserved.
    """

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        # Linux's shmem_file(): tmpfs, never hugetlbfs.
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 0:
            return False
        try:
            return fs_magic(fd) == TMPFS_MAGIC
        except OSError:
            return False

    def preserve(self, file: PreservedFile) -> None:
        seals = _seals(file.fd)
        file.state[_SEALS_BEFORE] = seals
        if seals & _F_SEAL_SEAL or (seals & SIZE_LOCK) == SIZE_LOCK:
            return  # cannot be sealed (documented), or locked already
        try:
            fcntl.fcntl(file.fd, _F_ADD_SEALS, SIZE_LOCK)
        except OSError:
            pass  # a file that refuses seals stays unlocked, as documented

    def capture(self, file: PreservedFile) -> MemfdRecord:
        record = super().capture(file)
        seals = file.state.get(_SEALS_BEFORE)
        return record if seals is None else MemfdRecord(record.size, record.position, seals)

    def restore(self, file: PreservedFile) -> None:
        recorded = self.decode(file.data)
        self.check(file, recorded)
        if fs_magic(file.fd) != TMPFS_MAGIC:
            return  # a hugetlb memfd of luod's own mode: no copy can hold it
        copy = fresh_copy(file.fd, recorded.position, recorded.seals)
        try:
            # The copy takes the inherited fd's number: a restore that fails
            # later is retried on the same numbers (and copies the copy).
            os.dup2(copy, file.fd, inheritable=os.get_inheritable(file.fd))
        finally:
            os.close(copy)
        file.key = self.file_key(file.fd, os.fstat(file.fd))


class LinuxRegistry(HandlerRegistry):
    """Every handler restores; :class:`LinuxMemfdHandler` alone preserves."""

    def __init__(self, memfd: LinuxMemfdHandler, others: Iterable[FileHandler] = ()) -> None:
        super().__init__([memfd, *others])
        self._memfd = memfd

    def find(self, fd: int, st: os.stat_result) -> FileHandler:
        if self._memfd.can_preserve(fd, st):
            return self._memfd
        raise OSError(errno.ENOENT, "Linux preserves memfds alone (luod --compat=linux)")


def linux_registry(plugins: bool = True) -> LinuxRegistry:
    """The registry of ``luod --compat=linux``: the built-in handlers (the
    memfd handler being Linux's) then, unless ``plugins`` is false, the
    third-party ones, all for restoring only."""
    memfd = LinuxMemfdHandler()
    others = [h for h in builtin_handlers() if h.compatible != memfd.compatible]
    registry = LinuxRegistry(memfd, others)
    if plugins:
        load_plugins(registry)
    return registry
