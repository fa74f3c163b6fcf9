"""kvcache as a participant of luod's live updates: writes wait out luod's freeze.

A real kvcache (``--session`` on luod's device, or under ``luoctl run``)
registers the participant ``kvcache:SESSION``. The test registers a second
participant itself, ``holder``, which keeps luod's FREEZE phase open until
the test answers it: luod sends FREEZE to every participant before it waits
for any answer, so kvcache is frozen while the holder still holds the phase,
and the test looks at kvcache in that window without a clock. kvcache's
``stats`` (a read, so answered while frozen) says when it froze and how many
connections it holds.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from kvservice import KvProcess

import liveupdate
from liveupdate import uapi
from liveupdate.kvcache.arena import Arena
from liveupdate.kvcache.participant import participant_name
from liveupdate.kvcache.protocol import HELD, WRITES, Protocol
from luodtest import Luod, luoctl, luoctl_reboot, state, wait_for

pytestmark = pytest.mark.luod_only

Event = uapi.LuodParticipantEvent


@pytest.fixture
def patient_luod(luod_factory: Callable[..., Luod]) -> Luod:
    """A luod that waits long for its participants: the holder answers when the test says."""
    return luod_factory("--participant-timeout-ms", "120000")


def ask(conn: socket.socket, request: bytes, end: bytes = b"\r\n") -> bytes:
    """Send ``request`` and read the reply up to ``end``."""
    conn.sendall(request)
    return read_reply(conn, end)


def read_reply(conn: socket.socket, end: bytes = b"\r\n") -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = conn.recv(65536)
        assert chunk, f"connection closed after {got!r}"
        got += chunk
    return got


def stats(port: int) -> dict[str, int]:
    """kvcache's ``stats`` over a new connection (answered while writes are frozen)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        reply = ask(conn, b"stats\r\n", b"END\r\n")
    rows = {}
    for line in reply.decode().splitlines():
        if line.startswith("STAT "):
            _, name, value = line.split(" ", 2)
            rows[name] = int(value) if value.isdigit() else 0
    return rows


def cas_of(conn: socket.socket, key: bytes) -> int:
    reply = ask(conn, b"gets " + key + b"\r\n", b"END\r\n")
    assert reply.startswith(b"VALUE " + key), reply
    return int(reply.split(b"\r\n", 1)[0].split()[4])


def serving_participant(kv: KvProcess) -> None:
    wait_for(
        lambda: stats(kv.port).get("liveupdate_participant") == 1,
        f"kvcache did not register its participant:\n{kv.log_text()}",
    )


class Holder:
    """The test's own participant: answers PREPARE, then holds FREEZE until told."""

    def __init__(self, daemon: Luod) -> None:
        with daemon.open() as dev:
            self.part = dev.register_participant("holder")

    def until_freeze(self) -> liveupdate.ParticipantEvent:
        """Accept PREPARE; return the FREEZE event, unanswered."""
        while True:
            ev = self.part.read_event(timeout=60)
            assert ev is not None, "luod sent no event"
            if ev.kind is Event.FREEZE:
                return ev
            assert ev.kind is Event.PREPARE, ev
            self.part.answer(ev)


class Reboot(threading.Thread):
    """``luoctl reboot`` in the background: it lasts as long as the holder holds."""

    def __init__(self, daemon: Luod) -> None:
        super().__init__(daemon=True)
        self.luod = daemon
        self.result: subprocess.CompletedProcess[str] | None = None

    def run(self) -> None:
        self.result = luoctl(self.luod.socket, "reboot", "--wait", "60")

    def outcome(self) -> subprocess.CompletedProcess[str]:
        self.join(120)
        assert self.result is not None, "luoctl reboot did not end"
        return self.result


