"""A session's files, the file handler interface, and what counts as preserved.

The analog of ``kernel/liveupdate/luo_file.c``. A *file handler* knows how to
keep one kind of open file alive across a live update (memfd, socket,
pipe...). Handlers are asked in registration order; the first whose
:meth:`FileHandler.can_preserve` accepts a file preserves it.

This module owns two pieces of state, each in one class:

* :class:`FileSet`, one session's files in preservation order: preserve,
  unpreserve, retrieve, finish, freeze (rolled back when one fails) and
  unfreeze, and their serialization to and from the handover image's
  :class:`~liveupdate.handover_abi.FileRecord` (``luo_file_set`` and its
  ``luo_file_*`` functions);
* :class:`PreservedFiles`, the table of every file that *counts as
  preserved*, by identity, which makes a second PRESERVE_FD of the same file
  ``EBUSY`` in any session. The orchestrator owns the one table and hands it
  to each :class:`FileSet` when it is made.

The core keeps its own reference to every preserved file: the fd received
from the caller becomes the orchestrator's, so the caller may close its own.
Across a re-exec that fd is inherited, which is what "preserving" means for a
userspace holder; the handler's serialized data travels in the handover
image next to it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, ItemsView, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from liveupdate.handover_abi import FileRecord

_O_PATH = getattr(os, "O_PATH", 0o10000000)

__all__ = [
    "FileHandler",
    "FileKey",
    "FileSet",
    "FreezeHook",
    "HandlerRegistry",
    "PreservedFile",
    "PreservedFiles",
    "file_key",
    "usable_fd",
]

#: Identity of "the same file" for double-preservation checks: device, inode
#: and, for pipes and FIFOs only, the access mode (their two ends share one
#: inode but are different files).
FileKey = tuple[int, int, int]


def file_key(fd: int, st: os.stat_result) -> FileKey:
    """The :data:`FileKey` of an open fd."""
    mode = 0
    if stat.S_ISFIFO(st.st_mode):
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    return (st.st_dev, st.st_ino, mode)


@dataclass(eq=False)
class PreservedFile:
    """One file in a session.

    Attributes:
        token: The caller's 64-bit key for it.
        handler: The handler that preserves it.
        fd: The orchestrator's own reference (close-on-exec, inherited only
            by a reboot's exec). ``-1`` once released.
        key: Its identity for the "already preserved" check.
        data: The handler's serialized state: captured at freeze in the old
            generation, read from the handover image in the new one.
        state: Free-form handler state kept between operations.
        retrieved: An incoming file handed back at least once.
        retrieve_errno: A failed retrieval is sticky: the errno it failed with.
    """

    token: int
    handler: FileHandler
    fd: int
    key: FileKey
    data: bytes = b""
    state: dict[str, Any] = field(default_factory=dict)
    retrieved: bool = False
    retrieve_errno: int = 0
    #: Bytes charged to its owner's memory quota (:meth:`FileHandler.charged_bytes`).
    charge: int = 0

    def release(self) -> None:
        """Drop the orchestrator's reference (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FileHandler(ABC):
    """A kind of file the orchestrator can preserve.

    Subclasses set :attr:`compatible`, a versioned string written into the
    handover image (``"memfd-v1"``): the next generation picks the handler by
    it, and a handler that changes its data format must change the version.
    Operations report failure by raising :class:`OSError` with an errno of
    the contract. Every operation has a harmless default except
    :meth:`can_preserve`.
    """

    compatible: str = ""

    @abstractmethod
    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        """Whether this handler takes the open file ``fd`` (already fstat'ed)."""

    def file_key(self, fd: int, st: os.stat_result) -> FileKey:
        """The identity of the file for the "already preserved" check.

        The default is the inode (plus the access mode of a pipe end). A kind
        of file whose instances share one inode (every eventfd, every PTY
        master) overrides it with something that tells them apart.
        """
        return file_key(fd, st)

    def charged_bytes(self, fd: int, st: os.stat_result) -> int:
        """Memory this file keeps pinned while luod holds it, charged to the
        owner's ``--max-memfd-bytes-per-uid`` quota; measured once, when it is
        preserved. The default, 0, is for files whose memory is not pinned
        by holding them (a file on disk, a socket)."""
        return 0

    def preserve(self, file: PreservedFile) -> None:
        """The file joins an outgoing session."""

    def unpreserve(self, file: PreservedFile) -> None:
        """The file leaves its outgoing session (closed session)."""

    def freeze(self, file: PreservedFile) -> bytes:
        """Capture the state to hand over; the bytes go into the image."""
        return b""

    def unfreeze(self, file: PreservedFile) -> None:
        """Undo :meth:`freeze` after another file's freeze failed."""

    def restore(self, file: PreservedFile) -> None:
        """In the new generation, check ``file.data`` against the inherited ``file.fd``.

        Raising here makes the whole handover image unrestorable (EIO).
        """

    def retrieve(self, file: PreservedFile) -> None:
        """Called on the first RETRIEVE_FD; an error is sticky."""

    def can_finish(self, file: PreservedFile) -> bool:
        """Whether the file may be finished now; ``False`` makes FINISH EBUSY."""
        return True

    def finish(self, file: PreservedFile) -> None:
        """The incoming session is finished (the file may never have been retrieved)."""

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        """A JSON-friendly description of a held file, for listings and ``luoctl``."""
        return {}

    def describe_data(self, data: bytes) -> dict[str, Any] | None:
        """A JSON-friendly description of this handler's ``data`` as found in
        a handover image, without the file (``luoctl inspect``).

        ``None`` (the default): this handler cannot decode its data offline.
        Malformed data raises (any exception: the caller reports it).
        """
        return None


