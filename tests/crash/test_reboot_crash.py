"""Crash safety of luod's live update (semantics.md, "Reboot": the crash promise).

A SIGKILL of the daemon at any point of a reboot, followed by a restart, must
leave the complete old generation, the complete new one, or, where the
process that held the fds is gone, a clear report of what was lost. With a
single daemon process the holder always dies with it, so every test here
expects the report:

* the restarted (cold) luod serves, replacing the dead daemon's stale socket;
* its log names every lost session with its tokens (``session-lost``), and
  ``GET_STATE.lost_sessions`` counts them;
* nothing is half-restored: no name is retrievable, every name is free again
  and the daemon holds none of the files;
* the image it reports from is kept (``lost-*-handover.dtb``) and
  ``luoctl inspect`` reads it.

The kill points come from luod's ``LUOD_FAULT_FILE`` hook. The test keeps
its own fd to every memfd it preserves, so it knows exactly what was held and
can check that the files are intact and preservable again after the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import liveupdate
from liveupdate.cli.luoctl import main as luoctl_main
from liveupdate.core.file import HandlerRegistry
from liveupdate.core.luo import Orchestrator
from liveupdate.core.policy import Limits
from liveupdate.handover_abi import FileRecord, HandoverImage, SessionRecord
from liveupdate.handover_codec import encode_image
from liveupdate.server import lossreport
from liveupdate.server.reexec import ReexecDriver
from liveupdate.server.safefs import StateDir
from liveupdate.server.transport import DeviceServer
from luodtest import LUOCTL, Luod, events, luoctl, memfd, wait_for

pytestmark = pytest.mark.luod_only

#: The sessions every crash test holds: name -> tokens. The first session has
#: files (the ``freeze`` fault fires after the first file's freeze), there is
#: more than one session (``restore`` fires after the first restored one), and
#: an empty session must be reported too.
SESSIONS: dict[str, tuple[int, ...]] = {
    "db": (0x0, 0x1A),
    "cache": (2**64 - 1,),
    "idle": (),
}

#: The steps at which a SIGKILL of luod (the old generation) loses what it held:
#: the successor has not got every fd yet. Later steps, and a SIGKILL of the
#: successor, are in ``test_successor_crash.py``.
STEPS = ["freeze", "after-image", "before-handoff"]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def run_luod(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run a luod that is expected to refuse to start (fails the test if it serves)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "liveupdate.server.luod", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the failure mode
        pytest.fail(f"luod {args} did not exit: it is serving\n{exc.stderr!r}")


def content(name: str, token: int) -> bytes:
    return f"{name}/{token:#x}|".encode() * 200


class Held:
    """What the test preserved in one daemon: sessions plus its own memfd fds."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.sessions: dict[str, liveupdate.Session] = {}
        #: (name, token) -> the test's own fd to the preserved memfd.
        self.memfds: dict[tuple[str, int], int] = {}

    def fill(self, daemon: Luod, sessions: dict[str, tuple[int, ...]] = SESSIONS) -> Held:
        with daemon.open() as dev:
            for name, tokens in sessions.items():
                session = self.stack.enter_context(dev.create_session(name))
                self.sessions[name] = session
                for token in tokens:
                    fd = memfd(content(name, token), "crash-test")
                    self.stack.callback(os.close, fd)
                    session.preserve(fd, token)
                    self.memfds[name, token] = fd
        return self

    def assert_intact(self) -> None:
        """The test's own fds still show every byte it wrote (its reference is alive)."""
        for (name, token), fd in self.memfds.items():
            expected = content(name, token)
            assert os.pread(fd, len(expected) + 1, 0) == expected

    def inodes(self) -> set[tuple[int, int]]:
        return {(st.st_dev, st.st_ino) for st in map(os.fstat, self.memfds.values())}

    def close(self) -> None:
        self.stack.close()


@pytest.fixture
def held() -> Iterator[Held]:
    h = Held()
    try:
        yield h
    finally:
        h.close()