WRITE_REQUESTS = {
    b"set": b"set k 0 0 1\r\n2\r\n",
    b"add": b"add n 0 0 1\r\n2\r\n",
    b"replace": b"replace k 0 0 1\r\n2\r\n",
    b"append": b"append k 0 0 1\r\n2\r\n",
    b"prepend": b"prepend k 0 0 1\r\n2\r\n",
    b"cas": b"cas k 0 0 1 1\r\n2\r\n",
    b"incr": b"incr k 1\r\n",
    b"decr": b"decr k 1\r\n",
    b"delete": b"delete k\r\n",
    b"touch": b"touch k 100\r\n",
    b"gat": b"gat 100 k\r\n",
    b"gats": b"gats 100 k\r\n",
    b"flush_all": b"flush_all\r\n",
}


def test_every_write_command_is_held_while_writes_are_frozen() -> None:
    assert set(WRITE_REQUESTS) == WRITES
    fd = Arena.create(1 << 20)
    arena = Arena(fd)
    os.close(fd)
    proto = Protocol(arena, "1.6.18-test")
    now = 1000
    out: list[bytes] = []
    first = b"set k 0 0 1\r\n1\r\n"
    assert proto.execute(first, out, now) == (len(first), False)
    stored = arena.last_cas
    proto.freeze_writes()
    for cmd, request in WRITE_REQUESTS.items():
        out = []
        # The read before it is answered; the write and the read behind it wait.
        buf = b"get k\r\n" + request + b"get k\r\n"
        assert proto.execute(buf, out, now) == (7, HELD), cmd
        assert out == [b"VALUE k 0 1\r\n", b"1\r\n", b"END\r\n"], cmd
    assert arena.last_cas == stored
    assert arena.curr_items == 1
    proto.thaw_writes()
    out = []
    incr = WRITE_REQUESTS[b"incr"]
    assert proto.execute(incr, out, now) == (len(incr), False)
    assert out == [b"2\r\n"]
    arena.close()


def test_writes_wait_for_the_live_update_while_reads_are_answered(
    patient_luod: Luod, tmp_path: Path
) -> None:
    kv = KvProcess(tmp_path, "--session", "kv", "--device", patient_luod.socket).start()
    serving_participant(kv)
    writer = socket.create_connection(("127.0.0.1", kv.port), timeout=60)
    reader = socket.create_connection(("127.0.0.1", kv.port), timeout=60)
    assert ask(writer, b"set before 0 0 3\r\nold\r\n") == b"STORED\r\n"
    frozen_at = cas_of(reader, b"before")
    holder = Holder(patient_luod)
    reboot = Reboot(patient_luod)
    reboot.start()
    freeze = holder.until_freeze()
    wait_for(lambda: stats(kv.port)["liveupdate_writes_frozen"] == 1, "kvcache did not freeze")

    writer.sendall(b"set during 0 0 3\r\nnew\r\nget during\r\n")
    wait_for(lambda: stats(kv.port)["liveupdate_held_connections"] == 1, "the set was not held")
    # Reads are answered; the write is not applied and its connection gets no reply.
    assert (
        ask(reader, b"get before during\r\n", b"END\r\n") == b"VALUE before 0 3\r\nold\r\nEND\r\n"
    )
    assert select.select([writer], [], [], 0)[0] == []

    holder.part.answer(freeze)
    result = reboot.outcome()
    assert result.returncode == 0, result.stdout + result.stderr
    # The held set and the read behind it, answered once luod's update is over.
    got = read_reply(writer, b"END\r\n")
    assert got == b"STORED\r\nVALUE during 0 3\r\nnew\r\nEND\r\n"
    # The cas kvcache carried is the one of the freeze, and the held set is the next store.
    assert stats(kv.port)["liveupdate_carried_cas"] == frozen_at
    assert cas_of(reader, b"during") == frozen_at + 1
    with pytest.raises(liveupdate.ParticipantClosedError):
        holder.part.read_event(timeout=30)  # the generation ended
    holder.part.close()
    writer.close()
    reader.close()


