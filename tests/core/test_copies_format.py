"""The crash copies' format: a snapshot, then deltas, read back exactly.

In process, on a real orchestrator with real memfds: after every change the
copies send what changed (a whole session record, the files added and the
tokens dropped, or ``gone``), and what a keeper would hold (the snapshot,
then the delta lines) parses back into exactly the sessions luod holds. And
the reader is strict: a malformed delta refuses the copies as a whole.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from corelib import Rig

from liveupdate.core.session import Session
from liveupdate.server import fdstore


class Recorder(fdstore.Copies):
    """The copies as a keeper holds them: the last snapshot and the deltas after it."""

    deltas = True

    def __init__(self) -> None:
        super().__init__("test")
        self.state = b""
        self.lines: list[bytes] = []
        self.kinds: list[str] = []

    def _send(self, adds: dict[str, int], state: bytes, removes: list[str], full: bool) -> None:
        self.state, self.lines = state, []
        self.kinds.append("snapshot")

    def _send_delta(self, adds: dict[str, int], line: bytes, removes: list[str]) -> None:
        self.lines.append(line)
        for record in json.loads(line):
            kind = "gone" if "gone" in record else "files" if "add" in record else "whole"
            self.kinds.append(kind)

    def held(self) -> bytes:
        return self.state + b"\n".join(self.lines)


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def held_sessions(rig: Rig) -> list[tuple[bytes, list[int]]]:
    """What luod holds that the copies must: (name, tokens in order) of each session.

    Without the direction: a recovery gives every session back as incoming,
    and the reader returns only the images that hold sessions.
    """
    return sorted((place[1], list(s.files)) for place, s in fdstore._sessions(rig.luo))


def parsed(copies: Recorder) -> list[tuple[bytes, list[int]]]:
    _generation, images = fdstore._parse(copies.held())
    return sorted(
        (session.name, [f.token for f in session.files])
        for image, _keys in images
        for session in image.sessions
    )


def sync(copies: Recorder, rig: Rig) -> None:
    copies._next_sync = 0.0  # no coalescing here: every change is looked at
    copies.sync(rig.luo)


def test_every_change_reads_back_as_the_sessions_luod_holds(rig: Rig) -> None:
    rng = random.Random(7)
    copies = Recorder()
    sync(copies, rig)
    open_: list[Session] = []
    made = 0
    for step in range(400):
        choice = rng.random()
        if not open_ or choice < 0.1:
            made += 1
            open_.append(rig.create(f"s{made}".encode()))
        else:
            session = rng.choice(open_)
            if choice < 0.6 or not session.files:
                rig.preserve(session, rng.randrange(1 << 32), b"data %d" % step)
            elif choice < 0.8:
                rig.luo.sessions.unpreserve_file(session, rng.choice(list(session.files)))
            elif choice < 0.88:
                rig.luo.sessions.set_flags(session, session.flags ^ 1)
            elif choice < 0.94:
                open_.remove(session)
                rig.luo.sessions.hand_over(session)
            else:
                open_.remove(session)
                rig.luo.release_session(session)
        sync(copies, rig)
        assert parsed(copies) == held_sessions(rig), f"step {step}"
    # Each kind of record was sent, and the deltas mostly carried files alone.
    assert {"snapshot", "whole", "files", "gone"} <= set(copies.kinds)
    assert copies.kinds.count("files") > copies.kinds.count("whole")


def test_a_preserve_into_a_big_session_sends_one_file(rig: Rig) -> None:
    copies = Recorder()
    session = rig.create(b"big")
    for token in range(500):
        rig.preserve(session, token)
    sync(copies, rig)
    rig.preserve(session, 500)
    sync(copies, rig)
    (record,) = json.loads(copies.lines[-1])
    assert record["drop"] == [] and [f[0] for f in record["add"]] == [500]
    assert parsed(copies) == held_sessions(rig)


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"dir": 0, "name": b"nobody".hex(), "drop": [], "add": []}, "does not hold"),
        ({"dir": 0, "name": b"s".hex(), "drop": 3, "add": []}, "not a list"),
        ({"dir": 0, "name": b"s".hex(), "drop": ["x"], "add": []}, "not an integer"),
        ({"dir": 0, "name": b"s".hex(), "drop": [], "add": [[1, "note-v1"]]}, "token"),
        ({"dir": 0, "name": b"s".hex(), "drop": [], "add": [[1, 2, None]]}, "string"),
        ({"dir": 0, "name": b"s".hex(), "drop": [], "add": {}}, "not a list"),
        ({"dir": 2, "name": b"s".hex(), "drop": [], "add": []}, "direction"),
    ],
)
def test_a_malformed_delta_refuses_the_copies(rig: Rig, record: object, why: str) -> None:
    copies = Recorder()
    rig.preserve(rig.create(b"s"), 1)
    sync(copies, rig)
    copies.lines.append(fdstore.delta_line([record]))  # type: ignore[list-item]
    with pytest.raises(ValueError, match=why):
        fdstore._parse(copies.held())
