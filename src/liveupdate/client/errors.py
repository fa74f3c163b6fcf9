"""Errors of the client library: :class:`OSError` subclasses carrying the errno.

Every failed call raises a :class:`LiveUpdateError` whose ``errno`` is the
one the kernel (or luod) answered, whichever transport was used. Where
Python has a matching built-in subclass the error also derives from it, so
``except FileExistsError`` and ``except liveupdate.AlreadyExistsError`` both
catch a duplicate session name.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "AlreadyExistsError",
    "BadFileError",
    "DeviceBusyError",
    "InvalidArgumentError",
    "LiveUpdateError",
    "NoSpaceError",
    "NotFoundError",
    "NotSupportedError",
    "OutOfResourcesError",
    "PermissionDeniedError",
    "RestoreFailedError",
    "StaleGenerationError",
    "StructTooBigError",
    "error_from_errno",
]


class LiveUpdateError(OSError):
    """Base of every error the library raises for a failed LUO call."""


class DeviceBusyError(LiveUpdateError):
    """EBUSY: the device is open elsewhere, the file is already preserved, or
    a file refuses to finish yet."""


class NotFoundError(LiveUpdateError, FileNotFoundError):
    """ENOENT: no such session or token, or no handler for this kind of file."""


class AlreadyExistsError(LiveUpdateError, FileExistsError):
    """EEXIST: the session name or the token is already in use."""


class InvalidArgumentError(LiveUpdateError):
    """EINVAL: a field is wrong, or the call does not fit the session's direction."""


class NotSupportedError(LiveUpdateError):
    """ENOTTY or EOPNOTSUPP: the ioctl, or a value in it, is not supported."""


class StructTooBigError(LiveUpdateError):
    """E2BIG: non-zero bytes beyond what the implementation understands."""


class BadFileError(LiveUpdateError):
    """EBADF: the fd to preserve is not a usable open file."""


class NoSpaceError(LiveUpdateError):
    """ENOSPC: the session holds the maximum number of files."""


class OutOfResourcesError(LiveUpdateError):
    """ENOMEM or EMFILE: a limit was reached (sessions, memory, fds)."""


class StaleGenerationError(LiveUpdateError):
    """ENODEV: the fd belongs to a generation of luod that has since rebooted."""


class RestoreFailedError(LiveUpdateError):
    """EIO: the incoming handover state could not be restored."""


class PermissionDeniedError(LiveUpdateError, PermissionError):
    """EACCES: the caller may not use this session."""


_BY_ERRNO: dict[int, type[LiveUpdateError]] = {
    errno.EBUSY: DeviceBusyError,
    errno.ENOENT: NotFoundError,
    errno.EEXIST: AlreadyExistsError,
    errno.EINVAL: InvalidArgumentError,
    errno.ENOTTY: NotSupportedError,
    errno.EOPNOTSUPP: NotSupportedError,
    errno.E2BIG: StructTooBigError,
    errno.EBADF: BadFileError,
    errno.ENOSPC: NoSpaceError,
    errno.ENOMEM: OutOfResourcesError,
    errno.EMFILE: OutOfResourcesError,
    errno.ENODEV: StaleGenerationError,
    errno.EIO: RestoreFailedError,
    errno.EACCES: PermissionDeniedError,
}


def error_from_errno(err: int, what: str = "") -> LiveUpdateError:
    """The :class:`LiveUpdateError` subclass for ``err``, with a readable message."""
    cls = _BY_ERRNO.get(err, LiveUpdateError)
    message = os.strerror(err)
    if what:
        message = f"{what}: {message}"
    return cls(err, message)