class HandlerRegistry:
    """Handlers in registration order, also looked up by compatible string."""

    def __init__(self, handlers: Iterable[FileHandler] = ()) -> None:
        self._handlers: list[FileHandler] = []
        self._by_compatible: dict[str, FileHandler] = {}
        for handler in handlers:
            self.register(handler)

    def register(self, handler: FileHandler) -> None:
        """Append ``handler``; its compatible string must be new."""
        if not handler.compatible:
            raise ValueError(f"{type(handler).__name__} has no compatible string")
        if handler.compatible in self._by_compatible:
            raise ValueError(f"handler {handler.compatible!r} registered twice")
        self._handlers.append(handler)
        self._by_compatible[handler.compatible] = handler

    def __iter__(self) -> Iterator[FileHandler]:
        return iter(self._handlers)

    def find(self, fd: int, st: os.stat_result) -> FileHandler:
        """The first handler that accepts the file; ``ENOENT`` when none does."""
        for handler in self._handlers:
            if handler.can_preserve(fd, st):
                return handler
        raise OSError(errno.ENOENT, "no handler can preserve this kind of file")

    def by_compatible(self, compatible: str) -> FileHandler | None:
        """The handler for a compatible string read from an image, if known."""
        return self._by_compatible.get(compatible)

    @property
    def compatibles(self) -> list[str]:
        """Every registered compatible string, in registration order."""
        return list(self._by_compatible)


def usable_fd(fds_in: list[int]) -> tuple[int, os.stat_result]:
    """The one fd attached to PRESERVE_FD, fstat'ed, else ``EBADF``."""
    if len(fds_in) != 1:
        raise OSError(errno.EBADF, f"{len(fds_in)} fds attached, expected 1")
    fd = fds_in[0]
    try:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & _O_PATH:
            raise OSError(errno.EBADF, "an O_PATH fd cannot be preserved")
        return fd, os.fstat(fd)
    except OSError as exc:
        raise OSError(errno.EBADF, exc.strerror or "bad fd") from None


#: Called after each file's freeze (the reboot host's: fault injection in
#: tests, progress).
FreezeHook = Callable[[PreservedFile], None]


