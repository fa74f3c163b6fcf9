"""The crash copies follow every kind of change, whatever its order.

luod's keeper gets, between its full snapshots, deltas: the records of the
sessions that changed, and for a session whose files alone changed only
the files added and dropped (``liveupdate.server.fdstore.files_record``). A
seeded random sequence of every change a client can make (create, preserve,
unpreserve, close, hand over, retrieve, finish) runs against a real luod and
a model of what it holds; luod is then SIGKILLed and started again, and what
comes back must be exactly the model: the same sessions, the same tokens,
each file with its content.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import Luod, events, memfd

pytestmark = pytest.mark.luod_only

ROUNDS = 4
STEPS = 120


def content(step: int) -> bytes:
    return f"step {step}|".encode() * (1 + step % 5)


class Model:
    """What luod holds for this test: per session name, token -> content."""

    def __init__(self, dev: liveupdate.Device) -> None:
        self.dev = dev
        self.open: dict[str, tuple[liveupdate.Session, dict[int, bytes]]] = {}
        #: Handed over, not retrieved: what a restart must give back too.
        self.waiting: dict[str, dict[int, bytes]] = {}
        self.made = 0

    def step(self, rng: random.Random, n: int) -> None:
        choice = rng.random()
        if not self.open or choice < 0.1:
            self.made += 1
            name = f"s{self.made}"
            self.open[name] = (self.dev.create_session(name), {})
            return
        name = rng.choice(sorted(self.open))
        session, files = self.open[name]
        if choice < 0.6 or not files:
            token = rng.randrange(1 << 40)
            fd = memfd(content(n))
            try:
                session.preserve(fd, token)
            finally:
                os.close(fd)
            files[token] = content(n)
        elif choice < 0.8:
            token = rng.choice(sorted(files))
            session.unpreserve(token)
            del files[token]
        elif choice < 0.87:
            session.close()  # released: every file with it
            del self.open[name]
        elif choice < 0.94:
            session.update()  # handed over: waits for its successor
            del self.open[name]
            self.waiting[name] = files
        elif self.waiting:
            # A successor takes a handed-over session and finishes it: gone.
            taken = rng.choice(sorted(self.waiting))
            incoming = self.dev.retrieve_session(taken)
            for token in self.waiting.pop(taken):
                os.close(incoming.retrieve(token))
            incoming.finish()
            incoming.close()

    def expected(self) -> dict[str, dict[int, bytes]]:
        return {**{n: f for n, (_, f) in self.open.items()}, **self.waiting}


def given_back(daemon: Luod) -> dict[str, dict[int, bytes]]:
    """Every session luod holds after the restart, each file's content read."""
    back: dict[str, dict[int, bytes]] = {}
    with liveupdate.open_device(daemon.socket, timeout=5) as dev:
        for info in dev.list_sessions().sessions:
            assert info.direction == uapi.SessionDirection.INCOMING, info
            session = dev.retrieve_session(info.name)
            files: dict[int, bytes] = {}
            for f in info.files or ():
                fd = session.retrieve(f.token)
                try:
                    files[f.token] = os.pread(fd, 1 << 16, 0)
                finally:
                    os.close(fd)
            session.finish()
            session.close()
            back[info.name] = files
    return back


def test_what_a_restart_gives_back_is_exactly_what_luod_held(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    for round_ in range(ROUNDS):
        rng = random.Random(4242 + round_)
        with liveupdate.open_device(daemon.socket, timeout=5) as dev:
            model = Model(dev)
            for n in range(STEPS):
                model.step(rng, n)
            expected = model.expected()
            dev.get_state()
            # The copies are brought up to date after the replies, on the
            # loop's idle turns: give them those turns, then one more call.
            time.sleep(0.3)
            dev.get_state()
            assert daemon.proc is not None
            daemon.proc.kill()
            daemon.proc.wait()
        for session, _ in model.open.values():
            session.close()
        daemon.log = daemon.state_dir / f"restart-{round_}.log"
        daemon.start()
        assert not events(daemon, "session-lost")
        assert given_back(daemon) == expected, f"round {round_}"
    daemon.stop()
