"""The client side of a participant fd, against a plain socketpair standing for luod.

The test plays luod: it writes ``luod_participant_event`` messages and reads
the ``luod_participant_answer`` messages the library sends back, so each
rule of :class:`liveupdate.Participant` is pinned without a daemon.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from collections.abc import Iterator

import pytest

from liveupdate import uapi
from liveupdate.client.participant import (
    Participant,
    ParticipantClosedError,
    ParticipantEvent,
)

Kind = uapi.LuodParticipantEvent


@pytest.fixture
def pair() -> Iterator[tuple[Participant, socket.socket]]:
    ours, luods = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    part = Participant(ours.detach(), b"tested", b"carried")
    luods.settimeout(10)
    yield part, luods
    part.close()
    luods.close()


def send_event(luods: socket.socket, kind: int, seq: int, timeout_ms: int = 5000) -> None:
    ev = uapi.luod_participant_event(
        size=ctypes.sizeof(uapi.luod_participant_event),
        event=kind,
        seq=seq,
        timeout_ms=timeout_ms,
        generation=3,
    )
    luods.send(bytes(ev))


def read_answer(luods: socket.socket) -> uapi.luod_participant_answer:
    raw = luods.recv(4096)
    return uapi.luod_participant_answer.from_buffer_copy(
        raw.ljust(ctypes.sizeof(uapi.luod_participant_answer), b"\0")
    )


def test_an_event_reads_as_its_kind_number_deadline_and_generation(
    pair: tuple[Participant, socket.socket],
) -> None:
    part, luods = pair
    assert part.read_event(timeout=0) is None  # nothing yet
    send_event(luods, Kind.FREEZE, 7, timeout_ms=1500)
    assert part.read_event(timeout=10) == ParticipantEvent(Kind.FREEZE, 7, 1.5, 3)
    assert part.data == b"carried"


def test_an_answer_carries_data_only_when_given(pair: tuple[Participant, socket.socket]) -> None:
    part, luods = pair
    ev = ParticipantEvent(Kind.PREPARE, 1, 5.0, 3)
    part.answer(ev, data=b"\x01\x02")
    got = read_answer(luods)
    assert (got.seq, got.error, got.flags, got.data_len) == (
        1,
        0,
        uapi.LUOD_PARTICIPANT_ANSWER_DATA,
        2,
    )
    assert bytes(got.data)[:2] == b"\x01\x02"
    part.answer(ev, errno.EBUSY)
    got = read_answer(luods)
    assert (got.error, got.flags, got.data_len) == (errno.EBUSY, 0, 0)
    with pytest.raises(ValueError, match="at most"):
        part.answer(ev, data=bytes(uapi.LUOD_PARTICIPANT_DATA_MAX + 1))


@pytest.mark.parametrize(
    ("message", "why"),
    [(b"\x08\0\0\0", "of 4 bytes"), (None, "unknown participant event 99")],
    ids=["short", "unknown-event"],
)
def test_a_message_that_is_no_event_is_eproto(
    pair: tuple[Participant, socket.socket], message: bytes | None, why: str
) -> None:
    part, luods = pair
    if message is None:
        send_event(luods, 99, 1)
    else:
        luods.send(message)
    with pytest.raises(OSError, match=why) as exc:
        part.read_event()
    assert exc.value.errno == errno.EPROTO


def test_run_answers_each_event_with_its_callback_until_luod_closes(
    pair: tuple[Participant, socket.socket],
) -> None:
    part, luods = pair
    seen: list[Kind] = []

    def refuse(ev: ParticipantEvent) -> bytes | None:
        seen.append(ev.kind)
        raise OSError(errno.EAGAIN, "not now")

    def carry(ev: ParticipantEvent) -> bytes | None:
        seen.append(ev.kind)
        return b"state"

    for seq, kind in enumerate([Kind.PREPARE, Kind.CANCEL, Kind.FREEZE, Kind.FINISH], 1):
        send_event(luods, kind, seq)
    luods.shutdown(socket.SHUT_WR)  # then the generation ends
    part.run(on_prepare=refuse, on_freeze=carry, on_finish=carry)
    assert seen == [Kind.PREPARE, Kind.FREEZE, Kind.FINISH]
    answers = [read_answer(luods) for _ in range(4)]
    assert [(a.seq, a.error) for a in answers] == [(1, errno.EAGAIN), (2, 0), (3, 0), (4, 0)]
    # Data goes with PREPARE and FREEZE only: FINISH's return value is not carried.
    assert [a.data_len for a in answers] == [0, 0, 5, 0]


def test_a_callback_that_fails_otherwise_answers_eio_and_raises(
    pair: tuple[Participant, socket.socket],
) -> None:
    part, luods = pair

    def broken(ev: ParticipantEvent) -> bytes | None:
        raise RuntimeError("bug")

    send_event(luods, Kind.PREPARE, 1)
    with pytest.raises(RuntimeError, match="bug"):
        part.run(on_prepare=broken)
    assert read_answer(luods).error == errno.EIO


def test_answering_after_luod_closed_is_a_close(pair: tuple[Participant, socket.socket]) -> None:
    part, luods = pair
    luods.close()
    with pytest.raises(ParticipantClosedError):
        part.answer(ParticipantEvent(Kind.FREEZE, 1, 5.0, 3))


def test_a_closed_participant_refuses_io(pair: tuple[Participant, socket.socket]) -> None:
    part, _luods = pair
    assert "fd=" in repr(part)
    part.close()
    assert part.closed and "closed" in repr(part)
    with pytest.raises(ValueError, match="closed participant"):
        part.fileno()
    part.run()  # returns at once
    part.close()  # idempotent


def test_a_close_with_our_answer_unread_is_a_close_not_a_reset() -> None:
    ours, luods = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    part = Participant(ours.detach(), b"late")
    # An answer luod never read (it came too late), then luod's end closes:
    # the kernel reports ECONNRESET on our next receive.
    with socket.socket(fileno=os.dup(part.fileno())) as view:
        view.send(b"an answer nobody reads")
    luods.close()
    with pytest.raises(ParticipantClosedError):
        part.read_event(timeout=10)
    part.close()