def daemon_inodes(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file the process ``pid`` has open."""
    found = set()
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def cold_restart(daemon: Luod, log_name: str = "cold.log") -> None:
    """Start luod again on the same socket and state dir, without any fault."""
    daemon.env.pop("LUOD_FAULT_FILE", None)
    daemon.log = daemon.state_dir / log_name
    daemon.start()


def lost_sessions(daemon: Luod) -> dict[str, tuple[int, list[int]]]:
    """The ``session-lost`` events of ``daemon``: name -> (files, tokens)."""
    return {
        e["session"]: (e["files"], [int(t, 16) for t in e["tokens"].split(",") if t])
        for e in events(daemon, "session-lost")
    }


def expected_lost(sessions: dict[str, tuple[int, ...]] = SESSIONS) -> dict[str, Any]:
    return {name: (len(tokens), list(tokens)) for name, tokens in sessions.items()}


def crash_during_reboot(daemon: Luod, step: str) -> subprocess.CompletedProcess[str]:
    """``luoctl reboot`` with the fault armed; returns luoctl's result."""
    result = luoctl(daemon.socket, "reboot", "--wait", "10", timeout=30)
    assert daemon.proc.wait(10) == -signal.SIGKILL, daemon.log_text()
    assert events(daemon, "fault-kill", step=step)
    return result


def assert_reported_lost(daemon: Luod, held: Held) -> Path:
    """The promise after a crash: report, nothing half-restored, names free.

    Returns the kept image.
    """
    # (a) it serves, and it replaced the dead daemon's socket file itself
    assert events(daemon, "stale-socket-removed")
    with daemon.open() as dev:
        info = dev.get_state()
        # (b) every lost session is named, with its tokens, and counted
        assert lost_sessions(daemon) == expected_lost()
        assert events(daemon, "lost-report", sessions=len(SESSIONS)), daemon.log_text()
        assert info.lost_sessions == len(SESSIONS)
        assert info.generation == 1  # a cold start, not a half-restored next generation
        assert info.state == liveupdate.uapi.LuodState.NORMAL
        assert info.incoming_sessions == 0
        assert info.preserved_files == 0
        # (c) never a mix: nothing retrievable, every name free again
        for name in SESSIONS:
            with pytest.raises(liveupdate.NotFoundError):
                dev.retrieve_session(name)
        assert not held.inodes() & daemon_inodes(daemon.pid), "the new daemon holds a file"
        held.assert_intact()
        with contextlib.ExitStack() as stack:
            for name, tokens in SESSIONS.items():
                session = stack.enter_context(dev.create_session(name))
                for token in tokens:  # the files are not held: preservable again
                    session.preserve(held.memfds[name, token], token)
    assert (daemon.state_dir / "state").read_text() == "normal\n"
    # (d) the image is kept under a new name and luoctl inspect lists it
    assert not (daemon.state_dir / "handover.dtb").exists()
    assert not (daemon.state_dir / "journal.dtb").exists()
    assert not (daemon.state_dir / "reboot-in-progress").exists()
    kept = sorted(daemon.state_dir.glob("lost-*.dtb"))
    assert len(kept) == 1
    # the report says where to look
    assert events(daemon, "lost-report", image=str(kept[0])), daemon.log_text()
    return kept[0]


def assert_inspect_lists(image: Path) -> None:
    """``luoctl inspect`` (run in-process: it only reads the file) lists every session."""
    runner = CliRunner()
    result = runner.invoke(luoctl_main, ["--json", "inspect", str(image)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {s["name"]: [f["token"] for f in s["files"]] for s in data["sessions"]} == {
        name: list(tokens) for name, tokens in SESSIONS.items()
    }
    assert all(f["compatible"] == "memfd-v1" for s in data["sessions"] for f in s["files"])
    text = runner.invoke(luoctl_main, ["inspect", str(image)])
    assert text.exit_code == 0, text.output
    assert f"{len(SESSIONS)} sessions" in text.stdout
    for name in SESSIONS:
        assert name in text.stdout
    assert "0x1a" in text.stdout


# ---------------------------------------------------------------------------
# the crash promise, step by step
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_during_reboot_is_reported(
    step: str, luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    faults = tmp_path / "faults"
    faults.write_text(f"kill-at {step}\n")
    daemon = luod_factory(env={"LUOD_FAULT_FILE": str(faults)})
    held.fill(daemon)

    result = crash_during_reboot(daemon, step)
    assert result.returncode == 1, result
    assert "luoctl:" in result.stderr
    # What the dead daemon left: the marker of a reboot under way, a record of
    # what it held (before the freeze finished, the journal it brought up to
    # date at the start of the reboot; after it, the frozen image) and its socket.
    assert (daemon.state_dir / "reboot-in-progress").exists()
    record = "journal.dtb" if step == "freeze" else "handover.dtb"
    assert (daemon.state_dir / record).exists()
    assert Path(daemon.socket).exists()
    # The old generation's session fds are dead, and say so.
    with pytest.raises(liveupdate.StaleGenerationError):
        held.sessions["db"].get_name()

    cold_restart(daemon)
    kept = assert_reported_lost(daemon, held)
    assert_inspect_lists(kept)


def test_eio_generation_killed_is_reported(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    """A generation that could not restore (EIO, holding everything) and is then
    killed: the image it kept in place is reported at the next cold start.

    An in-process reboot (``--no-exec``) is made to fail its restore: while luod
    is stopped after writing the image, the image's handler name is changed to
    one no luod knows (same length: the image stays well-formed)."""
    faults = tmp_path / "faults"
    faults.write_text("stop-at after-image\n")
    daemon = luod_factory(env={"LUOD_FAULT_FILE": str(faults)})
    held.fill(daemon)
    reboot = subprocess.Popen(
        [*LUOCTL, "--socket", daemon.socket, "reboot", "--no-exec", "--wait", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    image = daemon.state_dir / "handover.dtb"
    try:
        wait_for(lambda: bool(events(daemon, "fault-stop", step="after-image")), "the stop")
        original = image.read_bytes()
        image.write_bytes(original.replace(b"memfd-v1", b"memfd-v9"))
        faults.write_text("")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
        reboot.wait(30)
    wait_for(lambda: bool(events(daemon, "restore-failed")), "restore-failed")
    with pytest.raises(liveupdate.OrchestratorIOError):
        daemon.open(timeout=0)
    assert image.exists()  # kept for a retry
    image.write_bytes(original)  # what the report reads (it names the real handler)

    daemon.proc.kill()
    assert daemon.proc.wait(10) == -signal.SIGKILL
    cold_restart(daemon)
    assert_inspect_lists(assert_reported_lost(daemon, held))


# ---------------------------------------------------------------------------
# controls and limits
# ---------------------------------------------------------------------------


def test_normal_reboot_leaves_nothing_to_report(
    luod_factory: Callable[..., Luod], held: Held
) -> None:
    daemon = luod_factory()
    held.fill(daemon)
    result = luoctl(daemon.socket, "reboot", "--wait", "10")
    assert result.returncode == 0, result.stderr
    assert not (daemon.state_dir / "handover.dtb").exists()
    assert (daemon.state_dir / "last-handover.dtb").exists()
    with daemon.open() as dev:
        assert dev.get_state().incoming_sessions == len(SESSIONS)

    assert daemon.stop() == 0
    cold_restart(daemon)
    assert not events(daemon, "session-lost") and not events(daemon, "lost-report")
    assert not list(daemon.state_dir.glob("lost-*"))
    with daemon.open() as dev:
        assert dev.get_state().lost_sessions == 0


def test_sigkill_outside_a_reboot_is_reported_from_the_journal(
    luod_factory: Callable[..., Luod], held: Held
) -> None:
    """A daemon killed while merely serving: its journal (rewritten at most
    every --journal-interval seconds) names what it held, so the next start
    reports every session as lost instead of losing them silently."""
    daemon = luod_factory("--journal-interval", "0.05")
    held.fill(daemon)
    journal = daemon.state_dir / "journal.dtb"
    wait_for(lambda: journal.exists() and b"cache" in journal.read_bytes(), "the journal")
    time.sleep(0.2)  # the last write covers every session
    daemon.proc.kill()
    assert daemon.proc.wait(10) == -signal.SIGKILL

    cold_restart(daemon)
    assert lost_sessions(daemon) == expected_lost()
    why = {e["why"] for e in events(daemon, "session-lost")}
    assert why == {"the previous luod died (outside a live update)"}
    assert not journal.exists() or b"cache" not in journal.read_bytes()
    with daemon.open() as dev:
        assert dev.get_state().lost_sessions == len(SESSIONS)
    assert list(daemon.state_dir.glob("lost-*-journal.dtb"))
    held.assert_intact()


def test_clean_stop_leaves_no_journal(luod_factory: Callable[..., Luod], held: Held) -> None:
    """SIGTERM releases the sessions on purpose: nothing to report later."""
    daemon = luod_factory("--journal-interval", "0.05")
    held.fill(daemon)
    time.sleep(0.3)
    assert (daemon.state_dir / "journal.dtb").exists()
    assert daemon.stop() == 0
    assert not (daemon.state_dir / "journal.dtb").exists()
    cold_restart(daemon)
    assert not events(daemon, "session-lost")


def test_failed_reboot_removes_its_intent(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    """A reboot that failed (and rolled back) removes its intent image: the old
    generation goes on, and a later SIGKILL is one outside a reboot."""
    faults = tmp_path / "faults"
    faults.write_text("freeze-fail EBUSY 0x1a\n")
    daemon = luod_factory(env={"LUOD_FAULT_FILE": str(faults)})
    held.fill(daemon)
    result = luoctl(daemon.socket, "reboot", "--wait", "10")
    assert result.returncode == 1
    assert "EBUSY" in result.stderr
    assert events(daemon, "reboot-aborted")
    assert not (daemon.state_dir / "handover.dtb").exists()
    with daemon.open() as dev:
        assert dev.get_state().outgoing_sessions == len(SESSIONS)  # still the old generation


def test_sigkill_during_reboot_preflight_is_reported(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    marker = tmp_path / "preflight.pid"
    wrapper = tmp_path / "luod-slow-preflight"
    wrapper.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  if [ "$arg" = --successor-fd ]; then echo $$ > ' + str(marker) + "; exec sleep 30; fi\n"
        "done\n"
        f'exec {sys.executable} -m liveupdate.server.luod "$@"\n'
    )
    wrapper.chmod(0o755)
    daemon = luod_factory("--exec", str(wrapper))
    held.fill(daemon)
    reboot = subprocess.Popen(
        [*LUOCTL, "--socket", daemon.socket, "reboot", "--no-prepare", "--wait", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: marker.exists() and marker.read_text().strip() != "", "preflight")
        daemon.proc.kill()  # SIGKILL while REBOOT waits for its pre-flight
        assert daemon.proc.wait(10) == -signal.SIGKILL
        assert reboot.wait(10) == 1
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(marker.read_text()), signal.SIGKILL)
        reboot.kill()
        reboot.wait()

    cold_restart(daemon)
    with daemon.open() as dev:
        assert dev.get_state().lost_sessions == len(SESSIONS)
    assert lost_sessions(daemon) == expected_lost()


def test_luoctl_reboot_wait_is_bounded_when_next_generation_hangs(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    faults = tmp_path / "faults"
    faults.write_text("stop-at successor-takeover\n")
    daemon = luod_factory(env={"LUOD_FAULT_FILE": str(faults)})
    held.fill(daemon, {"db": (1,)})
    try:
        start = time.monotonic()
        try:
            result = luoctl(daemon.socket, "reboot", "--wait", "1", timeout=4)
        except subprocess.TimeoutExpired:
            pytest.fail("luoctl reboot --wait 1 still waiting after 4 s")
        assert time.monotonic() - start < 4
        assert result.returncode == 1
        assert "did not start serving" in result.stderr
    finally:
        for started in events(daemon, "successor-started"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(started["successor"]), signal.SIGKILL)  # it is stopped
        daemon.proc.kill()
        daemon.proc.wait()


def test_two_reports_in_one_second_keep_both_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lossreport.time, "strftime", lambda *_a: "20260101T000000")
    for number, name in enumerate([b"first", b"second"], start=1):
        image = HandoverImage(
            liveupdate_number=number,
            sessions=[SessionRecord(name=name, uid=0, gid=0, pid=1, created=1.0)],
        )
        (tmp_path / "handover.dtb").write_bytes(encode_image(image))
        assert lossreport.report_lost(tmp_path) == 1
    assert len(list(tmp_path.glob("lost-*"))) == 2


def test_failed_in_process_restore_keeps_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--no-exec`` (or a failed exec) restores in-process; when that fails the
    image must stay in place, as it does after an exec (restore_from_image)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    fd = memfd(b"held", "crash-test")
    try:
        image = HandoverImage(
            liveupdate_number=1,
            sessions=[
                SessionRecord(
                    name=b"db",
                    uid=0,
                    gid=0,
                    pid=1,
                    created=1.0,
                    files=[FileRecord(token=1, compatible="memfd-v1", fd=fd, data=b"")],
                )
            ],
        )
        (tmp_path / "handover.dtb").write_bytes(encode_image(image))
        no_handlers = HandlerRegistry()  # the restore cannot fit: no memfd-v1
        old = Orchestrator(no_handlers)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        server = DeviceServer(old, listener)
        driver = ReexecDriver(
            server,
            no_handlers,
            Limits(),
            StateDir(str(tmp_path)),
            ["/nonexistent/luod"],
            [],
            -1,
        )
        try:
            driver.restore_in_process()  # from the handover.dtb written above
            assert server.luo is not old
            assert server.luo.restore_error is not None  # the EIO generation
            assert (tmp_path / "handover.dtb").exists()
        finally:
            server.close()
            listener.close()
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# never steal a live daemon's socket
# ---------------------------------------------------------------------------


def test_second_luod_on_same_state_dir_is_refused(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory()
    inode = os.stat(daemon.socket).st_ino
    result = run_luod("--socket", daemon.socket)
    assert result.returncode == 1
    assert f"luod: another luod holds {daemon.state_dir / 'luod.lock'}" in result.stderr
    assert os.stat(daemon.socket).st_ino == inode
    with daemon.open() as dev:
        assert dev.get_state().generation == 1
    assert daemon.alive()


def test_second_luod_on_same_socket_is_refused(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    daemon = luod_factory()
    inode = os.stat(daemon.socket).st_ino
    other = tmp_path / "other-state"
    result = run_luod("--socket", daemon.socket, "--state-dir", str(other))
    assert result.returncode == 1
    assert f"luod: a daemon is already serving {daemon.socket}" in result.stderr
    assert os.stat(daemon.socket).st_ino == inode
    with daemon.open() as dev:
        dev.get_state()
    assert not (other / "handover.dtb").exists()


def test_stale_socket_of_a_killed_daemon_is_replaced(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory()
    daemon.proc.kill()
    daemon.proc.wait(10)
    assert Path(daemon.socket).exists()
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with probe, pytest.raises(ConnectionRefusedError):
        probe.connect(daemon.socket)
    cold_restart(daemon)
    assert events(daemon, "stale-socket-removed", path=daemon.socket)
    with daemon.open() as dev:
        assert dev.get_state().lost_sessions == 0


def test_regular_file_at_socket_path_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "device"
    path.write_text("not a socket\n")
    result = run_luod("--socket", str(path))
    assert result.returncode == 1
    assert f"{path} exists and is not a socket; not touching it" in result.stderr
    assert path.read_text() == "not a socket\n"


@pytest.fixture
def luod_factory(luod_factory: Callable[..., Luod]) -> Callable[..., Luod]:
    """These tests pin what a luod without copies reports (``--keeper off``);
    tests/crash/test_luod_crash_survival.py pins the recovery with them."""

    def make(*args: str, **kwargs: Any) -> Luod:
        return luod_factory("--keeper", "off", *args, **kwargs)

    return make
