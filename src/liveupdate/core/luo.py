"""The orchestrator: device state, session lists and the device's ioctl table.

The analog of ``kernel/liveupdate/luo_core.c``. :class:`Orchestrator` holds
one generation: its outgoing sessions (created now), its incoming sessions
(handed over by the previous generation), every preserved file and the
limits. It contains no sockets: the transport (``luod``) turns connections
into calls of :func:`liveupdate.dispatch.dispatch` with a :class:`DeviceCall`
or a :class:`~liveupdate.core.session.SessionCall` as context, and gives the
core a callback to bind a new session to an fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liveupdate import uapi
from liveupdate.core.file import FileKey, HandlerRegistry, PreservedFile
from liveupdate.core.session import (
    Owner,
    Session,
    finish_session,
    hand_over,
    may_access,
    parse_name,
    quota_exempt,
    unpreserve_all,
)
from liveupdate.dispatch import IoctlOp

__all__ = [
    "DEVICE_OPS",
    "DeviceCall",
    "Limits",
    "LuoState",
    "Orchestrator",
    "Usage",
    "is_privileged",
]

log = logging.getLogger("liveupdate.luo")

Direction = uapi.SessionDirection


LuoState = uapi.LuodState


#: One MiB, for the defaults below.
_MIB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Configurable limits and the access policy (``docs/security.md``).

    Every preserved file and session costs luod an fd. The ``*_per_uid``
    quotas bound what one uid can make luod hold (outgoing sessions and
    unfinished incoming ones, with their files), so that one user cannot
    starve the others; 0 disables a quota. uid 0 and luod's own uid are
    exempt: they can stop luod anyway. ``fd_reserve`` fds of luod's table
    are kept free for its own work (a reboot needs some), whoever asks.
    """

    max_sessions: int = 4096
    max_files: int = 1024
    max_sessions_per_uid: int = 1024
    max_files_per_uid: int = 4096
    #: Bytes of memfd (size at preserve time) one uid may have preserved.
    max_memfd_bytes_per_uid: int = 4096 * _MIB
    fd_reserve: int = 64
    #: Members of this group (primary or supplementary) may drive the state
    #: machine like root; ``None``: root and luod's own uid only.
    admin_gid: int | None = None


@dataclass
class Usage:
    """What luod holds for one uid (the quotas' measure)."""

    sessions: int = 0
    files: int = 0
    memfd_bytes: int = 0


def is_privileged(owner: Owner, limits: Limits) -> bool:
    """Who may drive the state machine: uid 0, luod's own uid, the admin group."""
    if owner.uid in (0, os.geteuid()):
        return True
    gid = limits.admin_gid
    return gid is not None and (owner.gid == gid or gid in owner.groups)


#: A held fd costs luod an fd: counting its table exactly is costly (a
#: directory listing), so it is only done once this close to the limit.
_FD_COUNT_MARGIN = 256


@dataclass
class DeviceCall:
    """Context of one ioctl on the device.

    ``bind_session`` is the transport's: it gives a new session an fd (for
    luod, one end of a socketpair) and returns the fd to hand to the caller.
    ``fds_in`` are fds that came with the call (the transport closes them).
    """

    luo: Orchestrator
    owner: Owner
    bind_session: Callable[[Session], int]
    fds_in: list[int] = field(default_factory=list)
    #: The host that can reboot the orchestrator (a ``state.RebootHost``).
    host: Any = None


