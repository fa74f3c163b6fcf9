"""The orchestrator: one generation, composed of its parts, and the device's ioctls.

The analog of ``kernel/liveupdate/luo_core.c``. :class:`Orchestrator` owns
the state of the state machine (``docs/concepts/live-update.md``) and
composes the pieces that own the rest, each in its own module:

* :class:`~liveupdate.core.session.SessionSet` (``luo_session.c``): the
  outgoing and incoming sessions, their files, the change counter;
* :class:`~liveupdate.core.file.PreservedFiles` (``luo_file.c``): which
  files count as preserved; made here, handed to the session set;
* :class:`~liveupdate.core.participant.ParticipantSet` (``luo_subsystems.c``
  of the v2 series): the participants of every live update and their data;
* :mod:`liveupdate.core.policy`: limits, quotas, who may do what.

The steps of a reboot are ordered by :mod:`liveupdate.core.reboot`, which
drives an orchestrator from outside. What the orchestrator needs from the
daemon around it is given to its constructor as :class:`Hooks`; what a
reboot needs is a :class:`RebootHost`, which comes with each device call.

It contains no sockets: the transport (``luod``) turns connections into
calls of :func:`liveupdate.dispatch.dispatch` with a :class:`DeviceCall` or a
:class:`~liveupdate.core.session_ops.SessionCall` as context, and gives the
core a callback to bind a new session to an fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from liveupdate import uapi
from liveupdate.core.file import HandlerRegistry, PreservedFile, PreservedFiles
from liveupdate.core.participant import ParticipantSet
from liveupdate.core.policy import FdBudget, Limits, Owner, may_access
from liveupdate.core.session import ReleaseCheck, Session, SessionSet
from liveupdate.core.session_ops import parse_name
from liveupdate.dispatch import IoctlOp
from liveupdate.events import event
from liveupdate.handover_abi import HandoverImage

__all__ = [
    "DEVICE_OPS",
    "DeviceCall",
    "Hooks",
    "LuoState",
    "Orchestrator",
    "RebootHost",
    "RebootTimes",
    "StateListener",
    "sealed_memfd",
]

LuoState = uapi.LuodState

#: Told every new state (luod writes its state file).
StateListener = Callable[[LuoState], None]


def _ignore_state(_state: LuoState) -> None:
    pass


def _never_released(_session: Session) -> bool:
    return False


def _no_error() -> int:
    return 0


@dataclass(frozen=True)
class Hooks:
    """What an orchestrator asks of the daemon around it; every generation of
    one daemon shares them (a restored generation is given its
    predecessor's). The defaults do nothing (an orchestrator in a test)."""

    #: Called with the new state whenever it changes.
    on_state_change: StateListener = _ignore_state
    #: The transport's "was this session's fd closed already? then release
    #: it now" (:meth:`SessionSet.released_meanwhile`).
    released_meanwhile: ReleaseCheck = _never_released
    #: errno of the journal's last failed write, 0 when written or there is
    #: no journal (GET_STATE's ``journal_error``).
    journal_error: Callable[[], int] = _no_error
    #: errno of the crash copies' last failed update, or why they could not
    #: start; 0 when up to date or turned off (GET_STATE's ``copies_error``).
    copies_error: Callable[[], int] = _no_error
    #: What a preserved file costs in fds and how many the copies hold; the
    #: daemon fills it in once its copies are open.
    budget: FdBudget = field(default_factory=FdBudget)


class RebootHost(Protocol):
    """What the orchestrator needs from its host to update itself (luod's
    re-exec driver); :mod:`liveupdate.core.reboot` calls it in order.

    Declared here, beside :class:`DeviceCall` that carries it, so that the
    reboot module (which drives an :class:`Orchestrator`) can import both
    without a cycle; :mod:`liveupdate.core.reboot` exports it too.
    """

    def preflight(self, image: HandoverImage) -> None:
        """Have the code that runs next read ``image``; ``OSError(EIO, why)`` if it cannot."""

    def begin_reboot(self, intent: HandoverImage) -> None:
        """Record what is about to be handed over (read back only after a crash)."""

    def freeze_hook(self, file: PreservedFile) -> None:
        """Called after each file's freeze (tests inject faults here)."""

    def abort_reboot(self) -> None:
        """The reboot failed before it was committed: forget the intent."""

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        """Write the final image and start the next generation after this reply."""


@dataclass(frozen=True)
class RebootTimes:
    """When the live update that started a generation began and froze
    (``CLOCK_REALTIME`` nanoseconds, carried in the image; 0: unknown)."""

    started_ns: int = 0
    frozen_ns: int = 0


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
    #: The host that can reboot the orchestrator; ``None``: PREPARE and
    #: REBOOT are ``EOPNOTSUPP``.
    host: RebootHost | None = None


class Orchestrator:
    """One generation of the orchestrator.

    Args:
        registry: The file handlers, asked in order.
        limits: Session and file limits.
        generation: This generation's live update number (1 on a cold start).
        hooks: What it asks of the daemon (:class:`Hooks`).
        lost_sessions: Sessions reported lost at this (cold) start because
            the previous holder died.
        lost_incomplete: The previous holder's journal was out of date:
            ``lost_sessions`` is a lower bound.
        restore_error: Why the incoming image could not be restored: this
            generation then serves nothing, every open fails ``EIO``.
    """

    def __init__(
        self,
        registry: HandlerRegistry,
        limits: Limits | None = None,
        generation: int = 1,
        hooks: Hooks | None = None,
        *,
        lost_sessions: int = 0,
        lost_incomplete: bool = False,
        restore_error: str | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits or Limits()
        self.generation = generation
        self.hooks = hooks or Hooks()
        self.lost_sessions = lost_sessions
        self.lost_incomplete = lost_incomplete
        self.restore_error = restore_error
        #: ``CLOCK_REALTIME`` ns when this generation started serving (:meth:`serving`).
        self.started_ns = 0
        #: ... and when its line of generations started cold (0: this one did).
        self.cold_started_ns = 0
        #: The live update this generation came from; ``None``: a cold start.
        self.arrival: RebootTimes | None = None
        #: Sessions and files the crash copies gave back at this (cold) start.
        self.recovered_sessions = 0
        self.recovered_files = 0
        #: errno of the last REBOOT that failed in this generation (0: none).
        self.last_reboot_error = 0
        self._state = LuoState.NORMAL
        #: Why the last state event failed (GET_STATE's ``last_error``).
        self.last_error = ""
        #: :attr:`SessionSet.mutations` when PREPARE's pre-flight passed.
        self.prepared_mark: int | None = None
        self.preserved = PreservedFiles()
        self.sessions = SessionSet(
            registry,
            self.limits,
            self.preserved,
            self.hooks.released_meanwhile,
            self.settle_state,
            self.hooks.budget,
        )
        self.participants = ParticipantSet(self.limits, generation)

    # -- the state machine ----------------------------------------------------------

    @property
    def state(self) -> LuoState:
        return self._state

    def set_state(self, state: LuoState) -> None:
        """Move to ``state``, telling the listener (no event when unchanged)."""
        if state == self._state:
            return
        event("state-changed", old=self._state.name.lower(), new=state.name.lower())
        self._state = state
        self.hooks.on_state_change(state)

    def resting_state(self) -> LuoState:
        """UPDATED while an incoming session is unfinished or participant data
        of the previous generation waits for FINISH, else NORMAL."""
        if any(not s.finished for s in self.sessions.incoming.values()):
            return LuoState.UPDATED
        if self.participants.unfinished:
            return LuoState.UPDATED
        return LuoState.NORMAL

    def settle_state(self) -> None:
        """The incoming sessions changed: outside an update in progress
        (PREPARED, FROZEN), the state follows them."""
        if self._state in (LuoState.NORMAL, LuoState.UPDATED):
            self.set_state(self.resting_state())

    @property
    def journal_error(self) -> int:
        """errno of the journal's last failed write (0: written, or no journal)."""
        return self.hooks.journal_error()

    def serving(self, now_ns: int | None = None) -> None:
        """The daemon serves this generation from now (``CLOCK_REALTIME`` ns):
        the start GET_STATE reports, and the end of the live update it came from."""
        self.started_ns = time.time_ns() if now_ns is None else now_ns
        if not self.cold_started_ns:
            self.cold_started_ns = self.started_ns

    @property
    def last_reboot_ns(self) -> int:
        """When the live update this generation came from ended (0: a cold start)."""
        return self.started_ns if self.arrival is not None else 0

    def _since_arrival(self, mark_ns: int) -> int:
        if self.arrival is None or not mark_ns or not self.started_ns:
            return 0
        # CLOCK_REALTIME may step between two processes: never a negative time.
        return max(0, self.started_ns - mark_ns)

    @property
    def reboot_blackout_ns(self) -> int:
        """From the freeze of the live update this generation came from to its
        serving (0: a cold start, or not known)."""
        return self._since_arrival(self.arrival.frozen_ns if self.arrival else 0)

    @property
    def reboot_duration_ns(self) -> int:
        """From the REBOOT call of that live update to this generation's serving (0: not known)."""
        return self._since_arrival(self.arrival.started_ns if self.arrival else 0)

    # -- the device's operations --------------------------------------------------

    def check_open(self) -> None:
        """Whether the device may be opened at all in this generation (``EIO``)."""
        if self.restore_error is not None:
            raise OSError(errno.EIO, f"incoming handover state unusable: {self.restore_error}")

    def create_session(self, name: bytes, owner: Owner) -> Session:
        """A new outgoing session (``EBUSY`` while frozen for a reboot; see
        :meth:`SessionSet.create` for the other checks)."""
        if self._state == LuoState.FROZEN:
            raise OSError(errno.EBUSY, "a live update is in progress")
        return self.sessions.create(name, owner)

    def retrieve_session(self, name: bytes, owner: Owner) -> Session:
        """The incoming session ``name`` (see :meth:`SessionSet.retrieve`)."""
        return self.sessions.retrieve(name, owner)

    def release_session(self, session: Session) -> None:
        """The session's fd was closed (see :meth:`SessionSet.release`)."""
        self.sessions.release(session)

    def close(self) -> None:
        """Release everything this generation holds (daemon shutdown)."""
        self.participants.close()
        self.sessions.close()
        self.preserved.clear()


# -- the device's ioctl table ------------------------------------------------


def _create_session(call: DeviceCall, arg: ctypes.Structure) -> int:
    assert isinstance(arg, uapi.liveupdate_ioctl_create_session)
    name = parse_name(arg.name)
    session = call.luo.create_session(name, call.owner)
    try:
        fd = call.bind_session(session)
    except OSError:
        call.luo.sessions.abandon(session)
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
        call.luo.sessions.unretrieve(session)
        raise
    arg.fd = -1
    return fd


def describe_session(session: Session, with_files: bool) -> dict[str, object]:
    """One session of the listing (LUOD_IOCTL_LIST_SESSIONS)."""
    desc: dict[str, object] = {
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
    service = session.service
    if service is not None:
        desc["service"] = {
            "pid": service.pid,
            "restarts": service.restarts,
            "last_exit": service.last_exit,
        }
    if with_files and session.finished:
        desc["files"] = []
    elif with_files:
        files = []
        for file in session.files.values():
            entry: dict[str, object] = {"token": file.token, "handler": file.handler.compatible}
            try:
                entry.update(file.handler.describe(file))
            except OSError as exc:
                entry["error"] = exc.strerror
            files.append(entry)
        desc["files"] = files
    return desc


def sealed_memfd(data: bytes, name: str = "luod-listing") -> int:
    """A read-only memfd holding ``data``, sealed so nobody can change it,
    positioned at its start (a listing, a state snapshot for the copies)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
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
    sessions = [*luo.sessions.outgoing.values(), *luo.sessions.incoming.values()]
    if arg.name[0]:
        name = parse_name(arg.name)
        sessions = [s for s in sessions if s.name == name]
        if not sessions:
            raise OSError(errno.ENOENT, "no session has this name")
        if not any(may_access(s.owner, call.owner) for s in sessions):
            raise OSError(errno.EACCES, "this session belongs to another user")
    visible = [s for s in sessions if may_access(s.owner, call.owner)]
    doc: dict[str, object] = {
        "generation": luo.generation,
        "state": luo.state.name.lower(),
        "sessions": [describe_session(s, bool(arg.flags & uapi.LUOD_LIST_FILES)) for s in visible],
    }
    if not arg.name[0]:
        # Listed with every session, never with one named session.
        doc["participants"], doc["hidden_participants"] = luo.participants.describe(call.owner)
    arg.count = len(visible)
    arg.hidden = len(sessions) - len(visible)
    arg.fd = -1
    return sealed_memfd(json.dumps(doc).encode())


#: The device ioctls of this module; see :mod:`liveupdate.core.tables` for the table.
DEVICE_OPS: list[IoctlOp[DeviceCall]] = [
    IoctlOp(uapi.CREATE_SESSION, _create_session),
    IoctlOp(uapi.RETRIEVE_SESSION, _retrieve_session),
    IoctlOp(uapi.LIST_SESSIONS, _list_sessions),
]
