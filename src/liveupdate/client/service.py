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
    ``prestarted``: started ahead of an update while the old process still
    serves (the old one opted in with :meth:`InheritedSession.freeze_fd`);
    no session fd yet: :meth:`InheritedSession.restore` reports ready and
    receives the session once the old process froze (then ``incoming``).
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

A service that also watches ``svc.freeze_fd()`` in its event loop gets
updates with no blackout worth the name: the next version initialises while
this one serves; when ``freeze_requested()``, this one stops reading, answers
what is in flight, preserves its final state, calls ``svc.frozen()`` and exits.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from liveupdate import uapi, wire
from liveupdate.client.device import HasFileno, Session, open_device
from liveupdate.client.errors import (
    AlreadyExistsError,
    LiveUpdateError,
    NotFoundError,
    StaleGenerationError,
)

__all__ = [
    "NEXT_SESSION_FD_ENV",
    "PRESTARTED_STATE",
    "SESSION_FD_ENV",
    "SESSION_NAME_ENV",
    "SESSION_STATE_ENV",
    "SUPERVISOR_FD_ENV",
    "TOKENS_PER_MESSAGE",
    "InheritedSession",
    "SupervisorMessage",
    "direction_name",
    "inherited_session",
    "tokens_message",
]

SESSION_FD_ENV = "LIVEUPDATE_SESSION_FD"
SESSION_NAME_ENV = "LIVEUPDATE_SESSION_NAME"
SESSION_STATE_ENV = "LIVEUPDATE_SESSION_STATE"
NEXT_SESSION_FD_ENV = "LIVEUPDATE_NEXT_SESSION_FD"
SUPERVISOR_FD_ENV = "LIVEUPDATE_SUPERVISOR_FD"
#: ``LIVEUPDATE_SESSION_STATE`` of a process started ahead of an update: no
#: session fd yet; :meth:`InheritedSession.restore` or
#: :meth:`~InheritedSession.ready` waits for the hand-over and receives it.
PRESTARTED_STATE = "prestarted"


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
    #: Service to supervisor: this process opts in to pre-started updates. The
    #: message carries the write end of its freeze doorbell (a pipe): the
    #: supervisor writes one byte there to ask it to freeze.
    WATCH = b"W"
    #: Pre-started process to supervisor: initialised, waiting for the hand-over.
    READY = b"R"
    #: Service to supervisor: frozen, final state preserved; it exits next.
    FROZEN = b"Z"
    #: Supervisor to a pre-started process: the hand-over is done. Carries the
    #: session fd, then the next session's fd (if any); the token is the
    #: session's direction (:class:`~liveupdate.uapi.SessionDirection`).
    GO = b"G"
    #: Supervisor to a pre-started process, before ``GO``: tokens of the files
    #: of the session handed over, as luod listed them at the hand-over; the
    #: u64 is how many follow (u64 each; a long list takes several messages).
    #: ``restore()`` then needs no listing of its own (none sent: it lists).
    TOKENS = b"T"
    SIZE = 9


def supervisor_message(kind: bytes, token: int = 0) -> bytes:
    return kind + token.to_bytes(8, "little")


#: Tokens in one ``TOKENS`` message at most (8 KiB: well within a socket's buffer).
TOKENS_PER_MESSAGE = 1024


def tokens_message(tokens: Sequence[int]) -> bytes:
    """A :attr:`SupervisorMessage.TOKENS` message carrying ``tokens`` (up to TOKENS_PER_MESSAGE)."""
    if len(tokens) > TOKENS_PER_MESSAGE:
        raise ValueError(f"{len(tokens)} tokens: at most {TOKENS_PER_MESSAGE} per message")
    return supervisor_message(SupervisorMessage.TOKENS, len(tokens)) + b"".join(
        t.to_bytes(8, "little") for t in tokens
    )


