"""The base of handlers whose data is one record of :mod:`liveupdate.handler_abi`.

Every built-in handler preserves the open file itself and writes, at
freeze, one record describing it. What differs between them is how the
live file is read (:meth:`RecordHandler.capture`) and what the next
generation checks on the inherited fd (:meth:`RecordHandler.check`); the
rest is here once: freeze encodes the captured record, restore decodes the
data (malformed is ``EINVAL``) then checks, describe reads the live file
while luod holds it and the recorded data otherwise, and describe_data
decodes for ``luoctl inspect``.
"""

from __future__ import annotations

import errno
from abc import abstractmethod
from typing import Any, Generic, TypeVar

from liveupdate.core.file import FileHandler, PreservedFile
from liveupdate.handler_abi import HandlerRecord

__all__ = ["RecordHandler"]

R = TypeVar("R", bound=HandlerRecord)


class RecordHandler(FileHandler, Generic[R]):
    """A handler whose data is one :class:`~liveupdate.handler_abi.HandlerRecord`.

    Subclasses set :attr:`record` and :attr:`compatible` (the record's) and
    implement :meth:`~FileHandler.can_preserve` and
    :meth:`capture`; most override :meth:`check`.
    """

    #: The record type this handler writes.
    record: type[R]

    @abstractmethod
    def capture(self, file: PreservedFile) -> R:
        """Read the live file ``file.fd`` into a record; never changes the file."""

    def check(self, file: PreservedFile, recorded: R) -> None:
        """Raise :class:`OSError` unless the inherited ``file.fd`` is the file recorded."""

    def decode(self, data: bytes) -> R:
        """The record in ``data``, malformed data being ``EINVAL`` (for restore)."""
        try:
            return self.record.decode(data)
        except ValueError as exc:
            raise OSError(errno.EINVAL, str(exc)) from None

    def freeze(self, file: PreservedFile) -> bytes:
        try:
            return self.capture(file).encode()
        except ValueError as exc:  # a live value the layout cannot hold
            raise OSError(errno.EINVAL, str(exc)) from None

    def restore(self, file: PreservedFile) -> None:
        self.check(file, self.decode(file.data))

    def describe_live(self, file: PreservedFile) -> dict[str, Any]:
        """The description of a file luod holds (``file.fd`` open)."""
        return self.capture(file).to_dict()

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        # A listing never fails because one file cannot be inspected.
        try:
            if file.fd >= 0:
                return self.describe_live(file)
            return self.record.decode(file.data).to_dict()
        except (OSError, ValueError):
            return {"type": self.record.kind}

    def describe_data(self, data: bytes) -> dict[str, Any]:
        """Everything ``data`` says; :class:`ValueError` when it is malformed."""
        return self.record.decode(data).describe_data()