class PreservedFiles:
    """Every file that counts as preserved now, by identity.

    A file counts from its PRESERVE_FD until it is unpreserved or its session
    is released or handed over, and again from its first RETRIEVE_FD until
    its session finishes (C21): each such *holder* is listed under its
    :data:`FileKey`, and the identity is free again once none is left.
    """

    def __init__(self) -> None:
        self._by_key: dict[FileKey, list[PreservedFile]] = {}

    def holders(self, key: FileKey) -> list[PreservedFile]:
        """The files of identity ``key`` that count as preserved now (a copy)."""
        return list(self._by_key.get(key, ()))

    def hold(self, file: PreservedFile) -> None:
        """``file`` counts as preserved (idempotent)."""
        held = self._by_key.setdefault(file.key, [])
        if not any(h is file for h in held):
            held.append(file)

    def let_go(self, file: PreservedFile) -> None:
        """``file`` no longer counts as preserved; others of its identity still may."""
        held = self._by_key.get(file.key)
        if held is None:
            return
        held[:] = [h for h in held if h is not file]
        if not held:
            del self._by_key[file.key]

    def __len__(self) -> int:
        """How many identities are held."""
        return len(self._by_key)

    def clear(self) -> None:
        """Nothing counts any more (the orchestrator's shutdown)."""
        self._by_key.clear()


