"""The session fd's ioctl table.

The ioctl half of ``kernel/liveupdate/luo_session.c``: what each call on a
session fd does, as small handlers behind the generic dispatcher
(:func:`liveupdate.dispatch.dispatch`), and :func:`parse_name`, the check of
a session name field shared with the device's ioctls. Each receives a :class:`SessionCall`
(the session set, the session the fd is bound to, the caller) and a
zero-filled struct, checks what only it can check (reserved fields, flags,
the owner), asks the :class:`~liveupdate.core.session.SessionSet` to act,
and raises :class:`OSError` with the contract's errno on failure. The size,
direction and tail checks were done by the dispatcher before.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from liveupdate import uapi
from liveupdate.core.policy import Owner, may_access
from liveupdate.core.session import ServiceStatus, Session, SessionSet
from liveupdate.dispatch import IoctlOp

__all__ = ["SESSION_OPS", "SessionCall", "parse_name"]


def parse_name(field_: ctypes.Array[ctypes.c_uint8]) -> bytes:
    """Validate a 64-byte name field: 1..63 bytes then a NUL, else ``EINVAL``.

    Bytes after the first NUL are ignored, as in Linux.
    """
    raw = bytes(field_)
    end = raw.find(b"\0")
    if end < 0:
        raise OSError(errno.EINVAL, "session name has no terminating NUL")
    if end == 0:
        raise OSError(errno.EINVAL, "session name is empty")
    return raw[:end]


@dataclass
class SessionCall:
    """Context of one ioctl on a session fd.

    ``fds_in`` are the fds that came with the call; a handler that keeps one
    removes it from the list, and the transport closes whatever is left.
    """

    sessions: SessionSet
    session: Session
    fds_in: list[int] = field(default_factory=list)
    #: Who sent this call (``SCM_CREDENTIALS``), when the transport knows.
    caller: Owner | None = None
    #: Closes the caller's session fd once the reply is sent (the transport's).
    detach: Callable[[], None] | None = None

    def check_owner(self, action: str) -> None:
        """``EACCES`` unless the caller is the session's owner or root."""
        if not may_access(self.session.owner, self.caller):
            raise OSError(errno.EACCES, f"only the session's owner or root may {action}")


def _no_reserved(reserved: int) -> None:
    if reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")


def _preserve_fd(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_preserve_fd)
    call.sessions.preserve_file(call.session, arg.token, call.fds_in)


def _retrieve_fd(call: SessionCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.liveupdate_session_retrieve_fd)
    fd = call.sessions.retrieve_file(call.session, arg.token)
    arg.fd = -1  # the real number is the receiver's to fill in
    return fd


def _finish(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_finish)
    _no_reserved(arg.reserved)
    call.sessions.finish(call.session)


#: Where @name lies in struct liveupdate_session_get_name, and its size.
_GET_NAME_FIELD = uapi.liveupdate_session_get_name.name.offset
_NAME_LENGTH = uapi.LIVEUPDATE_SESSION_NAME_LENGTH


def _get_name(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_get_name)
    _no_reserved(arg.reserved)
    # @name is output only: whatever the caller's buffer held is overwritten
    # (NUL-padded, so the reply is always NUL-terminated). One copy to the
    # field's address: reading ``arg.name`` makes a new array object each time.
    name = call.session.name.ljust(_NAME_LENGTH, b"\0")
    ctypes.memmove(ctypes.addressof(arg) + _GET_NAME_FIELD, name, _NAME_LENGTH)


def _update(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_update)
    _no_reserved(arg.reserved)
    call.check_owner("update it")
    call.sessions.hand_over(call.session)
    if call.detach is not None:
        call.detach()


def _set_flags(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_set_flags)
    call.check_owner("change its flags")
    if arg.flags & ~uapi.LUOD_SESSION_FLAGS:
        raise OSError(errno.EOPNOTSUPP, f"unknown session flags {arg.flags:#x}")
    arg.old_flags = call.sessions.set_flags(call.session, arg.flags)


def _unpreserve_fd(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_unpreserve_fd)
    _no_reserved(arg.reserved)
    call.check_owner("unpreserve its files")
    call.sessions.unpreserve_file(call.session, arg.token)


def _sync(call: SessionCall, arg: ctypes.Structure) -> None:
    # Nothing to do: the reply itself, in order after every earlier one, is
    # the point. The cookie goes back as it came (fields are written back).
    assert isinstance(arg, uapi.luod_session_sync)
    _no_reserved(arg.reserved)


def _set_service(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_set_service)
    _no_reserved(arg.reserved)
    if arg.flags:
        raise OSError(errno.EOPNOTSUPP, f"unknown flags {arg.flags:#x}")
    if arg.pid > uapi.LUOD_SERVICE_PID_MAX:
        raise OSError(errno.EINVAL, f"pid {arg.pid} is beyond any pid Linux gives")
    call.check_owner("say which service uses it")
    service = ServiceStatus(arg.pid, arg.restarts, arg.last_exit) if arg.pid else None
    call.sessions.set_service(call.session, service)


#: The session ioctls (upstream, then luod's extensions);
#: :func:`liveupdate.core.tables.session_table` builds the table from them.
SESSION_OPS: list[IoctlOp[SessionCall]] = [
    IoctlOp(uapi.PRESERVE_FD, _preserve_fd),
    IoctlOp(uapi.RETRIEVE_FD, _retrieve_fd),
    IoctlOp(uapi.FINISH, _finish),
    IoctlOp(uapi.GET_NAME, _get_name),
    IoctlOp(uapi.SESSION_UPDATE, _update),
    IoctlOp(uapi.SESSION_SET_FLAGS, _set_flags),
    IoctlOp(uapi.SESSION_UNPRESERVE_FD, _unpreserve_fd),
    IoctlOp(uapi.SESSION_SYNC, _sync),
    IoctlOp(uapi.SESSION_SET_SERVICE, _set_service),
]
