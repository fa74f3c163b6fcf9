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
import stat
import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from liveupdate import uapi

__all__ = [
    "AlreadyExistsError",
    "BadFileError",
    "DeviceBusyError",
    "InvalidArgumentError",
    "LiveUpdateError",
    "NoSpaceError",
    "NotFoundError",
    "NotSupportedError",
    "OrchestratorIOError",
    "OutOfResourcesError",
    "PermissionDeniedError",
    "StaleGenerationError",
    "StructTooBigError",
    "call_error",
    "error_from_errno",
    "file_kind",
]


class LiveUpdateError(OSError):
    """Base of every error the library raises for a failed LUO call.

    ``strerror`` says what failed and why; when the library knows what to do
    about it, ``hint`` says so (and ends ``strerror`` too, after ``"; "``).
    """

    hint: str = ""
    #: Raised by a batch call (:meth:`~liveupdate.Session.retrieve_many`,
    #: :meth:`~liveupdate.Session.preserve_many`): every call of the batch that
    #: failed, by token, in the batch's order (this error is the first). Empty otherwise.
    failures: Mapping[int, LiveUpdateError] = MappingProxyType({})


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


class OrchestratorIOError(LiveUpdateError):
    """EIO: the orchestrator itself failed, not the call's arguments.

    Three cases answer it: the incoming handover state could not be restored
    (every open fails until a fixed version restores it), a live update's
    pre-flight failed (nothing changed: ``GET_STATE``'s ``last_error`` says
    why), or an internal error. Called ``RestoreFailedError`` before
    version 0.2, a name kept as a deprecated alias.
    """


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
    errno.EIO: OrchestratorIOError,
    errno.EACCES: PermissionDeniedError,
}


#: Old names still importable, with a :class:`DeprecationWarning`.
_DEPRECATED = {"RestoreFailedError": OrchestratorIOError}

if TYPE_CHECKING:
    RestoreFailedError = OrchestratorIOError
else:

    def __getattr__(name: str) -> type[LiveUpdateError]:
        new = _DEPRECATED.get(name)
        if new is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        warnings.warn(
            f"{name} is deprecated: use {new.__name__} (EIO also means a failed pre-flight "
            "or an internal error)",
            DeprecationWarning,
            stacklevel=2,
        )
        return new


def error_from_errno(
    err: int, what: str = "", reason: str | None = None, hint: str = ""
) -> LiveUpdateError:
    """The :class:`LiveUpdateError` subclass for ``err``, with a readable message.

    The message is ``WHAT: REASON; HINT``: what failed, why (``strerror``
    unless ``reason`` says it better) and, when given, what to do.
    """
    cls = _BY_ERRNO.get(err, LiveUpdateError)
    message = reason or os.strerror(err)
    if what:
        message = f"{what}: {message}"
    if hint:
        message = f"{message}; {hint}"
    exc = cls(err, message)
    exc.hint = hint
    return exc


# -- messages that name the object, not the ioctl ------------------------------

#: What an errno of the contract (``uapi.md``, ``semantics.md``) means for one
#: call, said of the object the call names. A caller reads "no incoming
#: session of this name" where strerror would say "No such file or directory".
_REASONS: dict[tuple[int, int], str] = {
    (uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, errno.EINVAL): "not a valid session name "
    "(1 to 63 bytes, no NUL)",
    (uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, errno.ENOMEM): "the session limit is reached "
    "(luod's, or this user's quota)",
    (uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, errno.EEXIST): "an outgoing session already has "
    "this name, or another user's session handed over under it waits for its successor",
    (uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, errno.EMFILE): "luod keeps its last fds for "
    "its own work (--fd-reserve)",
    (uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, errno.ENOENT): "no incoming session of this name "
    "(none was handed over, or it was finished)",
    (uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, errno.EINVAL): "already retrieved "
    "(a session is retrieved once), or not a valid name",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.EINVAL): "files are preserved into "
    "outgoing sessions only",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.EEXIST): "the token is already used "
    "in this session",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.ENOSPC): "the session holds the maximum "
    "number of files, this user's file or memfd quota is used up, or luod's crash copies "
    "hold all the files they can (see luod's copies-full event)",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.EMFILE): "luod keeps its last fds for "
    "its own work (--fd-reserve)",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.EBADF): "not an open file "
    "(an O_PATH fd cannot be preserved)",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.ENOENT): "no handler preserves this kind of file",
    (uapi.LIVEUPDATE_SESSION_PRESERVE_FD, errno.EBUSY): "this file is already preserved "
    "(in this or another session, or retrieved from an unfinished one)",
    (uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, errno.EINVAL): "files are retrieved from "
    "incoming sessions only",
    (uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, errno.ENOENT): "no file with this token "
    "(or the session is finished)",
    (uapi.LIVEUPDATE_SESSION_FINISH, errno.EINVAL): "only incoming sessions are finished",
    (uapi.LIVEUPDATE_SESSION_FINISH, errno.EBUSY): "a file refuses to finish yet",
    (uapi.LUOD_IOCTL_LIST_SESSIONS, errno.ENOENT): "no such session",
    (uapi.LUOD_IOCTL_LIST_SESSIONS, errno.EACCES): "the session belongs to another user",
    (uapi.LUOD_SESSION_UPDATE, errno.EINVAL): "only an outgoing session is handed over",
    (uapi.LUOD_SESSION_UPDATE, errno.EEXIST): "an unfinished incoming session has this name",
    (uapi.LUOD_SESSION_UNPRESERVE_FD, errno.EINVAL): "files are unpreserved from "
    "outgoing sessions only",
    (uapi.LUOD_SESSION_UNPRESERVE_FD, errno.ENOENT): "no file with this token",
    (uapi.LUOD_IOCTL_SET_EVENT, errno.EACCES): "only root, luod's own user or its "
    "--admin-group may prepare, cancel or reboot",
}