class FileSet(Mapping[int, PreservedFile]):
    """One session's files, by token, in preservation order.

    Read like a mapping (``files[token]``, ``files.values()``, ``len(files)``);
    changed only through its methods, which keep the :class:`PreservedFiles`
    table given at construction in step. The checks that need more than one
    session (quotas, busy files elsewhere) are the session set's; the ones
    here concern this set alone.
    """

    def __init__(self, table: PreservedFiles) -> None:
        self._table = table
        self._files: dict[int, PreservedFile] = {}
        #: Sum of the files' charges, kept by the methods that add or drop files.
        self._charge = 0

    def __getitem__(self, token: int) -> PreservedFile:
        return self._files[token]

    def __iter__(self) -> Iterator[int]:
        return iter(self._files)

    def items(self) -> ItemsView[int, PreservedFile]:
        """(token, file) in preservation order, read-only (no lookup per token)."""
        return self._files.items()

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"<FileSet tokens={[hex(t) for t in self._files]}>"

    @property
    def charge(self) -> int:
        """Bytes charged to the owner's memory quota for these files."""
        return self._charge

    def fds(self) -> list[int]:
        """The orchestrator's fd of every file, in preservation order."""
        return [f.fd for f in self._files.values()]

    # -- outgoing: preserve and unpreserve --------------------------------------

    def check_token(self, token: int, max_files: int) -> None:
        """``EEXIST`` for a token in use, ``ENOSPC`` when the set is full."""
        if token in self._files:
            raise OSError(errno.EEXIST, f"token {token:#x} already used in this session")
        if len(self._files) >= max_files:
            raise OSError(errno.ENOSPC, f"session holds {max_files} files")

    def preserve(
        self, token: int, handler: FileHandler, fd: int, key: FileKey, charge: int
    ) -> PreservedFile:
        """Ask ``handler`` to preserve ``fd``; on success the fd is the set's."""
        file = PreservedFile(token, handler, fd, key, charge=charge)
        handler.preserve(file)
        self._files[token] = file
        self._charge += charge
        self._table.hold(file)
        return file

    def unpreserve(self, token: int) -> None:
        """Drop one file (``ENOENT`` for an unknown token)."""
        file = self._files.pop(token, None)
        if file is None:
            raise OSError(errno.ENOENT, f"no file with token {token:#x}")
        self._charge -= file.charge
        try:
            file.handler.unpreserve(file)
        finally:
            self._forget(file)

    def unpreserve_all(self) -> None:
        """Drop every file, last preserved first (a released outgoing session).

        Every file is released even when a handler fails; the first failure
        is re-raised afterwards.
        """
        files = list(reversed(self._files.values()))
        self._files.clear()
        self._charge = 0
        failure: BaseException | None = None
        for file in files:
            try:
                file.handler.unpreserve(file)
            except BaseException as exc:  # re-raised below, once all are released
                failure = failure or exc
            finally:
                self._forget(file)
        if failure is not None:
            raise failure

    def _forget(self, file: PreservedFile) -> None:
        """The file no longer counts as preserved; luod drops its reference."""
        self._table.let_go(file)
        file.release()

    # -- the reboot: freeze and unfreeze ----------------------------------------

    def freeze(self, hook: FreezeHook | None = None) -> None:
        """Freeze every file in order, keeping each handler's data; when one
        fails, unfreeze those done (last first) and re-raise: nothing changed."""
        frozen: list[PreservedFile] = []
        try:
            for file in self._files.values():
                file.data = file.handler.freeze(file)
                frozen.append(file)
                if hook is not None:
                    hook(file)
        except BaseException:
            _unfreeze(frozen)
            raise

    def unfreeze(self) -> None:
        """Undo :meth:`freeze` (a reboot that could not proceed)."""
        _unfreeze(list(self._files.values()))

    def let_go_all(self) -> None:
        """None of the files counts as preserved any more, but all stay held
        (the session was handed over: they count again once retrieved)."""
        for file in self._files.values():
            self._table.let_go(file)

    def to_records(self) -> list[FileRecord]:
        """The image records of the files, with their data as last frozen."""
        return [
            FileRecord(f.token, f.handler.compatible, f.fd, f.data) for f in self._files.values()
        ]

    def restore(self, records: Iterable[FileRecord], registry: HandlerRegistry, where: str) -> None:
        """Fill an empty set from image records and the inherited fds they name.

        Each handler, looked up by compatible string, checks its data against
        its fd. ``OSError(EIO)`` naming ``where`` (the session) and the token
        when anything does not fit; nothing is closed then, so a fixed
        version can try again with the same fds. Restored files do not count
        as preserved until they are retrieved.
        """
        try:
            for rec in records:
                where_file = f"{where} token {rec.token:#x}"
                self._files[rec.token] = _restore_file(rec, registry, where_file)
        finally:
            self._charge = sum(f.charge for f in self._files.values())

    def make_private(self) -> None:
        """The inherited fds become the orchestrator's alone (close-on-exec)."""
        for file in self._files.values():
            os.set_inheritable(file.fd, False)

    # -- incoming: retrieve and finish ------------------------------------------

    def retrieve(self, token: int) -> int:
        """A new fd (a dup) for the file ``token``; a failed retrieval is sticky."""
        file = self._files.get(token)
        if file is None:
            raise OSError(errno.ENOENT, f"no file with token {token:#x}")
        if file.retrieve_errno:
            raise OSError(file.retrieve_errno, "an earlier retrieval of this file failed")
        if not file.retrieved:
            try:
                file.handler.retrieve(file)
            except OSError as exc:
                file.retrieve_errno = exc.errno or errno.EIO
                raise
            file.retrieved = True
            # From now on the file counts as preserved until FINISH (C21), even
            # if another session preserved it meanwhile and lets go first.
            self._table.hold(file)
        return os.dup(file.fd)

    def refusing_to_finish(self) -> PreservedFile | None:
        """The first file whose handler says it cannot finish yet, if any."""
        for file in self._files.values():
            if not file.handler.can_finish(file):
                return file
        return None

    def finish(self) -> None:
        """Finish every file, even one that refuses (ask first with
        :meth:`refusing_to_finish`); each is then let go and released."""
        for file in list(self._files.values()):
            try:
                file.handler.finish(file)
            finally:
                self._forget(file)

    def release(self) -> None:
        """Close every fd without asking the handlers (shutdown, or an incoming
        session the reboot drops: its files die with the old generation)."""
        for file in self._files.values():
            file.release()


def _unfreeze(files: list[PreservedFile]) -> None:
    """Undo freezes in reverse order (a failing unfreeze does not stop the others)."""
    for file in reversed(files):
        try:
            file.handler.unfreeze(file)
        except OSError:
            pass


def _restore_file(rec: FileRecord, registry: HandlerRegistry, where: str) -> PreservedFile:
    """One incoming file from its record and inherited fd, checked by its handler."""
    handler = registry.by_compatible(rec.compatible)
    if handler is None:
        known = ", ".join(registry.compatibles)
        raise OSError(
            errno.EIO,
            f"{where}: no handler {rec.compatible!r} in this version (known: {known})",
        )
    try:
        st = os.fstat(rec.fd)
    except OSError:
        raise OSError(errno.EIO, f"{where}: inherited fd {rec.fd} is not open") from None
    file = PreservedFile(
        rec.token,
        handler,
        rec.fd,
        handler.file_key(rec.fd, st),
        rec.data,
        charge=handler.charged_bytes(rec.fd, st),
    )
    try:
        handler.restore(file)
    except OSError as exc:
        raise OSError(
            errno.EIO, f"{where}: {rec.compatible} cannot restore: {exc.strerror}"
        ) from None
    return file
