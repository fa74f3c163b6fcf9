"""Participants of live updates, for the client library.

A :class:`Participant` is what ``LUOD_IOCTL_REGISTER_PARTICIPANT`` returns:
a process that takes part in every live update of luod. luod asks it, on the
participant fd, to PREPARE, to FREEZE, then to CANCEL (the update was
abandoned) or, in the next generation, to FINISH; it answers each event
with success or an errno before the event's deadline. A refusal (or a
missed deadline) at PREPARE or FREEZE aborts the live update.

Two styles::

    with register_participant(dev, "vmm") as part:     # or dev.register_participant
        restore(part.data)                               # what the last update carried
        part.run(on_freeze=pause_and_save)               # until the generation ends

    # or in an event loop: poll part.fileno(), then
    ev = part.read_event()
    part.answer(ev, data=state_blob)

The fd is a plain socket with plain messages (``uapi.luod_participant_event``
and ``uapi.luod_participant_answer``): this module is a convenience, not a
requirement. When luod's generation ends (a live update succeeded, or luod
stopped) the fd reads EOF: register again with the next generation to get
the data back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from liveupdate import uapi

__all__ = [
    "Participant",
    "ParticipantClosedError",
    "ParticipantEvent",
    "register_participant",
]

EventKind = uapi.LuodParticipantEvent

#: A callback of :meth:`Participant.run`: returns the data to carry (PREPARE,
#: FREEZE) or ``None`` to keep it; raises :class:`OSError` to refuse.
Callback = Callable[["ParticipantEvent"], "bytes | None"]

_EVENT_MIN = uapi.PARTICIPANT_MESSAGES[0].min_size
_EVENT_SIZE = ctypes.sizeof(uapi.luod_participant_event)


class _Device(Protocol):
    """What registering needs of a :class:`~liveupdate.Device` (which imports
    this module: the protocol keeps the two acyclic)."""

    def ioctl(self, cmd: int, buf: ctypes.Structure) -> int: ...


class ParticipantClosedError(ConnectionError):
    """luod closed the participant fd: its generation ended (or it stopped)."""


@dataclass(frozen=True)
class ParticipantEvent:
    """One event luod sent on a participant fd."""

    #: PREPARE, FREEZE, CANCEL or FINISH.
    kind: uapi.LuodParticipantEvent
    #: Its number; the answer carries it back.
    seq: int
    #: Seconds luod waits for the answer, from the send.
    timeout: float
    #: The generation that sent it.
    generation: int


class Participant:
    """A registered participant, from :func:`register_participant` (or
    :meth:`Device.register_participant() <liveupdate.Device.register_participant>`).

    ``name`` is its name; ``data`` what its name carried across the live
    update that started luod's current generation (``b""``: nothing, or a
    cold start).
    """

    def __init__(self, fd: int, name: bytes, data: bytes = b"") -> None:
        self._sock: socket.socket | None = socket.socket(fileno=fd)
        #: Its name.
        self.name = name
        #: What its name carried across the last live update (``b""``: nothing).
        self.data = data

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise ValueError("I/O on a closed participant")
        return self._sock

    def fileno(self) -> int:
        """The participant fd, readable (POLLIN) when an event waits."""
        return self._socket().fileno()

    def read_event(self, timeout: float | None = None) -> ParticipantEvent | None:
        """The next event; ``None`` when ``timeout`` seconds pass without one.

        Raises :class:`ParticipantClosedError` when luod closed the fd, and
        :class:`OSError` (``EPROTO``) for a message that is no event.
        """
        sock = self._socket()
        if timeout is not None:
            ready, _, _ = select.select([sock], [], [], timeout)
            if not ready:
                return None
        try:
            raw = sock.recv(4096)
        except ConnectionResetError:
            # luod closed its end with an answer of ours unread there (a
            # late one, then the generation ended): a close all the same.
            raw = b""
        if not raw:
            raise ParticipantClosedError(errno.ECONNRESET, "luod closed the participant fd")
        if len(raw) < _EVENT_MIN:
            raise OSError(errno.EPROTO, f"participant event of {len(raw)} bytes")
        msg = uapi.luod_participant_event.from_buffer_copy(
            raw[:_EVENT_SIZE].ljust(_EVENT_SIZE, b"\0")
        )
        try:
            kind = EventKind(msg.event)
        except ValueError:
            raise OSError(errno.EPROTO, f"unknown participant event {msg.event}") from None
        return ParticipantEvent(kind, msg.seq, msg.timeout_ms / 1000, msg.generation)

    def answer(self, ev: ParticipantEvent, error: int = 0, data: bytes | None = None) -> None:
        """Answer ``ev``: ``error`` 0 accepts, an errno refuses (PREPARE,
        FREEZE) or reports a failure (CANCEL, FINISH: only logged).

        ``data`` (PREPARE and FREEZE): what to carry to the next generation,
        at most ``uapi.LUOD_PARTICIPANT_DATA_MAX`` bytes; ``None`` keeps what
        was set before.
        """
        msg = uapi.luod_participant_answer(
            size=ctypes.sizeof(uapi.luod_participant_answer), seq=ev.seq, error=error
        )
        if data is not None:
            if len(data) > uapi.LUOD_PARTICIPANT_DATA_MAX:
                raise ValueError(
                    f"participant data is {len(data)} bytes, "
                    f"at most {uapi.LUOD_PARTICIPANT_DATA_MAX}"
                )
            msg.flags = uapi.LUOD_PARTICIPANT_ANSWER_DATA
            msg.data_len = len(data)
            ctypes.memmove(msg.data, data, len(data))
        try:
            self._socket().send(bytes(msg))
        except (BrokenPipeError, ConnectionResetError):
            raise ParticipantClosedError(
                errno.ECONNRESET, "luod closed the participant fd"
            ) from None

    def run(
        self,
        on_prepare: Callback | None = None,
        on_freeze: Callback | None = None,
        on_cancel: Callback | None = None,
        on_finish: Callback | None = None,
    ) -> None:
        """Answer events with the callbacks until luod closes the fd.

        A callback returns the data to carry (PREPARE, FREEZE) or ``None``;
        raising :class:`OSError` answers its errno (a refusal at PREPARE or
        FREEZE); any other exception answers ``EIO`` and propagates. An event
        without a callback is accepted. Returns when the generation ends: after a
        successful FREEZE, that is the live update itself.
        """
        callbacks = {
            EventKind.PREPARE: on_prepare,
            EventKind.FREEZE: on_freeze,
            EventKind.CANCEL: on_cancel,
            EventKind.FINISH: on_finish,
        }
        while self._sock is not None:  # closed meanwhile (by another thread)
            try:
                ev = self.read_event()
            except (ParticipantClosedError, ValueError):
                return
            assert ev is not None
            callback = callbacks[ev.kind]
            data: bytes | None = None
            try:
                if callback is not None:
                    data = callback(ev)
            except OSError as exc:
                self._answer_quietly(ev, exc.errno or errno.EIO)
                continue
            except BaseException:
                self._answer_quietly(ev, errno.EIO)
                raise
            if ev.kind not in (EventKind.PREPARE, EventKind.FREEZE):
                data = None
            try:
                self.answer(ev, 0, data)
            except ParticipantClosedError:
                return

    def _answer_quietly(self, ev: ParticipantEvent, error: int) -> None:
        try:
            self.answer(ev, error)
        except OSError:
            pass  # luod is gone: the failure is ours to report, not this

    def close(self) -> None:
        """Unregister: luod drops the participant at its next event or listing.

        Safe from another thread: a :meth:`run` or :meth:`read_event` blocked
        there returns (the socket is shut down first, which wakes it).
        """
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._sock is None else f"fd={self._sock.fileno()}"
        return f"<Participant {self.name.decode(errors='backslashreplace')!r} {state}>"


def register_participant(device: _Device, name: str | bytes) -> Participant:
    """``LUOD_IOCTL_REGISTER_PARTICIPANT`` on ``device``: a new :class:`Participant`.

    Raises the library's errors: :class:`~liveupdate.PermissionDeniedError`
    for an unprivileged caller or another user's name,
    :class:`~liveupdate.AlreadyExistsError` when the name is registered,
    :class:`~liveupdate.NotSupportedError` on a kernel (``ENOTTY``).
    """
    raw = name.encode() if isinstance(name, str) else bytes(name)
    arg = uapi.luod_register_participant(size=ctypes.sizeof(uapi.luod_register_participant), fd=-1)
    if len(raw) >= uapi.LIVEUPDATE_SESSION_NAME_LENGTH:
        raise ValueError(f"participant name is {len(raw)} bytes, at most 63")
    ctypes.memmove(arg.name, raw, len(raw))
    device.ioctl(uapi.LUOD_IOCTL_REGISTER_PARTICIPANT, arg)
    fd = int(arg.fd)
    try:
        data = bytes(arg.data)[: min(arg.data_len, uapi.LUOD_PARTICIPANT_DATA_MAX)]
        return Participant(fd, raw, data)
    except BaseException:
        os.close(fd)
        raise