class Orchestrator:
    """One generation of the orchestrator.

    Args:
        registry: The file handlers, asked in order.
        limits: Session and file limits.
        generation: This generation's live update number (1 on a cold start).
    """

    def __init__(
        self,
        registry: HandlerRegistry,
        limits: Limits | None = None,
        generation: int = 1,
    ) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        self.generation = generation
        self.state = LuoState.NORMAL
        #: Outgoing sessions by name, in creation order.
        self.outgoing: dict[bytes, Session] = {}
        #: Incoming sessions by name, in the previous generation's order.
        self.incoming: dict[bytes, Session] = {}
        #: Every file that counts as preserved, by identity: each holder
        #: (a file in an outgoing session, or retrieved from an unfinished
        #: incoming one) until it lets go; the file is free once none is left.
        self.preserved: dict[FileKey, list[PreservedFile]] = {}
        #: Why the incoming image could not be restored; opens then fail EIO.
        self.restore_error: str | None = None
        #: Called with the new state whenever it changes (luod's state file).
        self.on_state_change: Callable[[LuoState], None] | None = None
        #: Bumped by every change to what would be handed over, so a REBOOT
        #: can tell whether the PREPARE pre-flight still covers it.
        self.mutations = 0
        self.prepared_mark: int | None = None
        #: Why the last state event failed (GET_STATE's ``last_error``).
        self.last_error = ""
        #: Sessions reported lost at start because the previous holder died.
        self.lost_sessions = 0
        #: The previous holder's journal was out of date: ``lost_sessions`` is a lower bound.
        self.lost_incomplete = False
        #: errno of the journal's last failed write (0: written, or no journal).
        self.journal_error = 0
        #: The transport's check "has this session's fd been closed? then
        #: release it now" (see :meth:`released_meanwhile`).
        self.reap: Callable[[Session], bool] | None = None

    # -- state -----------------------------------------------------------

    def set_state(self, state: LuoState) -> None:
        if state != self.state:
            log.info("state %s -> %s", self.state.name.lower(), state.name.lower())
            self.state = state
            if self.on_state_change is not None:
                self.on_state_change(state)

    def resting_state(self) -> LuoState:
        """UPDATED while an incoming session is unfinished, else NORMAL."""
        if any(not s.finished for s in self.incoming.values()):
            return LuoState.UPDATED
        return LuoState.NORMAL

    def session_finished(self, session: Session) -> None:
        """Bookkeeping once an incoming session is finished."""
        if self.state == LuoState.UPDATED:
            self.set_state(self.resting_state())

    # -- device operations -------------------------------------------------

    def released_meanwhile(self, session: Session) -> bool:
        """Whether ``session``'s fd turns out to be closed already; if so it is
        released now, and the conflict it caused is gone.

        A close travels asynchronously over a socket, while Linux's close is
        synchronous: before answering EEXIST, EBUSY or EINVAL because of a
        session, the core asks the transport (:attr:`reap`) to check.
        """
        return self.reap is not None and self.reap(session)

    def check_open(self) -> None:
        """Whether the device may be opened at all in this generation (``EIO``)."""
        if self.restore_error is not None:
            raise OSError(errno.EIO, f"incoming handover state unusable: {self.restore_error}")

    # -- what is held, by whom -------------------------------------------------

    def holders(self, key: FileKey) -> list[PreservedFile]:
        """The files of identity ``key`` that count as preserved now."""
        return self.preserved.get(key, [])

    def hold(self, file: PreservedFile) -> None:
        """``file`` counts as preserved (idempotent)."""
        held = self.preserved.setdefault(file.key, [])
        if not any(h is file for h in held):
            held.append(file)

    def let_go(self, file: PreservedFile) -> None:
        """``file`` no longer counts as preserved; others of its identity still may."""
        held = self.preserved.get(file.key)
        if held is None:
            return
        held[:] = [h for h in held if h is not file]
        if not held:
            del self.preserved[file.key]

    def held_sessions(self) -> list[Session]:
        """Every session luod holds for somebody: outgoing, and unfinished incoming."""
        return [
            *self.outgoing.values(),
            *(s for s in self.incoming.values() if not s.finished),
        ]

    def usage(self, uid: int) -> Usage:
        """What luod holds for ``uid`` now (computed, so it can never drift)."""
        usage = Usage()
        for session in self.held_sessions():
            if session.owner.uid == uid:
                usage.sessions += 1
                usage.files += len(session.files)
                usage.memfd_bytes += sum(f.charge for f in session.files.values())
        return usage

    def check_fd_reserve(self) -> None:
        """``EMFILE`` when holding one more fd would eat into luod's reserve.

        The reserve keeps a reboot (image, pre-flight pipes, exec) and the
        operator's own device connection possible however much is held.
        """
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return
        # A quarter of the table at most: a tiny RLIMIT_NOFILE stays usable.
        reserve = min(self.limits.fd_reserve, soft // 4)
        if reserve <= 0:
            return
        # Sessions and files each cost one fd; a few more are luod's own.
        estimate = sum(1 + len(s.files) for s in self.held_sessions())
        if estimate + reserve + _FD_COUNT_MARGIN < soft:
            return
        in_use = len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
        if in_use + reserve >= soft:
            raise OSError(
                errno.EMFILE,
                f"luod holds {in_use} fds of {soft}; the last {reserve} are kept for "
                "its own work (a reboot)",
            )

    def _check_session_quota(self, owner: Owner) -> None:
        quota = self.limits.max_sessions_per_uid
        if quota <= 0 or quota_exempt(owner):
            return
        if self.usage(owner.uid).sessions >= quota:
            for session in list(self.outgoing.values()):
                if session.owner.uid == owner.uid:
                    self.released_meanwhile(session)
            if self.usage(owner.uid).sessions >= quota:
                raise OSError(errno.ENOMEM, f"uid {owner.uid} holds {quota} sessions (its quota)")

    def _waiting_clash(self, name: bytes, owner: Owner) -> None:
        """``EEXIST`` when a session handed over under ``name`` waits for its
        successor and the caller is not its owner (nor root).

        Both would be incoming after the reboot, which therefore refuses
        such a clash: refused here, another user can never block every
        reboot this way. The owner may create the name (a successor such as
        ``luoctl run`` creates before it retrieves); the reboot still checks.
        """
        waiting = self.incoming.get(name)
        if waiting is None or not waiting.handed_over or waiting.retrieved:
            return
        if waiting.finished or may_access(waiting, owner):
            return
        raise OSError(
            errno.EEXIST,
            "a session handed over under this name waits for its successor",
        )

    def create_session(self, name: bytes, owner: Owner) -> Session:
        """A new outgoing session.

        Checks: name, limit (``ENOMEM``), per-uid quota (``ENOMEM``), fd
        reserve (``EMFILE``), name in use (``EEXIST``).
        """
        if self.state == LuoState.FROZEN:
            raise OSError(errno.EBUSY, "a live update is in progress")
        if len(self.outgoing) >= self.limits.max_sessions:
            for session in list(self.outgoing.values()):
                self.released_meanwhile(session)
            if len(self.outgoing) >= self.limits.max_sessions:
                raise OSError(errno.ENOMEM, f"{self.limits.max_sessions} sessions exist")
        self._check_session_quota(owner)
        self.check_fd_reserve()
        existing = self.outgoing.get(name)
        if existing is not None and not self.released_meanwhile(existing):
            raise OSError(errno.EEXIST, "an outgoing session already has this name")
        self._waiting_clash(name, owner)
        session = Session(name, Direction.OUTGOING, owner)
        self.outgoing[name] = session
        self.mutations += 1
        return session

    def retrieve_session(self, name: bytes, owner: Owner) -> Session:
        """The incoming session ``name``: ``ENOENT`` if none, ``EINVAL`` if taken."""
        session = self.incoming.get(name)
        if session is None:
            raise OSError(errno.ENOENT, "no incoming session has this name")
        if not may_access(session, owner):
            raise OSError(errno.EACCES, "this session belongs to another user")
        if session.retrieved and self.released_meanwhile(session):
            raise OSError(errno.ENOENT, "no incoming session has this name")
        if session.retrieved:
            raise OSError(errno.EINVAL, "this session was already retrieved")
        session.retrieved = True
        return session

    def release_session(self, session: Session) -> None:
        """The session's fd was closed.

        Outgoing: unpreserve every file (last first) and free the name.
        Incoming: finish it implicitly; its name then gives ``ENOENT``.
        """
        if session.direction == Direction.OUTGOING:
            if session.flags & uapi.LUOD_SESSION_KEEP_ON_CLOSE:
                try:
                    # Its holder is gone without a hand-over (crashed): the
                    # successor gets the session instead of losing it.
                    hand_over(self, session, replace=True)
                    log.warning("session %s kept on close", session.display_name)
                    return
                except Exception as exc:  # a handler's bug must not keep the files
                    log.error(
                        "session %s: keep-on-close hand-over failed (%s); files released",
                        session.display_name,
                        getattr(exc, "strerror", None) or exc,
                    )
            if self.outgoing.get(session.name) is session:
                del self.outgoing[session.name]
            unpreserve_all(self, session)
            self.mutations += 1
            return
        if not session.finished:
            finish_session(self, session, force=True)
        if self.incoming.get(session.name) is session:
            del self.incoming[session.name]
        self.session_finished(session)

    def close(self) -> None:
        """Release everything this generation holds (daemon shutdown)."""
        for session in reversed(list(self.outgoing.values())):
            self.release_session(session)
        for session in list(self.incoming.values()):
            for file in session.files.values():
                file.release()
        self.incoming.clear()
        self.preserved.clear()

    @property
    def file_count(self) -> int:
        """Files held in outgoing and unfinished incoming sessions."""
        sessions = [*self.outgoing.values(), *self.incoming.values()]
        return sum(len(s.files) for s in sessions if not s.finished)


# -- the device's ioctl table ------------------------------------------------


def _create_session(call: DeviceCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.liveupdate_ioctl_create_session)
    name = parse_name(arg.name)
    session = call.luo.create_session(name, call.owner)
    try:
        fd = call.bind_session(session)
    except OSError:
        del call.luo.outgoing[name]
        raise
    arg.fd = -1
    return fd


def _retrieve_session(call: DeviceCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.liveupdate_ioctl_retrieve_session)
    name = parse_name(arg.name)
    session = call.luo.retrieve_session(name, call.owner)
    try:
        fd = call.bind_session(session)
    except OSError:
        session.retrieved = False
        raise
    arg.fd = -1
    return fd


def describe_session(session: Session, with_files: bool) -> dict[str, Any]:
    """One session of the listing (LUOD_IOCTL_LIST_SESSIONS)."""
    desc: dict[str, Any] = {
        "name": session.name.decode(errors="backslashreplace"),
        "direction": session.direction.name.lower(),
        "uid": session.owner.uid,
        "gid": session.owner.gid,
        "pid": session.owner.pid,
        "created": session.created,
        "flags": session.flags,
        "keep_on_close": bool(session.flags & uapi.LUOD_SESSION_KEEP_ON_CLOSE),
        "retrieved": session.retrieved,
        "finished": session.finished,
        # A finished session's files were released (or belong to its caller).
        "nfiles": 0 if session.finished else len(session.files),
    }
    if with_files and session.finished:
        desc["files"] = []
    elif with_files:
        files = []
        for file in session.files.values():
            entry: dict[str, Any] = {"token": file.token, "handler": file.handler.compatible}
            try:
                entry.update(file.handler.describe(file))
            except OSError as exc:
                entry["error"] = exc.strerror
            files.append(entry)
        desc["files"] = files
    return desc


def _sealed_memfd(data: bytes) -> int:
    """A read-only memfd holding ``data``, sealed so nobody can change it."""
    fd = os.memfd_create("luod-listing", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        os.close(fd)
        raise
    return fd


def _list_sessions(call: DeviceCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.luod_list_sessions)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    if arg.flags & ~uapi.LUOD_LIST_FLAGS:
        raise OSError(errno.EOPNOTSUPP, f"unknown flags {arg.flags:#x}")
    luo = call.luo
    sessions = [*luo.outgoing.values(), *luo.incoming.values()]
    if arg.name[0]:
        name = parse_name(arg.name)
        sessions = [s for s in sessions if s.name == name]
        if not sessions:
            raise OSError(errno.ENOENT, "no session has this name")
        if not any(may_access(s, call.owner) for s in sessions):
            raise OSError(errno.EACCES, "this session belongs to another user")
    visible = [s for s in sessions if may_access(s, call.owner)]
    doc = {
        "generation": luo.generation,
        "state": luo.state.name.lower(),
        "sessions": [describe_session(s, bool(arg.flags & uapi.LUOD_LIST_FILES)) for s in visible],
    }
    arg.count = len(visible)
    arg.hidden = len(sessions) - len(visible)
    arg.fd = -1
    return _sealed_memfd(json.dumps(doc).encode())


#: The device ioctls of this module; see :mod:`liveupdate.core.tables` for the table.
DEVICE_OPS: list[IoctlOp[DeviceCall]] = [
    IoctlOp(uapi.CREATE_SESSION, _create_session),
    IoctlOp(uapi.RETRIEVE_SESSION, _retrieve_session),
    IoctlOp(uapi.LIST_SESSIONS, _list_sessions),
]