#: Errnos whose meaning does not depend on the call.
_ANY_CALL: dict[int, str] = {
    errno.ENOTTY: "not supported on this fd",
    errno.E2BIG: "the struct has non-zero bytes this implementation does not know",
    errno.EFAULT: "the argument is shorter than its size field says",
    errno.EACCES: "the session belongs to another user",
    errno.ENODEV: "this fd belongs to a generation of luod that has since rebooted: "
    "open the device again",
    errno.EMFILE: "no fd can be installed in this process (too many open files)",
}

_KINDS = (
    (stat.S_ISREG, "regular file"),
    (stat.S_ISDIR, "directory"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISLNK, "symbolic link"),
)


def file_kind(mode: int) -> str:
    """The type of file ``mode`` (an ``st_mode``) describes, in words."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "file of unknown type"


def _fd_subject(fd: int) -> tuple[str, str | None]:
    """``fd N (path)`` and the fd's file kind (``None`` when it is not open)."""
    try:
        kind = file_kind(os.fstat(fd).st_mode)
    except (OSError, OverflowError):
        return f"fd {fd}", None
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd} ({kind})", kind
    return f"fd {fd} ({target})", kind


def call_error(cmd: int, err: int, arg: bytes | bytearray | memoryview = b"") -> LiveUpdateError:
    """The error for ioctl ``cmd`` failing with ``err``, its message naming the object.

    ``arg`` is the struct the caller passed: the session name, the token and
    the fd it names are quoted, and the errno is explained for this call
    (``"LIVEUPDATE_SESSION_PRESERVE_FD token 0x1 fd 5 (/dev/null): no handler
    preserves character devices"``). The class and errno are those of
    :func:`error_from_errno`.
    """
    info = uapi.IOCTLS.get(cmd)
    if info is None:
        return error_from_errno(err, f"ioctl {cmd:#x}")
    subject: list[str] = []
    kind: str | None = None
    fields = {name for name, *_ in info.struct._fields_}
    view = memoryview(arg).cast("B") if not isinstance(arg, bytes) else memoryview(arg)
    if len(view) >= info.sizeof:
        obj = info.struct.from_buffer_copy(view[: info.sizeof])
        if "name" in fields and info.name != "LIVEUPDATE_SESSION_GET_NAME":
            raw = bytes(obj.name).split(b"\0", 1)[0]
            if raw:
                subject.append(f"session {raw.decode(errors='backslashreplace')!r}")
        if "token" in fields:
            subject.append(f"token {int(obj.token):#x}")
        if info.fd_in:
            text, kind = _fd_subject(int(obj.fd))
            subject.append(text)
    reason = _REASONS.get((cmd, err)) or _ANY_CALL.get(err) or os.strerror(err)
    if cmd == uapi.LIVEUPDATE_SESSION_PRESERVE_FD and err == errno.ENOENT and kind is not None:
        reason = f"no handler preserves {kind}s"  # e.g. /dev/null: "character devices"
    return error_from_errno(err, " ".join([info.name, *subject]), reason)