def _tokens_of(message: bytes) -> list[int] | None:
    """The tokens a :attr:`SupervisorMessage.TOKENS` message carries; None if malformed."""
    count = int.from_bytes(message[1 : SupervisorMessage.SIZE], "little")
    body = message[SupervisorMessage.SIZE :]
    if len(body) != 8 * count:
        return None
    return [int.from_bytes(body[i : i + 8], "little") for i in range(0, len(body), 8)]


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
    #: Started ahead of an update (``LIVEUPDATE_SESSION_STATE=prestarted``) and
    #: the hand-over not received yet: :attr:`session` and :attr:`next_session`
    #: are placeholders until :meth:`restore` or :meth:`ready` returns.
    prestarted: bool = False
    #: The read end of the freeze doorbell, once :meth:`freeze_fd` opted in.
    _freeze_r: int | None = field(default=None, init=False, repr=False)
    #: The tokens of :attr:`session` the supervisor sent with the hand-over
    #: (``TOKENS``), for :meth:`restore`; None: not sent, restore() lists.
    _handed_tokens: list[int] | None = field(default=None, init=False, repr=False)
    #: Files :meth:`restore` (``defer=True``) retrieved and not yet preserved
    #: again, by token, in order (:meth:`preserve_pending`).
    _pending: dict[int, int] = field(default_factory=dict, init=False, repr=False)

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
        """Drop ``token`` from :attr:`outgoing`, surviving luod's restarts like :meth:`preserve`.

        A file :meth:`restore` left pending is just dropped from the pending ones.
        """
        if self._pending.pop(token, None) is not None:
            self._tell(SupervisorMessage.UNPRESERVED, token)  # its predecessor's copy
            return
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
        self.supervisor.sendmsg(
            [supervisor_message(kind, token)], wire.rights([] if fd is None else [fd])
        )

    def _rebind(self) -> bool:
        """Put the session's current fd (from the supervisor) under ``outgoing``'s fd number.

        False while luod is away. The fd number stays the same, so whatever
        the service built on ``outgoing.fileno()`` still holds.
        """
        assert self.supervisor is not None
        self.supervisor.sendmsg([supervisor_message(SupervisorMessage.SESSION)])
        data, ancdata, flags, _addr = self.supervisor.recvmsg(
            SupervisorMessage.SIZE,
            socket.CMSG_SPACE(array.array("i").itemsize),
            socket.MSG_CMSG_CLOEXEC,
        )
        fds = wire.fds_of(ancdata)
        if not data:
            raise ConnectionError("the supervisor closed its socket")
        if data[:1] != SupervisorMessage.SESSION or len(fds) != 1 or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            return False
        self.outgoing.replace_fd(fds[0])
        return True

    # -- pre-started updates -------------------------------------------------------------

    def freeze_fd(self) -> int:
        """Opt in to pre-started updates; the fd that turns readable when asked to freeze.

        Put it in the service's selector. Once a process has called this,
        ``luoctl update`` starts the next version first, waits until it is
        ready, and only then asks this one to freeze: stop reading, answer
        what is in flight, preserve the final state, call :meth:`frozen` and
        exit. The same fd on every call; without a supervisor it never fires.
        """
        if self._freeze_r is None:
            bell_r, bell_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                self._tell(SupervisorMessage.WATCH, 0, bell_w)
            except BaseException:
                os.close(bell_r)
                raise
            finally:
                os.close(bell_w)  # the supervisor has its copy
            self._freeze_r = bell_r
        return self._freeze_r

    def freeze_requested(self) -> bool:
        """Whether the supervisor asked this process to freeze (consumes the request)."""
        if self._freeze_r is None:
            return False
        try:
            return bool(os.read(self._freeze_r, 64))
        except BlockingIOError:
            return False

    def frozen(self) -> None:
        """Tell the supervisor the final state is preserved; exit right after.

        Preserves first what :meth:`restore` left pending. Closes this
        process's session fds then: from here on the supervisor hands the
        session over, and a late call of this process on the shared session
        sockets would mix with its replies.
        """
        self.preserve_pending()
        for session in (self.session, self.next_session):
            if session is not None:
                session.close()
        self._tell(SupervisorMessage.FROZEN, 0)

    def ready(self) -> None:
        """Started ahead of an update: report ready, then wait for the hand-over.

        Blocks until the supervisor has frozen the old process and handed
        the session over; :attr:`session` and :attr:`next_session` are then
        the real ones. For a service with nothing to take over;
        :meth:`restore` calls it. Does nothing in a process not pre-started.
        """
        if not self.prestarted:
            return
        if self.supervisor is None:
            raise ValueError(f"{SESSION_STATE_ENV}={PRESTARTED_STATE} without {SUPERVISOR_FD_ENV}")
        self._tell(SupervisorMessage.READY, 0)
        fds = array.array("i")
        tokens: list[int] | None = None
        tokens_whole = True
        while True:
            data, ancdata, flags, _addr = self.supervisor.recvmsg(
                SupervisorMessage.SIZE + 8 * TOKENS_PER_MESSAGE,
                socket.CMSG_SPACE(2 * fds.itemsize),
                socket.MSG_CMSG_CLOEXEC,
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:
                raise ConnectionError("the supervisor closed its socket before the hand-over")
            if data[:1] == SupervisorMessage.GO and len(fds) and not flags & socket.MSG_CTRUNC:
                break
            if data[:1] == SupervisorMessage.TOKENS:
                chunk = None if flags & socket.MSG_TRUNC else _tokens_of(data)
                # A list with a piece missing is no list: restore() asks luod then.
                tokens_whole = tokens_whole and chunk is not None
                tokens = (tokens or []) + (chunk or [])
            for fd in fds:  # nothing else is meant for a process waiting here
                os.close(fd)
            del fds[:]
        self._handed_tokens = tokens if tokens_whole else None
        direction = uapi.SessionDirection(int.from_bytes(data[1:], "little"))
        for placeholder in (self.session, self.next_session):
            if placeholder is not None:
                placeholder.close()
        self.session = Session.from_fd(fds[0], direction)
        self.next_session = (
            Session.from_fd(fds[1], uapi.SessionDirection.OUTGOING) if len(fds) > 1 else None
        )
        self.direction = direction
        self.prestarted = False

    def tokens(self, device: str | None = None) -> list[int]:
        """Tokens of the files in the inherited session (luod's listing)."""
        with open_device(device, timeout=30.0) as dev:
            listing = dev.list_sessions(self.session.raw_name)
        for entry in listing.sessions:
            if entry.direction == self.direction:
                return [f.token for f in entry.files or ()]
        return []

    @property
    def pending(self) -> int:
        """How many files :meth:`restore` (``defer=True``) left to preserve again."""
        return len(self._pending)

    def preserve_pending(self, limit: int | None = None) -> int:
        """Preserve again, in :attr:`outgoing`, up to ``limit`` (all: ``None``)
        of the files :meth:`restore` left pending, in one batch; returns how
        many are left. Until a file is preserved again this process alone
        holds it: call it from the first turns of the service's loop."""
        if not self._pending:
            return 0
        tokens = list(self._pending)[:limit]
        batch = {token: self._pending.pop(token) for token in tokens}
        self._preserve_again(batch)
        return len(self._pending)

    def restore(self, device: str | None = None, *, defer: bool = False) -> dict[int, int]:
        """Take a predecessor's files over: ``{token: fd}`` (empty when outgoing).

        Retrieves every file of the incoming session, finishes it, and
        preserves each file again under the same token in the outgoing
        session, so the next update carries them on without any more work.

        In a process started ahead of an update (:attr:`prestarted`), first
        reports ready and waits for the hand-over (:meth:`ready`): initialise
        everything that does not need the predecessor's files before calling it.

        ``defer``: return as soon as the files are retrieved and the incoming
        session finished, and leave preserving them again to
        :meth:`preserve_pending`, called from the service's loop once it
        serves: the clients that waited through the hand-over are answered
        first (a preserve per file, ~40 us each, no longer sits in the
        blackout). The files are as exposed as before (this process alone
        holds them until they are preserved again), only for longer if the
        loop is slow to call it. :meth:`frozen` preserves whatever is left.
        """
        self.ready()
        if self.direction != uapi.SessionDirection.INCOMING:
            return {}
        handed, self._handed_tokens = self._handed_tokens, None
        fds: dict[int, int] = {}
        try:
            tokens = self.tokens(device) if handed is None else handed
            # Batches: over luod's socket, one round trip for all the files
            # rather than one per file (the blackout of a pre-started update).
            fds = self.session.retrieve_many(dict.fromkeys(tokens))
            # A retrieved file counts as preserved until FINISH: finish first.
            # Until each file is preserved again below, this process alone
            # holds it (a crash in between loses it).
            self.session.finish()
            if defer:
                self._pending = dict(fds)
            else:
                self._preserve_again(fds)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def _preserve_again(self, fds: Mapping[int, int]) -> None:
        """Preserve each retrieved ``{token: fd}`` in :attr:`outgoing` in one batch,
        then hand the supervisor its copies; what the batch could not do goes
        through :meth:`preserve` one file at a time."""
        try:
            self.outgoing.preserve_many([(fd, token) for token, fd in fds.items()])
            failures: Mapping[int, LiveUpdateError] = {}
        except StaleGenerationError as exc:
            # luod went away mid-batch: which files made it is unknown (and
            # they went with the session); :meth:`preserve` rebinds first.
            failures = exc.failures or dict.fromkeys(fds, exc)
        except LiveUpdateError as exc:
            if not exc.failures:
                raise
            failures = exc.failures
        for token, fd in fds.items():
            if token not in failures:
                self._tell(SupervisorMessage.PRESERVED, token, fd)
        for token, failed in failures.items():
            if not isinstance(failed, (AlreadyExistsError, StaleGenerationError)):
                raise failed
            self._preserve_one_again(fds[token], token)

    def _preserve_one_again(self, fd: int, token: int) -> None:
        try:
            self.preserve(fd, token)
        except AlreadyExistsError:
            # A predecessor that crashed mid-restore left this token
            # in the outgoing session: the file just retrieved wins.
            self.outgoing.unpreserve(token)
            self.preserve(fd, token)


def inherited_session(environ: dict[str, str] | None = None) -> InheritedSession | None:
    """The session announced by ``luoctl run`` in the environment, or ``None``."""
    env = os.environ if environ is None else environ
    raw_fd = env.get(SESSION_FD_ENV)
    state = env.get(SESSION_STATE_ENV, "outgoing")
    if raw_fd is None and state == PRESTARTED_STATE:
        return _prestarted(env)
    if raw_fd is None:
        return None
    direction = _DIRECTIONS.get(state)
    if direction is None:
        raise ValueError(
            f"{SESSION_STATE_ENV}={state!r}: expected incoming, outgoing or {PRESTARTED_STATE}"
        )
    session = Session.from_fd(int(raw_fd), direction)
    next_fd = env.get(NEXT_SESSION_FD_ENV)
    next_session = (
        Session.from_fd(int(next_fd), uapi.SessionDirection.OUTGOING) if next_fd else None
    )
    name = env.get(SESSION_NAME_ENV) or session.name
    supervisor = _supervisor_socket(env)
    return InheritedSession(name, direction, session, next_session, supervisor)


def _supervisor_socket(env: Mapping[str, str]) -> socket.socket | None:
    supervisor_fd = env.get(SUPERVISOR_FD_ENV)
    supervisor = socket.socket(fileno=int(supervisor_fd)) if supervisor_fd else None
    if supervisor is not None:
        supervisor.set_inheritable(False)
    return supervisor


def _prestarted(env: Mapping[str, str]) -> InheritedSession:
    """A process started ahead of an update: placeholders until the hand-over.

    The session fds are received by :meth:`InheritedSession.ready`; until then
    :attr:`~InheritedSession.session` is an fd on ``/dev/null`` (any call on
    it fails), so that nothing touches the session the old process serves.
    """
    supervisor = _supervisor_socket(env)
    if supervisor is None:
        raise ValueError(f"{SESSION_STATE_ENV}={PRESTARTED_STATE} without {SUPERVISOR_FD_ENV}")
    placeholder = Session.from_fd(
        os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), uapi.SessionDirection.INCOMING
    )
    name = env.get(SESSION_NAME_ENV, "")
    return InheritedSession(
        name, uapi.SessionDirection.INCOMING, placeholder, None, supervisor, prestarted=True
    )