def test_the_data_set_at_freeze_comes_back_and_writes_resume(luod: Luod, tmp_path: Path) -> None:
    """Under ``luoctl run``: the participant is named after the session."""
    kv = KvProcess(tmp_path, daemon=luod, session="cache").start()
    serving_participant(kv)
    conn = socket.create_connection(("127.0.0.1", kv.port), timeout=60)
    for key in (b"a", b"b", b"c"):
        assert ask(conn, b"set %s 0 0 1\r\nx\r\n" % key) == b"STORED\r\n"
    last = cas_of(conn, b"c")
    name = participant_name("cache")
    with luod.open() as dev:
        listed = dev.list_sessions().participants
    assert listed is not None and [p.name for p in listed] == [name]

    luoctl_reboot(luod)
    wait_for(
        lambda: stats(kv.port)["liveupdate_carried_cas"] == last,
        f"kvcache did not register again:\n{kv.log_text()}",
    )
    assert f"carried 3 items at cas {last} (no store since the freeze)" in kv.log_text()
    with luod.open() as dev:
        listed = dev.list_sessions().participants
    assert listed is not None
    (mine,) = [p for p in listed if p.name == name]
    assert mine.carried == 16  # the cas and the item count, a u64 each
    assert ask(conn, b"set after 0 0 2\r\nok\r\n") == b"STORED\r\n"
    assert cas_of(conn, b"after") == last + 1
    assert stats(kv.port)["liveupdate_writes_frozen"] == 0

    finish = luoctl(luod.socket, "finish")
    assert finish.returncode == 0, finish.stdout + finish.stderr
    assert state(luod).state == uapi.LuodState.NORMAL
    assert ask(conn, b"incr missing 1\r\nget a\r\n", b"END\r\n") == (
        b"NOT_FOUND\r\nVALUE a 0 1\r\nx\r\nEND\r\n"
    )
    conn.close()


def test_a_cancelled_live_update_resumes_writes(patient_luod: Luod, tmp_path: Path) -> None:
    kv = KvProcess(tmp_path, "--session", "kv", "--device", patient_luod.socket).start()
    serving_participant(kv)
    writer = socket.create_connection(("127.0.0.1", kv.port), timeout=60)
    assert ask(writer, b"set n 0 0 1\r\n1\r\n") == b"STORED\r\n"
    holder = Holder(patient_luod)
    reboot = Reboot(patient_luod)
    reboot.start()
    freeze = holder.until_freeze()
    wait_for(lambda: stats(kv.port)["liveupdate_writes_frozen"] == 1, "kvcache did not freeze")
    writer.sendall(b"incr n 41\r\n")
    wait_for(lambda: stats(kv.port)["liveupdate_held_connections"] == 1, "the incr was not held")

    # The holder refuses the FREEZE: luod abandons the update and CANCELs kvcache.
    holder.part.answer(freeze, errno.EBUSY)
    cancel = holder.part.read_event(timeout=60)  # it had accepted PREPARE
    assert cancel is not None and cancel.kind is Event.CANCEL, cancel
    holder.part.answer(cancel)
    result = reboot.outcome()
    assert result.returncode != 0, result.stdout
    assert "holder" in state(patient_luod).last_error
    assert read_reply(writer) == b"42\r\n"
    assert ask(writer, b"set m 0 0 1\r\n2\r\n") == b"STORED\r\n"
    rows = stats(kv.port)
    assert rows["liveupdate_writes_frozen"] == 0
    assert rows["liveupdate_participant"] == 1  # the same registration: no generation ended
    assert state(patient_luod).state == uapi.LuodState.NORMAL
    assert "writes resume (the live update was cancelled)" in kv.log_text()
    holder.part.close()
    writer.close()


def test_a_luod_without_participants_is_said_once_and_kvcache_serves(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    """A device answering REGISTER_PARTICIPANT as Linux does (``EINVAL``), no control socket."""
    daemon = luod_factory(
        "--compat=linux", "--control-socket", str(tmp_path / "elsewhere" / "control")
    )
    kv = KvProcess(tmp_path, "--session", "kv", "--device", daemon.socket).start()
    with socket.create_connection(("127.0.0.1", kv.port), timeout=30) as conn:
        assert ask(conn, b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
        assert ask(conn, b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    assert stats(kv.port)["liveupdate_participant"] == 0
    assert kv.log_text().count("luod takes no participants") == 1
