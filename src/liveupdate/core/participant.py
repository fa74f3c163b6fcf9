"""Participants: processes that take part in every live update.

The userspace analog of the LUO v2 *subsystems* (``luo_subsystems.c``): a
participant registers a name (``LUOD_IOCTL_REGISTER_PARTICIPANT``) and is
asked, on its own fd, to take part in each phase of a live update: PREPARE,
FREEZE, then CANCEL (the update was abandoned) or, in the next generation,
FINISH. It answers each event with 0 or an errno, and may set a small blob of
its own data that travels in the handover image and is given back to the
participant of the same name in the next generation, until FINISH.

:class:`ParticipantSet` owns all of it for one generation: the registry, the
owner checks, the data for the next generation and the data received from
the previous one. A phase is *broadcast* synchronously inside the call that
triggers it, as the kernel runs subsystem callbacks inside the ioctl: the
event goes to every participant concerned (in registration order), then
only the participant fds are polled until each has answered or its deadline
passed. luod's loop serves nothing else meanwhile, which is what a freeze
means anyway.

The participant fd is one end of a ``SOCK_SEQPACKET`` socketpair made here,
not by the transport: luod never reads it outside a broadcast, so it is no
endpoint of the event loop. A participant that closes its fd while idle is
dropped lazily, at the next event or listing (:meth:`ParticipantSet.reap`).
The messages are the size-first structs of :mod:`liveupdate.uapi`.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field

from liveupdate import uapi
from liveupdate.core.policy import Limits, Owner, may_access
from liveupdate.events import event
from liveupdate.handover_abi import ParticipantRecord

__all__ = ["Answer", "Participant", "ParticipantPhase", "ParticipantSet", "ParticipantSetError"]

Event = uapi.LuodParticipantEvent

#: Largest answer read: a newer, larger struct's tail must be zero (checked).
_RECV_MAX = 4096
#: Largest errno a participant may answer with (Linux's MAX_ERRNO).
_MAX_ERRNO = 4095
_EVENT_SIZE = ctypes.sizeof(uapi.luod_participant_event)
_ANSWER_SIZE = ctypes.sizeof(uapi.luod_participant_answer)
_ANSWER_MIN = uapi.PARTICIPANT_MESSAGES[1].min_size
_DATA_OFFSET = uapi.luod_participant_answer.data.offset
#: Stale messages discarded before an event at most (see ``_drain``).
_DRAIN_MAX = 64


class ParticipantPhase(enum.Enum):
    """Where a participant stands in the live update under way."""

    #: No live update under way for it (or it was cancelled).
    IDLE = "idle"
    #: It accepted PREPARE.
    PREPARED = "prepared"
    #: It accepted FREEZE.
    FROZEN = "frozen"


@dataclass(frozen=True)
class Answer:
    """How a participant answered (or failed to answer) one event."""

    event: Event
    #: 0: accepted; else the errno (its own, or ETIMEDOUT, ECONNRESET, EPROTO).
    error: int
    #: Why, for the operator ("" when accepted).
    reason: str = ""
    #: ``CLOCK_REALTIME`` ns of the answer (or of the deadline).
    at_ns: int = 0
    #: With LUOD_PARTICIPANT_ANSWER_DATA: the data it sets; ``None``: unchanged.
    data: bytes | None = None

    def describe(self) -> dict[str, object]:
        return {
            "event": self.event.name.lower(),
            "error": errno.errorcode.get(self.error, str(self.error)) if self.error else "",
            "reason": self.reason,
            "at": self.at_ns / 1e9,
        }


@dataclass(eq=False)
class Participant:
    """One registered participant, as luod holds it."""

    name: bytes
    owner: Owner
    #: luod's end of the participant's socketpair.
    sock: socket.socket
    registered: float = field(default_factory=time.time)
    phase: ParticipantPhase = ParticipantPhase.IDLE
    #: What it carries to the next generation (set by its answers).
    data: bytes = b""
    #: It got data of the previous generation back: it is sent FINISH.
    carried: bool = False
    last: Answer | None = None
    closed: bool = False

    @property
    def display_name(self) -> str:
        return self.name.decode(errors="backslashreplace")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class ParticipantSetError(OSError):
    """A broadcast at PREPARE or FREEZE failed: the first participant that
    refused (or missed its deadline, or closed its fd), with its errno."""


class ParticipantSet:
    """Every participant of one generation, and the data they carry.

    Args:
        limits: The participant limit and the deadline of an event.
        generation: This generation's number (sent with each event).
    """

    def __init__(self, limits: Limits, generation: int) -> None:
        self.limits = limits
        self.generation = generation
        #: Registered participants, in registration order.
        self.live: dict[bytes, Participant] = {}
        #: Data handed over by the previous generation, until FINISH.
        self.incoming: dict[bytes, ParticipantRecord] = {}
        self._seq = 0

    # -- registry -------------------------------------------------------------------

    def register(self, name: bytes, owner: Owner) -> tuple[Participant, bytes, int]:
        """Register ``name`` for ``owner``: the participant, the data its name
        carried across the last live update, and the client's end of its fd."""
        self.reap()
        if name in self.live:
            raise OSError(errno.EEXIST, "a participant of this name is registered")
        carried = self.incoming.get(name)
        if carried is not None and not may_access(
            Owner(carried.pid, carried.uid, carried.gid), owner
        ):
            raise OSError(errno.EACCES, "this participant's data belongs to another user")
        if len(self.live) >= self.limits.max_participants:
            raise OSError(errno.ENOMEM, "too many participants")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        participant = Participant(name, owner, ours, carried=carried is not None)
        self.live[name] = participant
        event(
            "participant-registered",
            participant=participant.display_name,
            uid=owner.uid,
            pid=owner.pid,
            carried=0 if carried is None else len(carried.data),
        )
        return participant, b"" if carried is None else carried.data, theirs.detach()

    def unregister(self, participant: Participant, why: str) -> None:
        """Forget ``participant`` and close luod's end of its fd."""
        if self.live.get(participant.name) is participant:
            del self.live[participant.name]
            event("participant-dropped", participant=participant.display_name, why=why)
        participant.close()

    def reap(self) -> None:
        """Drop every participant that closed its fd (checked, not waited for)."""
        for participant in list(self.live.values()):
            if _hung_up(participant):
                self.unregister(participant, "closed its fd")

    def close(self) -> None:
        """Close every participant fd (the generation ends): each sees EOF."""
        for participant in self.live.values():
            participant.close()
        self.live.clear()

    # -- the phases -----------------------------------------------------------------

    def prepare(self) -> None:
        """PREPARE every participant not prepared yet.

        On a failure, every participant that had accepted PREPARE (now or
        before) gets CANCEL, and :class:`ParticipantSetError` names the first
        that did not accept.
        """
        self.reap()
        targets = [p for p in self.live.values() if p.phase is ParticipantPhase.IDLE]
        self._phase(targets, Event.PREPARE, ParticipantPhase.PREPARED)

    def freeze(self) -> None:
        """FREEZE every participant (all prepared); as :meth:`prepare` on failure."""
        self._phase(list(self.live.values()), Event.FREEZE, ParticipantPhase.FROZEN)

    def cancel(self) -> None:
        """CANCEL every prepared or frozen participant, last registered first.
        Cannot fail: what goes wrong is logged."""
        targets = [p for p in self.live.values() if p.phase is not ParticipantPhase.IDLE]
        targets.reverse()
        for participant in targets:
            participant.phase = ParticipantPhase.IDLE
            # What it set was for the update abandoned; the next one sets its own.
            participant.data = b""
        self._notify(targets, Event.CANCEL)

    def finish(self, owner: Owner | None = None) -> None:
        """FINISH: drop the data of the previous generation (only ``owner``'s
        when given) and tell each participant that got it back. Cannot fail."""
        names = [
            name
            for name, record in self.incoming.items()
            if owner is None or may_access(Owner(record.pid, record.uid, record.gid), owner)
        ]
        for name in names:
            del self.incoming[name]
        self.reap()
        targets = [p for p in self.live.values() if p.carried and p.name in names]
        for participant in targets:
            participant.carried = False
        self._notify(targets, Event.FINISH)

    @property
    def unfinished(self) -> bool:
        """Data of the previous generation waits for FINISH."""
        return bool(self.incoming)

    # -- the handover ---------------------------------------------------------------

    def records(self) -> list[ParticipantRecord]:
        """What goes into the image: every registered participant and its data."""
        return [
            ParticipantRecord(p.name, p.owner.uid, p.owner.gid, p.owner.pid, p.data)
            for p in self.live.values()
        ]

    def restore(self, records: list[ParticipantRecord]) -> None:
        """The data handed over, kept until FINISH."""
        self.incoming = {bytes(r.name): r for r in records}

    # -- the listing ----------------------------------------------------------------

    def describe(self, caller: Owner) -> tuple[list[dict[str, object]], int]:
        """The participants ``caller`` may see (the listing), and how many are hidden."""
        self.reap()
        shown: list[dict[str, object]] = []
        hidden = 0
        for p in self.live.values():
            if not may_access(p.owner, caller):
                hidden += 1
                continue
            carried = self.incoming.get(p.name)
            shown.append(
                {
                    "name": p.display_name,
                    "uid": p.owner.uid,
                    "gid": p.owner.gid,
                    "pid": p.owner.pid,
                    "registered": p.registered,
                    "phase": p.phase.value,
                    "data_len": len(p.data),
                    "carried": 0 if carried is None or not p.carried else len(carried.data),
                    "last": None if p.last is None else p.last.describe(),
                }
            )
        for name, record in self.incoming.items():
            if name in self.live:
                continue
            owner = Owner(record.pid, record.uid, record.gid)
            if not may_access(owner, caller):
                hidden += 1
                continue
            shown.append(
                {
                    "name": name.decode(errors="backslashreplace"),
                    "uid": record.uid,
                    "gid": record.gid,
                    "pid": record.pid,
                    "registered": None,
                    "phase": "waiting",
                    "data_len": 0,
                    "carried": len(record.data),
                    "last": None,
                }
            )
        return shown, hidden

    # -- broadcasting ---------------------------------------------------------------

    def _phase(self, targets: list[Participant], kind: Event, reached: ParticipantPhase) -> None:
        """Send ``kind`` to ``targets``: all accept, or all are cancelled (see :meth:`prepare`)."""
        failed: list[tuple[Participant, Answer]] = []
        for participant, answer in self._broadcast(targets, kind):
            if answer.error:
                failed.append((participant, answer))
                continue
            participant.phase = reached
            if answer.data is not None:
                participant.data = answer.data
        if not failed:
            return
        for participant, answer in failed:
            if answer.error == errno.ECONNRESET:
                self.unregister(participant, answer.reason)
        self.cancel()
        first, answer = failed[0]
        raise ParticipantSetError(
            answer.error, f"participant {first.display_name!r} {answer.reason} at {kind.name}"
        )

    def _notify(self, targets: list[Participant], kind: Event) -> None:
        """Send ``kind`` (CANCEL, FINISH) and wait for the answers; failures are logged."""
        for participant, answer in self._broadcast(targets, kind):
            if answer.error:
                event(
                    "participant-failed",
                    logging.WARNING,
                    participant=participant.display_name,
                    event=kind.name.lower(),
                    errno=answer.error,
                    reason=answer.reason,
                )
            if answer.error == errno.ECONNRESET:
                self.unregister(participant, answer.reason)

    def _broadcast(
        self, targets: list[Participant], kind: Event
    ) -> list[tuple[Participant, Answer]]:
        """Send ``kind`` to every target, then wait for every answer until the deadline.

        Returns one :class:`Answer` per target, in ``targets`` order.
        """
        if not targets:
            return []
        timeout_ms = self.limits.participant_timeout_ms
        answers: dict[Participant, Answer] = {}
        waiting: dict[int, tuple[Participant, int]] = {}
        for participant in targets:
            self._drain(participant)
            self._seq += 1
            msg = uapi.luod_participant_event(
                size=_EVENT_SIZE,
                event=kind,
                seq=self._seq,
                timeout_ms=timeout_ms,
                generation=self.generation,
            )
            try:
                participant.sock.send(bytes(msg), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except OSError as exc:
                # A full queue (it never read a former event) is no answer either.
                err = (
                    errno.ECONNRESET
                    if exc.errno in (errno.EPIPE, errno.ECONNRESET)
                    else (exc.errno or errno.EIO)
                )
                answers[participant] = _failure(kind, err, f"could not be sent the event: {exc}")
                continue
            waiting[participant.sock.fileno()] = (participant, self._seq)
            event(
                "participant-event",
                logging.DEBUG,
                participant=participant.display_name,
                event=kind.name.lower(),
                seq=self._seq,
            )
        deadline = time.monotonic() + timeout_ms / 1000
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _mask in poller.poll(max(1, int(left * 1000 + 0.999))):
                participant, seq = waiting[fd]
                answer = _read_answer(participant, kind, seq)
                if answer is None:
                    continue  # a stale answer: keep waiting for this one
                answers[participant] = answer
                del waiting[fd]
                poller.unregister(fd)
        for participant, _seq in waiting.values():
            answers[participant] = _failure(
                kind, errno.ETIMEDOUT, f"did not answer within {timeout_ms} ms"
            )
        result = []
        for participant in targets:
            answer = answers[participant]
            participant.last = answer
            event(
                "participant-answered",
                logging.INFO if not answer.error else logging.WARNING,
                participant=participant.display_name,
                event=kind.name.lower(),
                errno=answer.error,
                reason=answer.reason,
            )
            result.append((participant, answer))
        return result

    def _drain(self, participant: Participant) -> None:
        """Discard what a participant wrote while no event was pending (stale
        answers); a bounded number, so that one writing on and on cannot hold
        luod here (the rest is skipped as stale while its answer is awaited)."""
        for _ in range(_DRAIN_MAX):
            try:
                if not participant.sock.recv(_RECV_MAX, socket.MSG_DONTWAIT):
                    return  # EOF: the send that follows fails, or its answer says so
            except OSError:  # nothing waiting (EAGAIN), or the fd broke
                return


def _failure(kind: Event, err: int, reason: str) -> Answer:
    return Answer(kind, err, reason, time.time_ns())


def _hung_up(participant: Participant) -> bool:
    """Whether the participant closed its end (POLLHUP, without reading)."""
    if participant.closed:
        return True
    poller = select.poll()
    poller.register(participant.sock.fileno(), select.POLLIN)
    return any(mask & (select.POLLHUP | select.POLLERR) for _fd, mask in poller.poll(0))


def _read_answer(participant: Participant, kind: Event, seq: int) -> Answer | None:
    """The answer waiting on ``participant``'s fd; ``None`` for a stale one."""
    try:
        raw = participant.sock.recv(_RECV_MAX, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        return _failure(kind, errno.ECONNRESET, f"failed: its fd broke ({exc.strerror})")
    if not raw:
        return _failure(kind, errno.ECONNRESET, "closed its fd")
    if len(raw) < _ANSWER_MIN:
        return _failure(kind, errno.EPROTO, f"sent a malformed answer ({len(raw)} bytes)")
    msg = uapi.luod_participant_answer.from_buffer_copy(
        raw[:_ANSWER_SIZE] + bytes(max(0, _ANSWER_SIZE - len(raw)))
    )
    if msg.seq != seq:
        return None
    problem = _answer_problem(msg, raw, kind)
    if problem is not None:
        return _failure(kind, errno.EPROTO, f"sent a malformed answer ({problem})")
    data = None
    if msg.flags & uapi.LUOD_PARTICIPANT_ANSWER_DATA and not msg.error:
        data = bytes(msg.data)[: msg.data_len]
    if msg.error:
        name = errno.errorcode.get(msg.error, str(msg.error))
        return Answer(
            kind, msg.error, f"refused ({name}: {os.strerror(msg.error)})", time.time_ns()
        )
    return Answer(kind, 0, "", time.time_ns(), data)


def _answer_problem(msg: uapi.luod_participant_answer, raw: bytes, kind: Event) -> str | None:
    if msg.size != len(raw) or msg.size < _ANSWER_MIN:
        return f"size {msg.size} for {len(raw)} bytes"
    if any(raw[_ANSWER_SIZE : msg.size]):
        return "unknown fields past the struct are not zero"
    if msg.flags & ~uapi.LUOD_PARTICIPANT_ANSWER_FLAGS:
        return f"unknown flags {msg.flags:#x}"
    if msg.error > _MAX_ERRNO:
        return f"error {msg.error} is no errno"
    if msg.flags & uapi.LUOD_PARTICIPANT_ANSWER_DATA:
        if kind not in (Event.PREPARE, Event.FREEZE):
            return f"data with {kind.name}"
        if msg.data_len > uapi.LUOD_PARTICIPANT_DATA_MAX:
            return f"data_len {msg.data_len} beyond {uapi.LUOD_PARTICIPANT_DATA_MAX}"
        if msg.size < min(_ANSWER_SIZE, _DATA_OFFSET + msg.data_len):
            return "data_len beyond the message"
    return None
