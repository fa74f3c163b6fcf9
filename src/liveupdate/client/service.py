"""The child side of ``luoctl run``: a service's inherited session.

``luoctl run --session NAME -- CMD`` starts CMD with a session fd and says in
the environment what it is:

``LIVEUPDATE_SESSION_FD``
    The session's fd (inherited).
``LIVEUPDATE_SESSION_NAME``
    Its name.
``LIVEUPDATE_SESSION_STATE``
    ``outgoing``: a fresh start; preserve what must survive into the session.
    ``incoming``: a predecessor (an update, or a crash with keep-on-close)
    handed its state over; retrieve it from the session.
``LIVEUPDATE_NEXT_SESSION_FD``
    With ``incoming`` only: an outgoing session of the same name, where the
    state for the *next* update goes.
``LIVEUPDATE_SUPERVISOR_FD``
    A socket to the supervisor. :meth:`InheritedSession.preserve` and
    :meth:`~InheritedSession.unpreserve` send it a copy of every file they
    preserve (and word of every unpreserve), so that the supervisor can give
    the session back to a luod that lost it (SIGKILLed and started again);
    when luod rebooted or restarted under the service, they ask it for the
    session's new fd and retry once, so the service never notices.

:func:`inherited_session` reads all of that; :meth:`InheritedSession.restore`
takes a predecessor's files over in one call::

    svc = liveupdate.inherited_session()
    fds = svc.restore()                 # {token: fd}, empty on a fresh start
    listener = fds.get(1)
    if listener is None:
        listener = make_listener()
        svc.preserve(listener, 1)
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

from liveupdate import uapi
from liveupdate.client.device import HasFileno, Session, open_device
from liveupdate.client.errors import AlreadyExistsError, NotFoundError, StaleGenerationError

__all__ = [
    "NEXT_SESSION_FD_ENV",
    "SESSION_FD_ENV",
    "SESSION_NAME_ENV",
    "SESSION_STATE_ENV",
    "SUPERVISOR_FD_ENV",
    "InheritedSession",
    "SupervisorMessage",
    "direction_name",
    "inherited_session",
]

SESSION_FD_ENV = "LIVEUPDATE_SESSION_FD"
SESSION_NAME_ENV = "LIVEUPDATE_SESSION_NAME"
SESSION_STATE_ENV = "LIVEUPDATE_SESSION_STATE"
NEXT_SESSION_FD_ENV = "LIVEUPDATE_NEXT_SESSION_FD"
SUPERVISOR_FD_ENV = "LIVEUPDATE_SUPERVISOR_FD"


class SupervisorMessage:
    """The service <-> supervisor protocol (SOCK_SEQPACKET): one byte, then a u64 token.

    Service to supervisor: ``PRESERVED`` and ``DEFERRED`` carry the file
    (SCM_RIGHTS); ``UNPRESERVED`` carries none; ``SESSION`` asks for the
    session's current fd. The supervisor answers ``SESSION`` alone: with the
    fd, or ``AWAY`` while luod is away.
    """

    #: The file is preserved in luod; keep a copy.
    PRESERVED = b"P"
    #: luod is away: keep a copy and preserve it once luod is back.
    DEFERRED = b"D"
    #: The file left the session: drop the copy.
    UNPRESERVED = b"U"
    #: Ask for the outgoing session's current fd.
    SESSION = b"S"
    #: Answer to ``SESSION``: luod is away, no session for now.
    AWAY = b"N"
    SIZE = 9


def supervisor_message(kind: bytes, token: int = 0) -> bytes:
    return kind + token.to_bytes(8, "little")


#: ``LIVEUPDATE_SESSION_STATE``'s values: the directions' names in lower case.
_DIRECTIONS = {d.name.lower(): d for d in uapi.SessionDirection}


def direction_name(direction: uapi.SessionDirection) -> str:
    """``direction`` as ``LIVEUPDATE_SESSION_STATE`` says it (``"incoming"``)."""
    return direction.name.lower()


@dataclass
class InheritedSession:
    """The session(s) a supervised service inherited.

    Attributes:
        name: The session name.
        direction: ``INCOMING`` (state to take over) or ``OUTGOING`` (fresh start).
        session: The inherited session (incoming or outgoing, per ``direction``).
        next_session: With ``INCOMING``: the outgoing session for the next update.
    """

    name: str
    direction: uapi.SessionDirection
    session: Session
    next_session: Session | None = None
    #: The socket to the supervisor (``LIVEUPDATE_SUPERVISOR_FD``), if any.
    supervisor: socket.socket | None = None

    @property
    def state(self) -> str:
        """``direction`` as the environment says it: ``"incoming"`` or ``"outgoing"``."""
        return direction_name(self.direction)

    @property
    def outgoing(self) -> Session:
        """Where to preserve state for the next update."""
        return self.next_session if self.next_session is not None else self.session

    def preserve(self, file: int | HasFileno, token: int) -> None:
        """Preserve ``file`` under ``token`` in :attr:`outgoing`, surviving luod's restarts.

        Also hands the supervisor a copy of the file. If luod rebooted or was
        restarted since the last call (the session fd is dead: ENODEV), asks
        the supervisor for the session's new fd and retries once; while luod
        is away, the supervisor keeps the file and preserves it once luod is
        back. Without a supervisor, the same as ``outgoing.preserve``.
        """
        fd = file if isinstance(file, int) else file.fileno()
        try:
            self.outgoing.preserve(fd, token)
        except StaleGenerationError:
            if self.supervisor is None:
                raise
            if not self._rebind():
                self._tell(SupervisorMessage.DEFERRED, token, fd)
                return
            self.outgoing.preserve(fd, token)
        self._tell(SupervisorMessage.PRESERVED, token, fd)

    def unpreserve(self, token: int) -> None:
        """Drop ``token`` from :attr:`outgoing`, surviving luod's restarts like :meth:`preserve`."""
        try:
            self.outgoing.unpreserve(token)
        except StaleGenerationError:
            if self.supervisor is None:
                raise
            if self._rebind():
                try:
                    self.outgoing.unpreserve(token)
                except NotFoundError:
                    pass  # never made it into the new session
        self._tell(SupervisorMessage.UNPRESERVED, token)

    def _tell(self, kind: bytes, token: int, fd: int | None = None) -> None:
        if self.supervisor is None:
            return
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            if fd is not None
            else []
        )
        self.supervisor.sendmsg([supervisor_message(kind, token)], ancillary)

    def _rebind(self) -> bool:
        """Put the session's current fd (from the supervisor) under ``outgoing``'s fd number.

        False while luod is away. The fd number stays the same, so whatever
        the service built on ``outgoing.fileno()`` still holds.
        """
        assert self.supervisor is not None
        self.supervisor.sendmsg([supervisor_message(SupervisorMessage.SESSION)])
        fds = array.array("i")
        data, ancdata, flags, _addr = self.supervisor.recvmsg(
            SupervisorMessage.SIZE, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            raise ConnectionError("the supervisor closed its socket")
        if data[:1] != SupervisorMessage.SESSION or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            return False
        os.dup2(fds[0], self.outgoing.fileno(), inheritable=False)
        os.close(fds[0])
        return True

    def tokens(self, device: str | None = None) -> list[int]:
        """Tokens of the files in the inherited session (luod's listing)."""
        with open_device(device, timeout=30.0) as dev:
            listing = dev.list_sessions(self.session.raw_name)
        for entry in listing.sessions:
            if entry.direction == self.direction:
                return [f.token for f in entry.files or ()]
        return []

    def restore(self, device: str | None = None) -> dict[int, int]:
        """Take a predecessor's files over: ``{token: fd}`` (empty when outgoing).

        Retrieves every file of the incoming session, finishes it, and
        preserves each file again under the same token in the outgoing
        session, so the next update carries them on without any more work.
        """
        if self.direction != uapi.SessionDirection.INCOMING:
            return {}
        fds: dict[int, int] = {}
        try:
            for token in self.tokens(device):
                fds[token] = self.session.retrieve(token)
            # A retrieved file counts as preserved until FINISH: finish first.
            # Until each file is preserved again below, this process alone
            # holds it (a crash in between loses it).
            self.session.finish()
            for token, fd in fds.items():
                try:
                    self.preserve(fd, token)
                except AlreadyExistsError:
                    # A predecessor that crashed mid-restore left this token
                    # in the outgoing session: the file just retrieved wins.
                    self.outgoing.unpreserve(token)
                    self.preserve(fd, token)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds


def inherited_session(environ: dict[str, str] | None = None) -> InheritedSession | None:
    """The session announced by ``luoctl run`` in the environment, or ``None``."""
    env = os.environ if environ is None else environ
    raw_fd = env.get(SESSION_FD_ENV)
    if raw_fd is None:
        return None
    state = env.get(SESSION_STATE_ENV, "outgoing")
    direction = _DIRECTIONS.get(state)
    if direction is None:
        raise ValueError(f"{SESSION_STATE_ENV}={state!r}: expected incoming or outgoing")
    session = Session.from_fd(int(raw_fd), direction)
    next_fd = env.get(NEXT_SESSION_FD_ENV)
    next_session = (
        Session.from_fd(int(next_fd), uapi.SessionDirection.OUTGOING) if next_fd else None
    )
    name = env.get(SESSION_NAME_ENV) or session.name
    supervisor_fd = env.get(SUPERVISOR_FD_ENV)
    supervisor = socket.socket(fileno=int(supervisor_fd)) if supervisor_fd else None
    if supervisor is not None:
        supervisor.set_inheritable(False)
    return InheritedSession(name, direction, session, next_session, supervisor)
