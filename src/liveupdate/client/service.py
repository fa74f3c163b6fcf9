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

:func:`inherited_session` reads all of that; :meth:`InheritedSession.restore`
takes a predecessor's files over in one call::

    svc = liveupdate.inherited_session()
    fds = svc.restore()                 # {token: fd}, empty on a fresh start
    listener = fds.get(1)
    if listener is None:
        listener = make_listener()
        svc.outgoing.preserve(listener, 1)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from liveupdate import uapi
from liveupdate.client.device import Session, open_device
from liveupdate.client.errors import AlreadyExistsError

__all__ = [
    "NEXT_SESSION_FD_ENV",
    "SESSION_FD_ENV",
    "SESSION_NAME_ENV",
    "SESSION_STATE_ENV",
    "InheritedSession",
    "direction_name",
    "inherited_session",
]

SESSION_FD_ENV = "LIVEUPDATE_SESSION_FD"
SESSION_NAME_ENV = "LIVEUPDATE_SESSION_NAME"
SESSION_STATE_ENV = "LIVEUPDATE_SESSION_STATE"
NEXT_SESSION_FD_ENV = "LIVEUPDATE_NEXT_SESSION_FD"

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

    @property
    def state(self) -> str:
        """``direction`` as the environment says it: ``"incoming"`` or ``"outgoing"``."""
        return direction_name(self.direction)

    @property
    def outgoing(self) -> Session:
        """Where to preserve state for the next update."""
        return self.next_session if self.next_session is not None else self.session

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
                    self.outgoing.preserve(fd, token)
                except AlreadyExistsError:
                    # A predecessor that crashed mid-restore left this token
                    # in the outgoing session: the file just retrieved wins.
                    self.outgoing.unpreserve(token)
                    self.outgoing.preserve(fd, token)
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
    return InheritedSession(name, direction, session, next_session)
