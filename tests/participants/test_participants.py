"""Participants of live updates, with real participant processes.

Each participant is a child process (``participant_agent.py``) that
registers through the client library and reports what it sees as JSON lines;
luod is a real daemon, the live update a real ``luoctl reboot``. In every
case a session preserved beside the participants must come through (nothing
preserved is lost) and the state and errors must be the documented ones
(``docs/concepts/participants.md``).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from participantlib import Agent

import liveupdate
from liveupdate import shim, uapi
from liveupdate.client.control import control_path, open_control
from liveupdate.client.participant import register_participant
from luodtest import (
    REPO,
    Luod,
    assert_retrieves,
    events,
    luoctl,
    luoctl_reboot,
    preserved_session,
    state,
)

pytestmark = pytest.mark.luod_only

State = uapi.LuodState


@pytest.fixture
def agents() -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def start(daemon: Luod, name: str, *args: str) -> Agent:
        agent = Agent(daemon, name, *args)
        started.append(agent)
        agent.expect("registered")
        return agent

    yield start
    for agent in started:
        agent.stop()


def _set_event(daemon: Luod, ev: uapi.LuodEvent) -> int:
    """SET_EVENT through a fresh connection: 0 or the errno."""
    with daemon.open() as dev:
        try:
            dev.set_event(ev)
        except liveupdate.LiveUpdateError as exc:
            return exc.errno
    return 0


def _participants(daemon: Luod) -> list[dict[str, object]]:
    """The ``participants`` of the LIST_SESSIONS document, as luod wrote it."""
    arg = uapi.luod_list_sessions(size=ctypes.sizeof(uapi.luod_list_sessions), fd=-1)
    with daemon.open() as dev:
        dev.ioctl(uapi.LUOD_IOCTL_LIST_SESSIONS, arg)
    with os.fdopen(int(arg.fd), "rb") as listing:
        doc = json.load(listing)
    participants: list[dict[str, object]] = doc["participants"]
    return participants


# -- refusals and failures at PREPARE and FREEZE -------------------------------------------


def test_prepare_refused_by_a_participant_stays_normal_and_cancels_the_others(
    luod: Luod, agents: Callable[..., Agent]
) -> None:
    session = preserved_session(luod, "kept", b"precious")
    willing = agents(luod, "willing")
    refusing = agents(luod, "refusing", "--prepare", "refuse:EBUSY")

    assert _set_event(luod, uapi.LuodEvent.PREPARE) == errno.EBUSY

    info = state(luod)
    assert info.state == State.NORMAL
    assert "'refusing'" in info.last_error and "EBUSY" in info.last_error
    assert "PREPARE" in info.last_error
    willing.expect("event", kind="prepare")
    willing.expect("event", kind="cancel")  # it had accepted: it resumes
    refusing.expect("event", kind="prepare")
    assert not refusing.said("event", kind="cancel")  # it never accepted
    last = {p["name"]: p["last"] for p in _participants(luod)}
    assert last["refusing"]["event"] == "prepare"  # type: ignore[index]
    assert last["refusing"]["error"] == "EBUSY"  # type: ignore[index]
    assert last["willing"]["event"] == "cancel"  # type: ignore[index]
    # Nothing preserved was touched, and a later update without the refusal works.
    refusing.stop()
    assert luoctl_reboot(luod) == (1, 2)
    with luod.open() as dev:
        assert_retrieves(dev.retrieve_session("kept"), 1, b"precious")
    session.close()


def test_luoctl_reboot_refused_at_prepare_names_the_participant(
    luod: Luod, agents: Callable[..., Agent]
) -> None:
    preserved_session(luod, "kept", b"data")
    agents(luod, "vmm", "--prepare", "refuse:EPERM")

    result = luoctl(luod.socket, "reboot", "--wait", "20")

    assert result.returncode != 0
    assert "vmm" in result.stderr + result.stdout
    info = state(luod)
    assert (info.state, info.generation) == (State.NORMAL, 1)
    assert "'vmm' refused (EPERM" in info.last_error
    assert info.outgoing_sessions == 1 and info.preserved_files == 1


def test_luoctl_state_and_sessions_show_participants_and_their_last_answer(
    luod: Luod, agents: Callable[..., Agent]
) -> None:
    agents(luod, "refuser", "--prepare", "refuse:EBUSY")
    assert _set_event(luod, uapi.LuodEvent.PREPARE) == errno.EBUSY

    text = luoctl(luod.socket, "state")
    assert text.returncode == 0, text.stderr
    assert "refuser" in text.stdout and "prepare: EBUSY" in text.stdout
    listed = luoctl(luod.socket, "sessions")
    assert "refuser" in listed.stdout and "prepare: EBUSY" in listed.stdout
    doc = json.loads(luoctl(luod.socket, "--json", "state").stdout)
    (part,) = doc["participants"]
    assert part["name"] == "refuser" and part["phase"] == "idle"
    assert part["last"]["event"] == "prepare" and part["last"]["error"] == "EBUSY"


def test_sigstopped_participant_misses_the_freeze_deadline(
    luod_factory: Callable[..., Luod], agents: Callable[..., Agent]
) -> None:
    luod = luod_factory("--participant-timeout-ms", "300")
    preserved_session(luod, "kept", b"still here")
    stopped = agents(luod, "sleepy", "--data", "0102")
    other = agents(luod, "other")
    assert _set_event(luod, uapi.LuodEvent.PREPARE) == 0
    stopped.expect("event", kind="prepare")
    os.kill(stopped.proc.pid, signal.SIGSTOP)

    assert _set_event(luod, uapi.LuodEvent.REBOOT) == errno.ETIMEDOUT

    info = state(luod)
    assert info.generation == 1 and info.state == State.PREPARED
    assert info.last_reboot_error == errno.ETIMEDOUT
    assert "'sleepy' did not answer within 300 ms at FREEZE" in info.last_error
    other.expect("event", kind="freeze")
    other.expect("event", kind="cancel")  # thawed: the update is abandoned
    # Woken up, it sees the FREEZE it missed, then the CANCEL.
    os.kill(stopped.proc.pid, signal.SIGCONT)
    stopped.expect("event", kind="freeze")
    stopped.expect("event", kind="cancel")
    assert [e["event"] for e in events(luod) if e["event"] == "reboot-aborted"]
    # Nothing lost: the files freeze again and go through once it answers.
    assert _set_event(luod, uapi.LuodEvent.CANCEL) == 0
    luoctl_reboot(luod)
    with luod.open() as dev:
        assert_retrieves(dev.retrieve_session("kept"), 1, b"still here")


@pytest.mark.parametrize("phase", ["prepare", "freeze"])
def test_participant_crashing_mid_event_aborts_the_update(
    luod: Luod, agents: Callable[..., Agent], phase: str
) -> None:
    preserved_session(luod, "kept", b"crash-proof")
    crashing = agents(luod, "crashy", f"--{phase}", "crash")
    witness = agents(luod, "witness")

    assert _set_event(luod, uapi.LuodEvent.REBOOT) == errno.ECONNRESET

    crashing.expect("event", kind=phase)
    assert crashing.proc.wait(10) == 17
    info = state(luod)
    assert info.generation == 1 and info.state == State.NORMAL
    assert f"'crashy' closed its fd at {phase.upper()}" in info.last_error
    witness.expect("event", kind="prepare")
    if phase == "freeze":
        witness.expect("event", kind="freeze")
    witness.expect("event", kind="cancel")
    # The crashed participant is gone; the witness stays registered.
    assert [p["name"] for p in _participants(luod)] == ["witness"]
    luoctl_reboot(luod)
    with luod.open() as dev:
        assert_retrieves(dev.retrieve_session("kept"), 1, b"crash-proof")


# -- the data across the live update ----------------------------------------------------


@pytest.mark.parametrize("no_exec", [False, True], ids=["exec", "no-exec"])
def test_participant_data_comes_back_after_the_reboot_until_finish(
    luod: Luod, agents: Callable[..., Agent], no_exec: bool
) -> None:
    preserved_session(luod, "kept", b"with a participant")
    vmm = agents(luod, "vmm", "--follow", "--data", "00112233445566778899")

    luoctl_reboot(luod, *(["--no-exec"] if no_exec else []))

    vmm.expect("event", kind="prepare")
    vmm.expect("event", kind="freeze", generation=1)
    vmm.expect("closed")
    again = vmm.expect("registered")
    assert again["data"] == "00112233445566778899"
    info = state(luod)
    assert (info.generation, info.state) == (2, State.UPDATED)
    (listed,) = _participants(luod)
    assert listed["carried"] == 10 and listed["phase"] == "idle"
    with luod.open() as dev:
        assert_retrieves(dev.retrieve_session("kept"), 1, b"with a participant")
        dev.set_event(uapi.LuodEvent.FINISH)
    vmm.expect("event", kind="finish", generation=2)
    assert state(luod).state == State.NORMAL
    # After FINISH the data is gone: a new registration of the name gets nothing.
    vmm.stop()
    with luod.open() as dev, register_participant(dev, "vmm") as part:
        assert part.data == b""


def test_data_set_at_prepare_is_kept_through_freeze(
    luod: Luod, agents: Callable[..., Agent]
) -> None:
    cache = agents(luod, "cache", "--follow", "--data-at", "prepare", "--data", "cafe")
    luoctl_reboot(luod)
    cache.expect("event", kind="freeze")
    assert cache.expect("registered")["data"] == "cafe"
    # Registered again in generation 2: the name is taken.
    with luod.open() as dev, pytest.raises(liveupdate.AlreadyExistsError):
        register_participant(dev, "cache")


def test_participant_data_of_a_name_not_registered_again_waits_for_finish(
    luod: Luod,
) -> None:
    with luod.open() as dev:
        part = register_participant(dev, "gone")
    helper = _answer_in_background(part, b"\x07" * 8)
    luoctl_reboot(luod)
    helper.join(10)
    info = state(luod)
    assert info.state == State.UPDATED  # only the participant's data is unfinished
    (listed,) = _participants(luod)
    assert listed["phase"] == "waiting" and listed["carried"] == 8
    assert _set_event(luod, uapi.LuodEvent.FINISH) == 0
    assert state(luod).state == State.NORMAL
    assert _participants(luod) == []


def _answer_in_background(part: liveupdate.Participant, data: bytes) -> threading.Thread:
    def serve() -> None:
        with part:
            part.run(on_freeze=lambda _ev: data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


# -- registration ---------------------------------------------------------------------


def test_register_refuses_a_live_duplicate_and_frees_the_name_on_close(luod: Luod) -> None:
    with luod.open() as dev:
        first = dev.register_participant("dup")
        with pytest.raises(liveupdate.AlreadyExistsError):
            dev.register_participant("dup")
        first.close()
        with dev.register_participant("dup") as second:
            assert second.data == b""


def test_register_checks_name_and_flags(luod: Luod) -> None:
    with luod.open() as dev:
        arg = uapi.luod_register_participant(
            size=ctypes.sizeof(uapi.luod_register_participant), fd=-1
        )
        with pytest.raises(liveupdate.InvalidArgumentError):
            dev.ioctl(uapi.LUOD_IOCTL_REGISTER_PARTICIPANT, arg)  # empty name
        arg.name[0] = ord("x")
        arg.flags = 1
        with pytest.raises(liveupdate.NotSupportedError):
            dev.ioctl(uapi.LUOD_IOCTL_REGISTER_PARTICIPANT, arg)


def test_participant_closed_while_idle_is_dropped_and_does_not_block_prepare(
    luod: Luod, agents: Callable[..., Agent]
) -> None:
    quitter = agents(luod, "quitter")
    quitter.stop()
    assert _set_event(luod, uapi.LuodEvent.PREPARE) == 0
    assert _participants(luod) == []
    assert any(
        e["event"] == "participant-dropped" and e.get("participant") == "quitter"
        for e in events(luod)
    )


def test_participant_fd_speaks_plain_messages(luod: Luod) -> None:
    """No library on the participant side: read() the event, write() the answer."""
    reg = uapi.luod_register_participant(size=ctypes.sizeof(uapi.luod_register_participant), fd=-1)
    reg.name[:3] = b"raw"
    with luod.open() as dev:
        dev.ioctl(uapi.LUOD_IOCTL_REGISTER_PARTICIPANT, reg)
    assert reg.data_len == 0
    with socket.socket(fileno=reg.fd) as sock:
        with luod.open() as dev:
            dev_sock_done: list[int] = []

            def prepare() -> None:
                try:
                    dev.set_event(uapi.LuodEvent.PREPARE)
                    dev_sock_done.append(0)
                except liveupdate.LiveUpdateError as exc:
                    dev_sock_done.append(exc.errno)

            thread = threading.Thread(target=prepare)
            thread.start()
            raw = sock.recv(4096)
            ev = uapi.luod_participant_event.from_buffer_copy(raw)
            assert ev.size == ctypes.sizeof(uapi.luod_participant_event) == len(raw)
            assert ev.event == uapi.LuodParticipantEvent.PREPARE and ev.generation == 1
            assert ev.timeout_ms == uapi.LUOD_PARTICIPANT_TIMEOUT_MS
            # An answer carrying no data may stop after data_len.
            answer = uapi.luod_participant_answer(size=24, seq=ev.seq, error=errno.EAGAIN)
            sock.send(bytes(answer)[:24])
            thread.join(10)
        assert dev_sock_done == [errno.EAGAIN]


# -- a participant in C -----------------------------------------------------------------


def _build_c_participant(tmp_path: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    subprocess.run([str(REPO / "scripts" / "build-shim")], check=True)
    program = tmp_path / "c_participant"
    source = Path(__file__).with_name("c_participant.c")
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", f"-I{shim.include_dir()}"]
    subprocess.run(["gcc", *flags, "-o", str(program), str(source)], check=True)
    return program


def test_c_participant_carries_a_u64_across_the_reboot(luod: Luod, tmp_path: Path) -> None:
    """The v2 subsystem's u64, from C: the fd needs nothing but read() and write()."""
    program = _build_c_participant(tmp_path)
    env = {**luod.env, "LD_PRELOAD": str(shim.shim_path()), "LIVEUPDATE_DEVICE": luod.socket}
    first = subprocess.Popen(
        [str(program), "c-vmm", "0x1122334455667788"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert first.stdout is not None
    assert first.stdout.readline() == "registered none 0\n"
    luoctl_reboot(luod)
    freeze = int(uapi.LuodParticipantEvent.FREEZE)
    prepare = int(uapi.LuodParticipantEvent.PREPARE)
    assert first.stdout.read().splitlines() == [
        f"event {prepare} generation 1",
        f"event {freeze} generation 1",
        "closed",
    ]
    assert first.wait(10) == 0
    second = subprocess.Popen(
        [str(program), "c-vmm", "0"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert second.stdout is not None
        assert second.stdout.readline() == f"registered {0x1122334455667788}\n"
        assert _set_event(luod, uapi.LuodEvent.FINISH) == 0
        finish = int(uapi.LuodParticipantEvent.FINISH)
        assert second.stdout.readline() == f"event {finish} generation 2\n"
    finally:
        second.kill()
        second.wait(10)


# -- who may register ------------------------------------------------------------------

OTHER_UID = 60011
OTHER_GID = 61011


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A world-traversable directory for a socket another uid connects to.

    Requested before ``luod_factory``, so removed after its luods stopped."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another uid")
    directory = Path(tempfile.mkdtemp(prefix="luod-participants-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _open_to_everyone(public_dir: Path, luod_factory: Callable[..., Luod], *args: str) -> Luod:
    """A luod whose socket (mode 0666, in ``public_dir``) another uid can reach."""
    path = str(public_dir / "device")
    daemon = luod_factory("--socket-mode", "0666", *args, start=False)
    # The state stays where the fixture looks for it (the successor's pid).
    daemon.args += ["--state-dir", str(daemon.state_dir)]
    daemon.socket = path
    return daemon.start()


def _register_as_other_uid(daemon: Luod, name: str) -> int:
    """REGISTER_PARTICIPANT from a child running as OTHER_UID: 0 or the errno."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 255
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            with liveupdate.open_device(daemon.socket, timeout=5.0) as dev:
                try:
                    dev.register_participant(name).close()
                    code = 0
                except liveupdate.LiveUpdateError as exc:
                    code = exc.errno
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    try:
        answer = os.read(r, 1)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert answer and answer[0] != 255
    return answer[0]


def test_an_unprivileged_uid_may_not_register_a_participant(
    public_dir: Path, luod_factory: Callable[..., Luod]
) -> None:
    daemon = _open_to_everyone(public_dir, luod_factory)
    assert _register_as_other_uid(daemon, "intruder") == errno.EACCES
    assert _participants(daemon) == []


def test_data_handed_over_under_a_name_belongs_to_its_uid(
    public_dir: Path, luod_factory: Callable[..., Luod]
) -> None:
    # The other uid is an admin: privileged, yet not root's data's owner.
    daemon = _open_to_everyone(public_dir, luod_factory, "--admin-group", str(OTHER_GID))
    assert _register_as_other_uid(daemon, "probe") == 0  # admins may register
    with daemon.open() as dev:
        part = dev.register_participant("roots")
    helper = _answer_in_background(part, b"root's")
    luoctl_reboot(daemon)
    helper.join(10)
    assert _register_as_other_uid(daemon, "roots") == errno.EACCES
    with daemon.open() as dev, dev.register_participant("roots") as again:
        assert again.data == b"root's"


def test_participant_registers_on_the_control_socket_while_an_agent_holds_the_device(
    luod: Luod,
) -> None:
    path = control_path(luod.socket)
    assert path is not None
    with luod.open() as held:  # the single-opener device is busy
        with pytest.raises(liveupdate.DeviceBusyError):
            liveupdate.open_device(luod.socket, timeout=0.05)
        with open_control(path) as control:
            part = control.register_participant("ctl")
        thread = _answer_in_background(part, b"via control")
        held.set_event(uapi.LuodEvent.PREPARE)
        held.set_event(uapi.LuodEvent.CANCEL)
        listing = held.list_sessions()
    assert listing.participants is not None
    (listed,) = listing.participants
    assert listed.name == "ctl" and listed.phase == "idle"
    assert listed.last is not None and (listed.last.event, listed.last.error) == ("cancel", "")
    part.close()
    thread.join(10)


def _raw_participant(daemon: Luod, name: str) -> socket.socket:
    reg = uapi.luod_register_participant(size=ctypes.sizeof(uapi.luod_register_participant), fd=-1)
    raw = name.encode()
    reg.name[: len(raw)] = raw
    with daemon.open() as dev:
        dev.ioctl(uapi.LUOD_IOCTL_REGISTER_PARTICIPANT, reg)
    return socket.socket(fileno=reg.fd)


def _answer_once(sock: socket.socket, make: Callable[[int], bytes]) -> threading.Thread:
    def answer() -> None:
        ev = uapi.luod_participant_event.from_buffer_copy(sock.recv(4096))
        sock.send(make(ev.seq))

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def _answer(seq: int, **fields: int) -> uapi.luod_participant_answer:
    fields.setdefault("size", ctypes.sizeof(uapi.luod_participant_answer))
    return uapi.luod_participant_answer(seq=seq, **fields)


MALFORMED: dict[str, Callable[[int], bytes]] = {
    "too short": lambda seq: bytes(_answer(seq))[:20],
    "unknown flags": lambda seq: bytes(_answer(seq, flags=0x80)),
    "data too long": lambda seq: bytes(
        _answer(seq, flags=uapi.LUOD_PARTICIPANT_ANSWER_DATA, data_len=257)
    ),
    "no errno": lambda seq: bytes(_answer(seq, error=5000)),
    "size beyond the message": lambda seq: bytes(_answer(seq))[:24],
    "size not the length": lambda seq: bytes(_answer(seq)) + b"\x00",
    "nonzero tail": lambda seq: bytes(_answer(seq, size=281)) + b"\x01",
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=list(MALFORMED))
def test_a_malformed_answer_is_a_refusal_with_eproto(
    luod: Luod, make: Callable[[int], bytes]
) -> None:
    with _raw_participant(luod, "sloppy") as sock:
        thread = _answer_once(sock, make)
        assert _set_event(luod, uapi.LuodEvent.PREPARE) == errno.EPROTO
        thread.join(10)
        assert "'sloppy' sent a malformed answer" in state(luod).last_error
        assert state(luod).state == State.NORMAL


def test_a_stale_answer_is_skipped_and_the_right_one_counts(luod: Luod) -> None:
    with _raw_participant(luod, "late") as sock:

        def stale_then_right(seq: int) -> bytes:
            # An answer to some older event first (skipped), then this one's.
            sock.send(bytes(_answer(seq + 1000, error=errno.EBUSY)))
            right = _answer(seq, flags=uapi.LUOD_PARTICIPANT_ANSWER_DATA, data_len=2)
            right.data[:2] = b"ok"
            return bytes(right)

        thread = _answer_once(sock, stale_then_right)
        assert _set_event(luod, uapi.LuodEvent.PREPARE) == 0
        thread.join(10)
        (listed,) = _participants(luod)
        assert listed["phase"] == "prepared" and listed["data_len"] == 2
