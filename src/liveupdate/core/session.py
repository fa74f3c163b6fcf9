"""Sessions: named groups of preserved files, and the session fd's ioctl table.

The analog of ``kernel/liveupdate/luo_session.c``. A session is *outgoing*
when it was created in this generation (files can be added) and *incoming*
when it was handed over by the previous one (files can be taken back, then
the session is finished).

The session ioctls are implemented here as small handlers behind the generic
dispatcher; each receives a :class:`SessionCall` and a zero-filled struct and
raises :class:`OSError` with the contract's errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from liveupdate import uapi
from liveupdate.core.file import FileKey, HandlerRegistry, PreservedFile
from liveupdate.dispatch import IoctlOp

if TYPE_CHECKING:
    from liveupdate.core.luo import Orchestrator

__all__ = ["SESSION_OPS", "Owner", "Session", "SessionCall", "parse_name", "quota_exempt"]

Direction = uapi.SessionDirection
_O_PATH = getattr(os, "O_PATH", 0o10000000)


@dataclass(frozen=True)
class Owner:
    """Credentials of the process that created a session (``SO_PEERCRED``).

    ``groups``: the peer's supplementary groups when the transport knows them
    (``SO_PEERGROUPS``, taken at connect time like the rest); not kept in
    the handover image.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def quota_exempt(owner: Owner) -> bool:
    """uid 0 and luod's own uid are not held to the per-uid quotas."""
    return owner.uid in (0, os.geteuid())


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


@dataclass(eq=False)
class Session:
    """One session and its files in preservation order.

    Attributes:
        name: 1 to 63 bytes, no NUL.
        direction: Outgoing (this generation) or incoming (handed over).
        owner: Who created it; kept across reboots.
        created: When it was first created (Unix time), kept across reboots.
        flags: Extension flags kept across reboots.
        files: Token -> file, in preservation order (dicts keep it).
        retrieved: An incoming session that was retrieved (it can be once).
        finished: An incoming session that was finished.
        endpoint: Whatever the transport attached (luod's socket end).
    """

    name: bytes
    direction: uapi.SessionDirection
    owner: Owner
    created: float = field(default_factory=time.time)
    flags: int = 0
    files: dict[int, PreservedFile] = field(default_factory=dict)
    retrieved: bool = False
    finished: bool = False
    endpoint: Any = None
    #: Handed over by a per-session update or keep-on-close (not by a
    #: reboot): it waits for its successor even across a reboot of luod.
    handed_over: bool = False

    @property
    def display_name(self) -> str:
        return self.name.decode(errors="backslashreplace")

    def __repr__(self) -> str:
        return (
            f"<Session {self.display_name!r} {self.direction.name.lower()} files={len(self.files)}>"
        )


@dataclass
class SessionCall:
    """Context of one ioctl on a session fd.

    ``fds_in`` are the fds that came with the call; a handler that keeps one
    removes it from the list, and the transport closes whatever is left.
    """

    luo: Orchestrator
    session: Session
    fds_in: list[int] = field(default_factory=list)
    #: Who sent this call (``SCM_CREDENTIALS``), when the transport knows.
    caller: Owner | None = None
    #: Closes the caller's session fd once the reply is sent (the transport's).
    detach: Callable[[], None] | None = None


def may_access(session: Session, caller: Owner | None) -> bool:
    """Owner checks: root and the session's creator may use it, nobody else.

    An unknown caller (no credentials came with the call) is refused: the
    check fails closed.
    """
    return caller is not None and (caller.uid == 0 or caller.uid == session.owner.uid)


def _usable_fd(fds_in: list[int]) -> tuple[int, os.stat_result]:
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


def preserve_file(
    luo: Orchestrator, session: Session, token: int, fds_in: list[int]
) -> PreservedFile:
    """Add the fd in ``fds_in`` to ``session`` under ``token``.

    Checks in Linux 7.3's order: EEXIST, ENOSPC, EBADF, ENOENT, EBUSY, then
    the handler's own error; luod's quotas and fd reserve fit in between
    (``docs/security.md``): the owner's file quota (``ENOSPC``) with the
    session's, luod's fd reserve (``EMFILE``) once the fd is known usable,
    the owner's memfd bytes (``ENOSPC``) once the file is known free. On
    success the fd leaves ``fds_in``: the orchestrator now owns it.
    """
    if token in session.files:
        raise OSError(errno.EEXIST, f"token {token:#x} already used in this session")
    if len(session.files) >= luo.limits.max_files:
        raise OSError(errno.ENOSPC, f"session holds {luo.limits.max_files} files")
    # Charged to the session's owner, whoever holds its fd.
    owner = session.owner
    usage = None if quota_exempt(owner) else luo.usage(owner.uid)
    file_quota = luo.limits.max_files_per_uid
    if usage is not None and file_quota > 0 and usage.files >= file_quota:
        # Sessions of its own closed a moment ago may not be released yet.
        for other in list(luo.outgoing.values()):
            if other.owner.uid == owner.uid and other is not session:
                luo.released_meanwhile(other)
        usage = luo.usage(owner.uid)
        if usage.files >= file_quota:
            raise OSError(errno.ENOSPC, f"uid {owner.uid} holds {file_quota} files (its quota)")
    fd, st = _usable_fd(fds_in)
    luo.check_fd_reserve()
    registry: HandlerRegistry = luo.registry
    handler = registry.find(fd, st)
    key: FileKey = handler.file_key(fd, st)
    for holder in list(luo.holders(key)):
        if holder.session is not None and holder.session is not session:
            # Its session's fd may have been closed a moment ago and not be
            # released yet (closing is asynchronous over a socket).
            luo.released_meanwhile(holder.session)
    if luo.holders(key):
        raise OSError(errno.EBUSY, "this file is already preserved")
    charge = handler.charged_bytes(fd, st)
    byte_quota = luo.limits.max_memfd_bytes_per_uid
    if usage is not None and byte_quota > 0 and charge and usage.memfd_bytes + charge > byte_quota:
        raise OSError(
            errno.ENOSPC,
            f"uid {owner.uid} would hold {usage.memfd_bytes + charge} bytes of memfd, "
            f"over its quota of {byte_quota}",
        )
    file = PreservedFile(token, handler, fd, key, session=session, charge=charge)
    handler.preserve(file)
    fds_in.remove(fd)
    session.files[token] = file
    luo.hold(file)
    luo.mutations += 1
    return file


