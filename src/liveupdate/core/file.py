"""Preserved files and the file handler interface.

The analog of ``kernel/liveupdate/luo_file.c``. A *file handler* knows how to
keep one kind of open file alive across a live update (memfd, socket,
pipe...). Handlers are asked in registration order; the first whose
:meth:`FileHandler.can_preserve` accepts a file preserves it.

The core keeps its own reference to every preserved file: the fd received
from the caller becomes the orchestrator's, so the caller may close its own.
Across a re-exec that fd is inherited, which is what "preserving" means for a
userspace holder; the handler's serialized data travels in the handover
image next to it.
"""

from __future__ import annotations

import errno
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FileHandler", "FileKey", "HandlerRegistry", "PreservedFile", "file_key"]

#: Identity of "the same file" for double-preservation checks: device, inode
#: and, for pipes and FIFOs only, the access mode (their two ends share one
#: inode but are different files).
FileKey = tuple[int, int, int]


def file_key(fd: int, st: os.stat_result) -> FileKey:
    """The :data:`FileKey` of an open fd."""
    mode = 0
    if stat.S_ISFIFO(st.st_mode):
        import fcntl

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
    #: The session holding it (a ``Session``; typed loosely to keep this
    #: module free of the session concept).
    session: Any = None
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
        """A JSON-friendly description for listings and ``luoctl``."""
        return {}


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
