"""Sessions: named groups of preserved files, and the set of them.

The analog of ``kernel/liveupdate/luo_session.c``. A session is *outgoing*
when it was created in this generation (files can be added) and *incoming*
when it was handed over by the previous one (files can be taken back, then
the session is finished).

:class:`SessionSet` owns both sets of sessions: the outgoing and incoming
dicts, the counter of changes to what would be handed over, create,
retrieve, release, hand-over and finish, the per-uid quotas, and the
image's :class:`~liveupdate.handover_abi.SessionRecord` both ways. Each
session's files are its :class:`~liveupdate.core.file.FileSet`. The set
reaches outside only through its constructor's two callbacks: the
transport's close check and the orchestrator's "incoming sessions changed".

The session fd's ioctls are in :mod:`liveupdate.core.session_ops`.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from liveupdate import uapi
from liveupdate.core.file import (
    FileSet,
    FreezeHook,
    HandlerRegistry,
    PreservedFile,
    PreservedFiles,
    usable_fd,
)
from liveupdate.core.policy import (
    FdBudget,
    Limits,
    Owner,
    Usage,
    check_fd_reserve,
    may_access,
    quota_exempt,
)
from liveupdate.events import event
from liveupdate.handover_abi import IMAGE_FLAG_AWAITING_SUCCESSOR, SessionRecord

__all__ = [
    "ReleaseCheck",
    "ServiceStatus",
    "Session",
    "SessionSet",
    "session_record",
]

Direction = uapi.SessionDirection


@dataclass(frozen=True)
class ServiceStatus:
    """The service a supervisor runs on a session (LUOD_SESSION_SET_SERVICE),
    for the operator only: luod never acts on it, and never hands it over."""

    pid: int
    #: Times its supervisor restarted it after it exited.
    restarts: int = 0
    #: Its last exit status (>= 0), minus the signal that killed it (< 0), 0: never exited.
    last_exit: int = 0


@dataclass(eq=False)
class Session:
    """One session and its files in preservation order.

    ``name`` is 1 to 63 bytes, no NUL; ``owner`` (its creator), ``created``
    (Unix time) and ``flags`` travel with it across reboots. ``retrieved``
    and ``finished`` are an incoming session's progress; ``handed_over``
    marks one handed over by a per-session update or keep-on-close (not by
    a reboot): it waits for its successor even across a reboot of luod.
    ``endpoint`` is whatever the transport attached; the core never looks.
    ``service`` is what its supervisor last said of the service using it.
    """

    name: bytes
    direction: uapi.SessionDirection
    owner: Owner
    files: FileSet
    created: float = field(default_factory=time.time)
    flags: int = 0
    retrieved: bool = False
    finished: bool = False
    endpoint: object | None = None
    handed_over: bool = False
    service: ServiceStatus | None = None
    #: :attr:`SessionSet.mutations` at this session's last change (its files,
    #: flags, direction, finish): the crash copies resend only sessions whose
    #: stamp moved. Unique across sessions, so a new session of the same name
    #: never looks unchanged.
    changed_at: int = 0

    @property
    def display_name(self) -> str:
        return self.name.decode(errors="backslashreplace")

    @property
    def waiting(self) -> bool:
        """Handed over and not retrieved yet: it waits for its successor."""
        return self.handed_over and not self.retrieved

    def __repr__(self) -> str:
        return (
            f"<Session {self.display_name!r} {self.direction.name.lower()} files={len(self.files)}>"
        )


#: The transport's check "has this session's fd been closed already? then
#: release it now" (see :meth:`SessionSet.released_meanwhile`).
ReleaseCheck = Callable[[Session], bool]


class _Recount:
    """Wraps every change to what sessions hold (``with _Recount(set, *sessions):``).

    On entry it takes the sessions' share out of the set's usage counters,
    on exit (even when the change failed midway) it puts back what they hold
    then, read from the sessions themselves. The counters therefore follow
    every change made inside one, and no change is made outside one: the
    quotas and the fd reserve are checked in O(1) instead of walking every
    session on each PRESERVE_FD and CREATE_SESSION, and cannot drift.
    The per-call paths (create, release, preserve, unpreserve) spell out its two
    :meth:`SessionSet._count` calls instead of making an object per call.
    """

    __slots__ = ("_sessions", "_set")

    def __init__(self, owner: SessionSet, *sessions: Session | None) -> None:
        self._set = owner
        self._sessions: list[Session] = []
        for session in sessions:
            # Each once, even when given twice (a session and its stale
            # namesake can be one): taken out once, put back once.
            if session is not None and all(session is not s for s in self._sessions):
                self._sessions.append(session)

    def __enter__(self) -> None:
        for session in self._sessions:
            self._set._count(session, -1)

    def __exit__(self, *_exc: object) -> None:
        for session in self._sessions:
            self._set._count(session, +1)


class SessionSet:
    """The outgoing and incoming sessions of one generation.

    Args:
        registry: The file handlers, asked in order.
        limits: Session and file limits, quotas.
        preserved: The orchestrator's "counts as preserved" table.
        released_meanwhile: The transport's close check (:data:`ReleaseCheck`).
        incoming_changed: Called after an incoming session appeared or was
            finished (the orchestrator settles its state).
        budget: What a file costs in fds and how many the crash copies hold
            (the daemon's; by default no copies).
    """

    def __init__(
        self,
        registry: HandlerRegistry,
        limits: Limits,
        preserved: PreservedFiles,
        released_meanwhile: ReleaseCheck,
        incoming_changed: Callable[[], None],
        budget: FdBudget | None = None,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.budget = budget if budget is not None else FdBudget()
        self._preserved = preserved
        self._reap = released_meanwhile
        self._incoming_changed = incoming_changed
        self._outgoing: dict[bytes, Session] = {}
        self._incoming: dict[bytes, Session] = {}
        self._mutations = 0
        #: What the held sessions (:meth:`held`) hold, per uid and in all;
        #: changed only by :class:`_Recount` (through :meth:`_count`).
        self._usage: dict[int, Usage] = {}
        self._total = Usage()

    # -- reading ----------------------------------------------------------------

    @property
    def outgoing(self) -> Mapping[bytes, Session]:
        """Outgoing sessions by name, in creation order."""
        return self._outgoing

    @property
    def incoming(self) -> Mapping[bytes, Session]:
        """Incoming sessions by name, in the previous generation's order."""
        return self._incoming

    def _changed(self, session: Session) -> None:
        """Count a change to ``session`` (see :attr:`mutations`, :attr:`Session.changed_at`)."""
        self._mutations += 1
        session.changed_at = self._mutations

    @property
    def mutations(self) -> int:
        """Bumped by every change to what would be handed over or copied for a
        crash (the journal, the keeper, the fd store
        and a REBOOT's "does the PREPARE pre-flight still cover it?")."""
        return self._mutations

    def held(self) -> list[Session]:
        """Every session luod holds for somebody: outgoing, and unfinished incoming."""
        return [*self._outgoing.values(), *(s for s in self._incoming.values() if not s.finished)]

    def handed_over(self) -> list[Session]:
        """What the next generation receives: every outgoing session, then the
        incoming sessions a per-session update or keep-on-close handed over
        that nobody retrieved yet (they still wait for their successor).
        Other unfinished incoming sessions are released, as in Linux."""
        return [*self._outgoing.values(), *(s for s in self._incoming.values() if s.waiting)]

    @property
    def file_count(self) -> int:
        """Files held in outgoing and unfinished incoming sessions."""
        return self._total.files

    def usage(self, uid: int) -> Usage:
        """What luod holds for ``uid`` now (a copy of its counters)."""
        usage = self._usage.get(uid)
        if usage is None:
            return Usage()
        return Usage(usage.sessions, usage.files, usage.memfd_bytes)

    def _count(self, session: Session, sign: int) -> None:
        """Add (``sign`` 1) or take out (-1) what ``session`` holds now, if
        held; only a :class:`_Recount` (or its spelled-out form) calls it."""
        # Held: one of :meth:`held`, told by membership rather than by its
        # own fields, so that a session just taken out counts no more.
        if self._outgoing.get(session.name) is not session and (
            self._incoming.get(session.name) is not session or session.finished
        ):
            return
        uid = session.owner.uid
        usage = self._usage.get(uid)
        if usage is None:
            usage = self._usage[uid] = Usage()
        files, charge = sign * len(session.files), sign * session.files.charge
        usage.sessions += sign
        usage.files += files
        usage.memfd_bytes += charge
        total = self._total
        total.sessions += sign
        total.files += files
        total.memfd_bytes += charge
        if usage.sessions == 0:
            del self._usage[uid]  # nothing held: no entry left behind per uid

    def released_meanwhile(self, session: Session) -> bool:
        """Whether ``session``'s fd turns out to be closed already (the
        transport then released it). A close travels asynchronously over a
        socket, Linux's is synchronous: the set asks before refusing anyone
        because of a session (EEXIST, EBUSY, EINVAL, a quota)."""
        return self._reap(session)

    def _reap_of(self, uid: int, besides: Session | None = None) -> None:
        """Give every outgoing session of ``uid`` (but ``besides``) a close check."""
        for other in list(self._outgoing.values()):
            if other.owner.uid == uid and other is not besides:
                self.released_meanwhile(other)

    def check_fd_reserve(self, others: int = 0) -> None:
        """``EMFILE`` when one more held fd would eat into luod's reserve.

        ``others``: fds luod holds for its callers besides sessions and files
        (the transport's channels).
        """
        check_fd_reserve(self.limits, self._total.sessions + self._total.files + others)

    # -- creating and retrieving --------------------------------------------------

    def create(self, name: bytes, owner: Owner) -> Session:
        """A new outgoing session. Checks: limit and per-uid quota (``ENOMEM``),
        fd reserve (``EMFILE``), name in use or waiting for another user (``EEXIST``)."""
        if len(self._outgoing) >= self.limits.max_sessions:
            for session in list(self._outgoing.values()):
                self.released_meanwhile(session)
            if len(self._outgoing) >= self.limits.max_sessions:
                raise OSError(errno.ENOMEM, f"{self.limits.max_sessions} sessions exist")
        self._check_session_quota(owner)
        self.check_fd_reserve()
        existing = self._outgoing.get(name)
        if existing is not None and not self.released_meanwhile(existing):
            raise OSError(errno.EEXIST, "an outgoing session already has this name")
        self._check_waiting_clash(name, owner)
        session = Session(name, Direction.OUTGOING, owner, FileSet(self._preserved))
        self._outgoing[name] = session
        self._count(session, +1)  # new: nothing of it was counted before
        self._changed(session)
        return session

    def _check_session_quota(self, owner: Owner) -> None:
        quota = self.limits.max_sessions_per_uid
        if quota <= 0 or quota_exempt(owner):
            return
        if self.usage(owner.uid).sessions >= quota:
            self._reap_of(owner.uid)
            if self.usage(owner.uid).sessions >= quota:
                raise OSError(errno.ENOMEM, f"uid {owner.uid} holds {quota} sessions (its quota)")

    def _check_waiting_clash(self, name: bytes, owner: Owner) -> None:
        """``EEXIST`` when a session handed over under ``name`` waits for its
        successor and the caller is not its owner (nor root): both would be
        incoming after the reboot, which refuses that, so another user could
        block every reboot. The owner may (``luoctl run`` creates before it
        retrieves); the reboot still checks."""
        waiting = self._incoming.get(name)
        if waiting is None or not waiting.waiting or waiting.finished:
            return
        if may_access(waiting.owner, owner):
            return
        raise OSError(errno.EEXIST, "a session handed over under this name waits for its successor")

    def abandon(self, session: Session) -> None:
        """Undo :meth:`create` of an empty session whose fd could not be bound."""
        if self._outgoing.get(session.name) is session and not session.files:
            with _Recount(self, session):
                del self._outgoing[session.name]
            self._changed(session)

    def retrieve(self, name: bytes, owner: Owner) -> Session:
        """The incoming session ``name``: ``ENOENT`` if none, ``EACCES`` if
        another user's, ``EINVAL`` if taken."""
        session = self._incoming.get(name)
        if session is None:
            raise OSError(errno.ENOENT, "no incoming session has this name")
        if not may_access(session.owner, owner):
            raise OSError(errno.EACCES, "this session belongs to another user")
        if session.retrieved and self.released_meanwhile(session):
            raise OSError(errno.ENOENT, "no incoming session has this name")
        if session.retrieved:
            raise OSError(errno.EINVAL, "this session was already retrieved")
        session.retrieved = True
        self._changed(session)  # no longer waiting for its successor
        return session

    def unretrieve(self, session: Session) -> None:
        """Undo :meth:`retrieve` whose fd could not be bound."""
        session.retrieved = False
        self._changed(session)

    # -- releasing, handing over, finishing -----------------------------------------

    def release(self, session: Session) -> None:
        """The session's fd was closed. Outgoing: hand it over if kept on
        close, else unpreserve every file (last first) and free the name.
        Incoming: finish it implicitly; its name then gives ``ENOENT``."""
        if session.direction == Direction.OUTGOING:
            if session.flags & uapi.LUOD_SESSION_KEEP_ON_CLOSE and self._keep_on_close(session):
                return
            self._count(session, -1)  # a _Recount spelled out: no object per call
            try:
                if self._outgoing.get(session.name) is session:
                    del self._outgoing[session.name]
                self._changed(session)
                session.files.unpreserve_all()
            finally:
                self._count(session, +1)  # gone: adds nothing back
            return
        if not session.finished:
            self.finish(session, force=True)
        if self._incoming.get(session.name) is session:
            del self._incoming[session.name]  # finished: it counted no more

    def _keep_on_close(self, session: Session) -> bool:
        """Hand over a session whose holder is gone without doing it (crashed):
        its successor gets it instead of losing it. ``False``: the hand-over
        failed, and the caller releases its files."""
        try:
            self.hand_over(session, replace=True)
        except Exception as exc:  # a handler's bug must not keep the files
            error = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            name = session.display_name
            event("session-keep-on-close-failed", logging.ERROR, session=name, error=error)
            return False
        event("session-kept-on-close", logging.WARNING, session=session.display_name)
        return True

    def hand_over(self, session: Session, replace: bool = False) -> None:
        """Make an outgoing session incoming under the same name (per-session update).

        Its files are frozen in preservation order, rolled back if one fails.
        An unfinished incoming session of the same name is ``EEXIST``, unless
        ``replace`` (keep-on-close after a crash: the newest state wins, the
        stale one is finished). The caller detaches the session's fd.
        """
        stale = self._incoming.get(session.name)
        if stale is not None and not stale.finished and not replace:
            raise OSError(errno.EEXIST, "an unfinished incoming session has this name")
        session.files.freeze()
        with _Recount(self, session, stale):
            if stale is not None:
                self._finish(stale, force=True)
                del self._incoming[session.name]
            if self._outgoing.get(session.name) is session:
                del self._outgoing[session.name]
            session.files.let_go_all()  # waiting: it counts again once retrieved
            session.direction = Direction.INCOMING
            session.retrieved = False
            session.finished = False
            session.handed_over = True
            session.service = None  # it stopped; its successor says what runs next
            self._incoming[session.name] = session
        self._changed(session)
        self._incoming_changed()

    def finish(self, session: Session, force: bool = False) -> None:
        """FINISH: ask every file, then finish them all; idempotent. ``force``
        finishes even files that refuse (the fd was closed: nobody can retry)."""
        with _Recount(self, session):
            self._finish(session, force)

    def _finish(self, session: Session, force: bool) -> None:
        """:meth:`finish`, inside a :class:`_Recount` of ``session``."""
        if session.finished:
            return
        refusing = None if force else session.files.refusing_to_finish()
        if refusing is not None:
            raise OSError(errno.EBUSY, f"file {refusing.token:#x} cannot finish yet")
        session.files.finish()
        session.finished = True
        self._changed(session)  # the crash copies drop it (the image already did)
        self._incoming_changed()

    def finish_incoming(self, owner: Owner | None = None) -> None:
        """Finish every unfinished incoming session (``owner``'s uid's only, if
        given), all or nothing (``EBUSY``). Sessions never retrieved go at once
        (their names then give ENOENT); retrieved ones stay until their fd closes."""
        sessions = [
            s
            for s in self._incoming.values()
            if not s.finished and (owner is None or s.owner.uid == owner.uid)
        ]
        for session in sessions:
            refusing = session.files.refusing_to_finish()
            if refusing is not None:
                raise OSError(
                    errno.EBUSY,
                    f"session {session.display_name!r} file {refusing.token:#x} cannot finish yet",
                )
        for session in sessions:
            self.finish(session, force=True)
            if not session.retrieved:
                del self._incoming[session.name]

    # -- files --------------------------------------------------------------------

    def preserve_file(self, session: Session, token: int, fds_in: list[int]) -> PreservedFile:
        """Add the fd in ``fds_in`` to ``session`` under ``token``; on success
        it leaves ``fds_in`` (the orchestrator owns it now).

        Checks in Linux 7.3's order: EEXIST, ENOSPC, EBADF, ENOENT, EBUSY, then
        the handler's; luod's fit in between (``docs/security.md``): the file
        quota (``ENOSPC``) with the session's, the fd reserve (``EMFILE``) and
        the crash copies' room (``ENOSPC``) once the fd is usable, memfd bytes
        (``ENOSPC``) once the file is free.
        """
        session.files.check_token(token, self.limits.max_files)
        # Charged to the session's owner, whoever holds its fd.
        owner = session.owner
        usage = None if quota_exempt(owner) else self._file_quota_usage(session)
        fd, st = usable_fd(fds_in)
        self.check_fd_reserve()
        self.budget.check_copy_room(self._total.files)
        handler = self.registry.find(fd, st)
        key = handler.file_key(fd, st)
        for holder in self._preserved.holders(key):
            other = self._session_holding(holder)
            if other is not None and other is not session:
                # Its session's fd may have been closed a moment ago and not
                # be released yet (closing is asynchronous over a socket).
                self.released_meanwhile(other)
        if self._preserved.holders(key):
            raise OSError(errno.EBUSY, "this file is already preserved")
        charge = handler.charged_bytes(fd, st)
        if usage is not None:
            self._check_byte_quota(owner, usage, charge)
        self._count(session, -1)  # a _Recount spelled out: no object per call
        try:
            file = session.files.preserve(token, handler, fd, key, charge)
        finally:
            self._count(session, +1)
        fds_in.remove(fd)
        self._changed(session)
        return file

    def _file_quota_usage(self, session: Session) -> Usage:
        """The owner's usage, ``ENOSPC`` when its file quota is reached."""
        uid = session.owner.uid
        usage = self.usage(uid)
        quota = self.limits.max_files_per_uid
        if quota > 0 and usage.files >= quota:
            # Sessions of its own closed a moment ago may not be released yet.
            self._reap_of(uid, besides=session)
            usage = self.usage(uid)
            if usage.files >= quota:
                raise OSError(errno.ENOSPC, f"uid {uid} holds {quota} files (its quota)")
        return usage

    def _check_byte_quota(self, owner: Owner, usage: Usage, charge: int) -> None:
        """``ENOSPC`` when ``charge`` more bytes would take ``owner`` over its quota."""
        quota = self.limits.max_memfd_bytes_per_uid
        if quota > 0 and charge and usage.memfd_bytes + charge > quota:
            raise OSError(
                errno.ENOSPC,
                f"uid {owner.uid} would hold {usage.memfd_bytes + charge} bytes of memfd, "
                f"over its quota of {quota}",
            )

    def _session_holding(self, file: PreservedFile) -> Session | None:
        """The held session ``file`` belongs to (asked only on a conflict)."""
        for session in self.held():
            if session.files.get(file.token) is file:
                return session
        return None

    def unpreserve_file(self, session: Session, token: int) -> None:
        """Drop one file of an outgoing session (LUOD_SESSION_UNPRESERVE_FD)."""
        self._count(session, -1)  # a _Recount spelled out: no object per call
        try:
            session.files.unpreserve(token)
        finally:
            self._count(session, +1)
            self._changed(session)

    def retrieve_file(self, session: Session, token: int) -> int:
        """A new fd (a dup) for the incoming file ``token``; errors are sticky."""
        if session.finished:
            raise OSError(errno.ENOENT, f"no file with token {token:#x}")
        return session.files.retrieve(token)

    def set_flags(self, session: Session, flags: int) -> int:
        """Set an outgoing session's flags; returns the old ones."""
        old = session.flags
        session.flags = flags
        self._changed(session)
        return old

    def set_service(self, session: Session, service: ServiceStatus | None) -> None:
        """Record the service running on ``session`` (``None``: none runs now).

        Not a change to what is handed over or copied (it is neither): the
        mutation counter stays, and the copies send nothing.
        """
        session.service = service

    # -- the reboot: freeze, serialize, restore ----------------------------------------

    def freeze(self, hook: FreezeHook | None = None) -> None:
        """Freeze every outgoing session in creation order (files in
        preservation order); on failure unfreeze every session frozen so
        far, last first, and re-raise: nothing changed."""
        frozen: list[Session] = []
        try:
            for session in self._outgoing.values():
                session.files.freeze(hook)
                frozen.append(session)
        except BaseException:
            for session in reversed(frozen):
                session.files.unfreeze()
            raise

    def thaw(self) -> None:
        """Unfreeze every outgoing file (a reboot that could not proceed)."""
        for session in reversed(list(self._outgoing.values())):
            session.files.unfreeze()

    def records(self, sessions: Iterable[Session] | None = None) -> list[SessionRecord]:
        """The image records of ``sessions`` (default: :meth:`handed_over`)."""
        return [session_record(s) for s in (self.handed_over() if sessions is None else sessions)]

    def restore(
        self, records: Iterable[SessionRecord], on_session: Callable[[Session], None] | None = None
    ) -> None:
        """Make the incoming sessions from image records and inherited fds;
        ``OSError(EIO)`` naming session and token when anything does not fit
        (nothing is closed). Only then do the fds become ours alone."""
        for record in records:
            session = Session(
                record.name,
                Direction.INCOMING,
                Owner(record.pid, record.uid, record.gid),
                FileSet(self._preserved),
                created=record.created,
                flags=record.flags & ~IMAGE_FLAG_AWAITING_SUCCESSOR,
                handed_over=bool(record.flags & IMAGE_FLAG_AWAITING_SUCCESSOR),
            )
            session.files.restore(record.files, self.registry, f"session {session.display_name!r}")
            with _Recount(self, session, self._incoming.get(session.name)):
                self._incoming[session.name] = session
            if on_session is not None:
                on_session(session)
        for session in self._incoming.values():
            session.files.make_private()
        self._incoming_changed()

    def drop_incoming(self) -> None:
        """The generation ends: close the files of every incoming session that
        is not handed on (as an exec would: they are close-on-exec)."""
        kept = set(map(id, self.handed_over()))
        with _Recount(self, *self._incoming.values()):
            for session in self._incoming.values():
                if id(session) not in kept:
                    session.files.release()
            self._incoming.clear()

    def close(self) -> None:
        """Release everything (daemon shutdown): outgoing sessions last first."""
        for session in reversed(list(self._outgoing.values())):
            self.release(session)
        with _Recount(self, *self._incoming.values()):
            for session in self._incoming.values():
                session.files.release()
            self._incoming.clear()


def session_record(session: Session) -> SessionRecord:
    """The image record of one session (its files' data as last frozen)."""
    return SessionRecord(
        name=session.name,
        uid=session.owner.uid,
        gid=session.owner.gid,
        pid=session.owner.pid,
        created=session.created,
        flags=session.flags | (IMAGE_FLAG_AWAITING_SUCCESSOR if session.waiting else 0),
        files=session.files.to_records(),
    )