def _forget(luo: Orchestrator, file: PreservedFile) -> None:
    """The file no longer counts as preserved; luod drops its reference."""
    luo.let_go(file)
    file.release()


def unpreserve_all(luo: Orchestrator, session: Session) -> None:
    """Release an outgoing session's files, last preserved first."""
    for file in reversed(list(session.files.values())):
        try:
            file.handler.unpreserve(file)
        finally:
            _forget(luo, file)
    session.files.clear()


def retrieve_file(luo: Orchestrator, session: Session, token: int) -> int:
    """A new fd (a dup) for the incoming file ``token``; errors are sticky."""
    file = session.files.get(token)
    if file is None or session.finished:
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
        luo.hold(file)
    return os.dup(file.fd)


def finish_session(luo: Orchestrator, session: Session, force: bool = False) -> None:
    """FINISH: ask every file, then finish them all; idempotent.

    ``force`` finishes even files that refuse (the session's fd was closed:
    there is nobody left to retry).
    """
    if session.finished:
        return
    files = list(session.files.values())
    if not force:
        for file in files:
            if not file.handler.can_finish(file):
                raise OSError(errno.EBUSY, f"file {file.token:#x} cannot finish yet")
    for file in files:
        try:
            file.handler.finish(file)
        finally:
            _forget(luo, file)
    session.finished = True
    luo.session_finished(session)


def unpreserve_file(luo: Orchestrator, session: Session, token: int) -> None:
    """Drop one file of an outgoing session (LUOD_SESSION_UNPRESERVE_FD)."""
    file = session.files.pop(token, None)
    if file is None:
        raise OSError(errno.ENOENT, f"no file with token {token:#x}")
    try:
        file.handler.unpreserve(file)
    finally:
        _forget(luo, file)
        luo.mutations += 1


def hand_over(luo: Orchestrator, session: Session, replace: bool = False) -> None:
    """Make an outgoing session incoming under the same name (per-session update).

    Its files are frozen in preservation order, rolled back if one fails.
    An unfinished incoming session of the same name is ``EEXIST``, unless
    ``replace`` (keep-on-close after a crash: the newest state wins, the
    stale one is finished). The caller detaches the session's fd.
    """
    stale = luo.incoming.get(session.name)
    if stale is not None and not stale.finished and not replace:
        raise OSError(errno.EEXIST, "an unfinished incoming session has this name")
    from liveupdate.core import reboot  # the freeze logic is the reboot's

    reboot.freeze_files(list(session.files.values()))
    if stale is not None:
        finish_session(luo, stale, force=True)
        del luo.incoming[session.name]
    if luo.outgoing.get(session.name) is session:
        del luo.outgoing[session.name]
    for file in session.files.values():
        luo.let_go(file)  # waiting, not retrieved: it counts again once retrieved
    session.direction = Direction.INCOMING
    session.retrieved = False
    session.finished = False
    session.handed_over = True
    luo.incoming[session.name] = session
    luo.mutations += 1
    if luo.state == uapi.LuodState.NORMAL:
        luo.set_state(uapi.LuodState.UPDATED)


# -- the session fd's ioctl table -------------------------------------------


def _preserve_fd(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_preserve_fd)
    preserve_file(call.luo, call.session, arg.token, call.fds_in)


def _retrieve_fd(call: SessionCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.liveupdate_session_retrieve_fd)
    fd = retrieve_file(call.luo, call.session, arg.token)
    arg.fd = -1  # the real number is the receiver's to fill in
    return fd


def _finish(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_finish)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    finish_session(call.luo, call.session)


def _get_name(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.liveupdate_session_get_name)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    # @name is output only: whatever the caller's buffer held is overwritten,
    # so the reply is always NUL-terminated.
    ctypes.memset(arg.name, 0, ctypes.sizeof(arg.name))
    ctypes.memmove(arg.name, call.session.name, len(call.session.name))


def _update(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_update)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    if not may_access(call.session, call.caller):
        raise OSError(errno.EACCES, "only the session's owner or root may update it")
    hand_over(call.luo, call.session)
    if call.detach is not None:
        call.detach()


def _set_flags(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_set_flags)
    if not may_access(call.session, call.caller):
        raise OSError(errno.EACCES, "only the session's owner or root may change its flags")
    if arg.flags & ~uapi.LUOD_SESSION_FLAGS:
        raise OSError(errno.EOPNOTSUPP, f"unknown session flags {arg.flags:#x}")
    arg.old_flags = call.session.flags
    call.session.flags = arg.flags
    call.luo.mutations += 1


def _unpreserve_fd(call: SessionCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_session_unpreserve_fd)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    if not may_access(call.session, call.caller):
        raise OSError(errno.EACCES, "only the session's owner or root may unpreserve its files")
    unpreserve_file(call.luo, call.session, arg.token)


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
]
