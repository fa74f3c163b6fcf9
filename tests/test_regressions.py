"""Regression tests for bugs a review found in luod, each against a real luod.

Every test reproduces one reviewer scenario (the reproduction scripts ran
against a running daemon) and asserts the fixed behaviour:

* H1: a client's own device or session fd preserved into a session;
* H2: LUOD_SESSION_UPDATE, then the session fd closed before the reply;
* H3: RETRIEVE_SESSION while the caller's fd table is full;
* H4: SIGHUP retry after a failed in-process restore hands on the files;
* H5: a waiting handed-over session and an outgoing one of the same name;
* H6: the state file's path unusable;
* H7: PRESERVE_FD of a file its own session already holds;
* M1: the journal with an outgoing and an incoming session of one name;
* M2: accept() failing for lack of fds must not spin;
* M3: a handed-over session waiting across two reboots;
* L1: ``luoctl run`` when another process holds the outgoing session.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi, wire
from liveupdate.handover_abi import HandoverError
from liveupdate.handover_codec import decode_image
from luodtest import Luod, luoctl

_REBOOTED = re.compile(r"generation (\d+) -> (\d+)")


# -- helpers ---------------------------------------------------------------------------


def memfd(data: bytes) -> int:
    fd = os.memfd_create("regression")
    os.write(fd, data)
    return fd


def read_all(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.02)


def state(daemon: Luod) -> liveupdate.StateInfo:
    with daemon.open() as dev:
        return dev.get_state()


def sessions(daemon: Luod) -> list[tuple[str, str]]:
    with daemon.open() as dev:
        listing = dev.list_sessions()
    return sorted((s.name, s.direction.name.lower()) for s in listing.sessions)


def reboot(daemon: Luod, *args: str) -> None:
    """``luoctl reboot``: must succeed once the next generation serves."""
    result = luoctl(daemon.socket, "reboot", "--wait", "20", *args)
    assert result.returncode == 0, (
        f"luoctl reboot rc={result.returncode}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}\nluod log:\n{daemon.log_text()[-4000:]}"
    )
    match = _REBOOTED.search(result.stdout)
    assert match, result.stdout
    assert int(match.group(2)) == int(match.group(1)) + 1, result.stdout


def raw_send(
    session: liveupdate.Session, cmd: int, arg: bytes, fds: list[int] | None = None
) -> None:
    """Send one request on ``session``'s fd without reading the reply."""
    sock = socket.socket(fileno=os.dup(session.fileno()))
    try:
        wire.send_message(sock, wire.encode_request(cmd, arg), fds or [])
    finally:
        sock.close()


def fds_settle(daemon: Luod, baseline: int, timeout: float = 5.0) -> None:
    """The daemon's fd count comes back to ``baseline`` (closes are asynchronous)."""
    deadline = time.monotonic() + timeout
    while daemon.fd_count() != baseline:
        if time.monotonic() > deadline:
            fds = {
                f: os.readlink(f"/proc/{daemon.pid}/fd/{f}")
                for f in os.listdir(f"/proc/{daemon.pid}/fd")
            }
            raise AssertionError(f"luod holds {daemon.fd_count()} fds, baseline {baseline}: {fds}")
        time.sleep(0.02)


# -- H1: a client's own luod fds preserved into a session --------------------------------


@pytest.mark.luod_only
def test_h1_preserving_own_device_or_session_fd_is_refused(luod: Luod) -> None:
    dev = luod.open()
    session = dev.create_session("h1")
    baseline = luod.fd_count()
    # ENOENT ("no handler can preserve this kind of file"): luod would hold
    # its own client's end and never see it close.
    with pytest.raises(liveupdate.NotFoundError) as exc:
        session.preserve(dev.fileno(), 1)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(liveupdate.NotFoundError) as exc:
        session.preserve(session.fileno(), 2)
    assert exc.value.errno == errno.ENOENT
    # Nothing of the client was kept (a refused fd is closed, maybe just
    # after the reply).
    wait_for(lambda: luod.fd_count() <= baseline, what="luod to drop the refused fds")
    dev.close()
    session.close()

    # The device opens again (no EBUSY) and the session was released: its
    # name is free.
    wait_for(
        lambda: "session-released session=h1 " in luod.log_text(),
        what="the session to be released",
    )
    for _ in range(2):
        with luod.open(timeout=2.0) as again:
            again.create_session("h1").close()
    wait_for(lambda: sessions(luod) == [], what="the sessions to be released")


# -- H2: UPDATE, then the session fd closed before reading the reply ---------------------


@pytest.mark.luod_only
def test_h2_update_then_immediate_close_keeps_the_session_handed_over(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("h2")
    fd = memfd(b"precious")
    session.preserve(fd, 1)
    os.close(fd)
    update = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update))
    raw_send(session, uapi.LUOD_SESSION_UPDATE, bytes(update))
    session.close()  # at once: the reply is never read

    def retrieved() -> liveupdate.Session | None:
        with luod.open() as dev:
            try:
                return dev.retrieve_session("h2")
            except liveupdate.NotFoundError:
                return None

    # The update may still be on its way; once handed over, it must stay so.
    deadline = time.monotonic() + 5
    got = retrieved()
    while got is None and time.monotonic() < deadline:
        time.sleep(0.05)
        got = retrieved()
    assert got is not None, f"session lost by closing its fd after UPDATE:\n{luod.log_text()}"
    with got:
        data_fd = got.retrieve(1)
        try:
            assert read_all(data_fd) == b"precious"
        finally:
            os.close(data_fd)
        got.finish()


# -- H3: RETRIEVE_SESSION with the caller's fd table full --------------------------------

_H3_CHILD = textwrap.dedent(
    """
    import errno, os, resource, sys
    import liveupdate

    dev = liveupdate.open_device(sys.argv[1], timeout=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        dev.retrieve_session("h3")
    except liveupdate.OutOfResourcesError as exc:
        print("first", exc.errno == errno.EMFILE, flush=True)
    except OSError as exc:
        print("first other", exc, flush=True)
    else:
        print("first succeeded", flush=True)
    for fd in filler:
        os.close(fd)
    session = dev.retrieve_session("h3")
    fd = session.retrieve(1)
    print("second", os.pread(fd, 100, 0).decode(), flush=True)
    """
)


@pytest.mark.luod_only
def test_h3_retrieve_session_with_a_full_fd_table_fails_cleanly(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("h3")
    fd = memfd(b"precious")
    session.preserve(fd, 1)
    os.close(fd)
    reboot(luod)
    session.close()

    child = subprocess.run(
        [sys.executable, "-c", _H3_CHILD, luod.socket],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert child.returncode == 0, f"{child.stdout}\n{child.stderr}\n{luod.log_text()[-3000:]}"
    lines = child.stdout.splitlines()
    # EMFILE, and the request was never sent: no fd lost on the way, no
    # implicit FINISH of the session.
    assert lines == ["first True", "second precious"], child.stdout


# -- H4: SIGHUP retry after a failed in-process restore ----------------------------------

#: Loaded by every Python of the daemon's environment: the first luod (only)
#: fails to restore memfds, as a buggy handler would. The variable is removed
#: at once, so the luod that SIGHUP re-executes restores normally.
_H4_SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    if os.environ.pop("REGRESSION_FAIL_MEMFD_RESTORE", None):
        import errno

        from liveupdate.core.handlers import memfd

        def _restore(self, file):
            raise OSError(errno.EINVAL, "injected in-process restore failure")

        memfd.MemfdHandler.restore = _restore
    """
)


@pytest.mark.luod_only
def test_h4_sighup_retry_after_failed_in_process_restore_keeps_the_files(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_H4_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    daemon = luod_factory(env={"PYTHONPATH": path, "REGRESSION_FAIL_MEMFD_RESTORE": "1"})

    with daemon.open() as dev:
        session = dev.create_session("held")
    fd = memfd(b"precious")
    session.preserve(fd, 1)
    os.close(fd)
    with daemon.open() as dev:
        dev.set_event(uapi.LuodEvent.REBOOT, uapi.LUOD_REBOOT_NO_EXEC)
    session.close()
    wait_for(lambda: "restore-failed" in daemon.log_text(), what="the injected restore failure")
    with pytest.raises(liveupdate.LiveUpdateError) as exc:
        daemon.open(timeout=1.0).close()
    assert exc.value.errno == errno.EIO

    pid = daemon.pid
    os.kill(pid, signal.SIGHUP)  # retry: re-execute luod on the same image and fds
    deadline = time.monotonic() + 20
    while True:
        try:
            dev = daemon.open(timeout=1.0)
            break
        except liveupdate.LiveUpdateError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no working luod after SIGHUP:\n{daemon.log_text()}"
                ) from None
            time.sleep(0.1)
    assert daemon.pid == pid and daemon.alive()
    with dev:
        held = dev.retrieve_session("held")
    with held:
        data_fd = held.retrieve(1)
        try:
            assert read_all(data_fd) == b"precious"
        finally:
            os.close(data_fd)
        held.finish()
    assert "inherited fd" not in daemon.log_text()


# -- H5: a waiting handed-over session and an outgoing one of the same name --------------


@pytest.mark.luod_only
def test_h5_reboot_refuses_a_name_both_waiting_and_outgoing(luod: Luod) -> None:
    with luod.open() as dev:
        waiting = dev.create_session("h5")
    fd = memfd(b"old-state")
    waiting.preserve(fd, 1)
    os.close(fd)
    waiting.update()
    with luod.open() as dev:
        outgoing = dev.create_session("h5")
    fd = memfd(b"new-state")
    outgoing.preserve(fd, 1)
    os.close(fd)
    before = state(luod)

    for args in ((), ("--no-exec",)):
        result = luoctl(luod.socket, "reboot", "--wait", "10", *args)
        assert result.returncode != 0, (args, result.stdout, luod.log_text()[-3000:])
        message = result.stdout + result.stderr
        assert "h5" in message, message
        assert "(EEXIST)" in message, message
        after = state(luod)
        assert after.state == before.state, after
        assert after.state != uapi.LuodState.FROZEN
        assert after.generation == before.generation
        assert "h5" in after.last_error, after.last_error
        assert not (luod.state_dir / "reboot-in-progress").exists()
        with luod.open() as dev:
            dev.create_session(f"other{len(args)}").close()

    # Once the waiting session is taken by its successor, the reboot goes on.
    with luod.open() as dev:
        successor = dev.retrieve_session("h5")
    data_fd = successor.retrieve(1)
    try:
        assert read_all(data_fd) == b"old-state"
    finally:
        os.close(data_fd)
    successor.finish()
    successor.close()
    reboot(luod)
    with luod.open() as dev:
        incoming = dev.retrieve_session("h5")
    with incoming:
        data_fd = incoming.retrieve(1)
        try:
            assert read_all(data_fd) == b"new-state"
        finally:
            os.close(data_fd)
        incoming.finish()


# -- H6: the state file's path unusable --------------------------------------------------


@pytest.mark.luod_only
@pytest.mark.parametrize("no_exec", [False, True], ids=["exec", "no-exec"])
def test_h6_unwritable_state_file_never_blocks_a_reboot(
    luod_factory: Callable[..., Luod], tmp_path: Path, no_exec: bool
) -> None:
    blocker = tmp_path / "state-is-a-directory"
    blocker.mkdir()
    daemon = luod_factory("--state-file", str(blocker))
    with daemon.open() as dev:
        session = dev.create_session("h6")
    fd = memfd(b"kept")
    session.preserve(fd, 1)
    os.close(fd)

    reboot(daemon, *(["--no-exec"] if no_exec else []))
    session.close()
    info = state(daemon)
    assert info.generation == 2
    assert info.state != uapi.LuodState.FROZEN
    assert "state-file-failed" in daemon.log_text()
    assert blocker.is_dir()
    with daemon.open() as dev:
        incoming = dev.retrieve_session("h6")
        dev.create_session("h6").close()
    with incoming:
        data_fd = incoming.retrieve(1)
        try:
            assert read_all(data_fd) == b"kept"
        finally:
            os.close(data_fd)
        incoming.finish()
    assert state(daemon).state == uapi.LuodState.NORMAL
    assert daemon.alive()


# -- H7: PRESERVE_FD of a file its own session already holds -----------------------------


@pytest.mark.luod_only
def test_h7_re_preserving_a_held_file_then_closing_leaks_nothing(luod: Luod) -> None:
    baseline = luod.fd_count()
    with luod.open() as dev:
        session = dev.create_session("h7")
    fd = memfd(b"x")
    try:
        session.preserve(fd, 1)
        with pytest.raises(liveupdate.DeviceBusyError):
            session.preserve(fd, 2)  # the session holds it already: EBUSY
        assert session.get_name() == b"h7"  # and the session lives on
        # The same file again under another token, the session closed before
        # the reply is read.
        arg = uapi.liveupdate_session_preserve_fd(
            size=ctypes.sizeof(uapi.liveupdate_session_preserve_fd), fd=fd, token=2
        )
        raw_send(session, uapi.LIVEUPDATE_SESSION_PRESERVE_FD, bytes(arg), [fd])
        session.close()
        wait_for(lambda: sessions(luod) == [], what="the session to be released")
        fds_settle(luod, baseline)
        assert state(luod).preserved_files == 0

        # The file is free again: another session may preserve it.
        with luod.open() as dev:
            other = dev.create_session("h7b")
        with other:
            other.preserve(fd, 7)
            assert state(luod).preserved_files == 1
    finally:
        os.close(fd)
    wait_for(lambda: sessions(luod) == [], what="the second session to be released")
    fds_settle(luod, baseline)


# -- M1: the journal with an outgoing and an incoming session of one name ----------------


def restart_cold(daemon: Luod) -> None:
    """SIGKILL ``daemon`` and start it again on the same state directory."""
    daemon.stop(signal.SIGKILL)
    daemon.log.rename(daemon.log.with_name("luod-killed.log"))
    daemon.start()


@pytest.mark.luod_only
def test_m1_journal_holds_an_outgoing_and_an_incoming_session_of_one_name(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--journal-interval", "0.05")
    with daemon.open() as dev:
        first = dev.create_session("a")
    fd = memfd(b"x")
    first.preserve(fd, 1)
    os.close(fd)
    reboot(daemon)
    first.close()
    with daemon.open() as dev:
        incoming = dev.retrieve_session("a")
        outgoing = dev.create_session("a")
    fd = memfd(b"y")
    outgoing.preserve(fd, 5)
    os.close(fd)

    out_path = daemon.state_dir / "journal.dtb"
    in_path = daemon.state_dir / "journal-incoming.dtb"

    def described(path: Path) -> list[tuple[bytes, list[int]]] | None:
        try:
            image = decode_image(path.read_bytes())
        except (OSError, HandoverError):
            return None
        return [(s.name, [f.token for f in s.files]) for s in image.sessions]

    def journalled() -> bool:
        return described(out_path) == [(b"a", [5])] and described(in_path) == [(b"a", [1])]

    wait_for(journalled, timeout=5, what="both journals to describe session 'a'")
    time.sleep(0.3)  # a few more journal ticks
    assert "journal-failed" not in daemon.log_text()

    restart_cold(daemon)
    log = daemon.log_text()
    lost = re.findall(r"session-lost session=a files=1 tokens=(0x[0-9a-f]+)", log)
    assert sorted(lost) == ["0x1", "0x5"], log
    assert state(daemon).lost_sessions == 2
    incoming.close()
    outgoing.close()


# -- M2: accept() failing for lack of fds ------------------------------------------------


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.luod_only
def test_m2_accept_without_fds_does_not_spin(luod: Luod) -> None:
    subprocess.run(["prlimit", "--pid", str(luod.pid), "--nofile=40:40"], check=True)
    with luod.open() as dev:
        session = dev.create_session("m2")
    preserved = 0
    with pytest.raises(liveupdate.LiveUpdateError):
        for token in range(100):
            fd = memfd(b"")
            try:
                session.preserve(fd, token)
            finally:
                os.close(fd)
            preserved += 1
    assert 10 < preserved < 40

    # More connection attempts than luod has fds: they wait in the backlog.
    waiting = []
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(luod.socket)
        waiting.append(sock)
    time.sleep(0.2)
    before = cpu_ticks(luod.pid)
    time.sleep(2.0)
    used = cpu_ticks(luod.pid) - before
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    assert used < ticks_per_second // 2, f"luod used {used} ticks in 2 s while out of fds"
    assert luod.log_text().count("accept-failed") <= 3
    for sock in waiting:
        sock.close()

    session.unpreserve(0)  # one fd free again
    with luod.open(timeout=5.0) as dev:
        assert dev.get_state().preserved_files == preserved - 1
    session.close()
    wait_for(lambda: sessions(luod) == [], what="the session to be released")
    assert luod.alive()


# -- M3: a handed-over session waiting across two reboots --------------------------------


@pytest.mark.luod_only
def test_m3_handed_over_session_survives_two_reboots(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("m3")
    fd = memfd(b"x")
    session.preserve(fd, 1)
    os.close(fd)
    session.update()
    session.close()

    reboot(luod)
    assert sessions(luod) == [("m3", "incoming")]
    reboot(luod)
    assert sessions(luod) == [("m3", "incoming")]
    with luod.open() as dev:
        successor = dev.retrieve_session("m3")
    with successor:
        data_fd = successor.retrieve(1)
        try:
            assert read_all(data_fd) == b"x"
        finally:
            os.close(data_fd)
        successor.finish()
    wait_for(lambda: sessions(luod) == [], what="the session to be released")


# -- L1: `luoctl run` when another process holds the outgoing session --------------------


@pytest.mark.luod_only
def test_l1_luoctl_run_refuses_a_held_session_without_finishing_the_incoming_one(
    luod: Luod,
) -> None:
    with luod.open() as dev:
        previous = dev.create_session("svc")
    fd = memfd(b"service-state")
    previous.preserve(fd, 1)
    os.close(fd)
    reboot(luod)
    previous.close()
    with luod.open() as dev:
        intruder = dev.create_session("svc")  # another process's outgoing "svc"

    result = luoctl(luod.socket, "run", "--session", "svc", "--", "true", timeout=30)
    assert result.returncode != 0, result
    message = result.stdout + result.stderr
    assert "session 'svc' is held by another process" in message, message

    # Nothing was retrieved, so nothing was finished: the state is still there.
    intruder.close()
    with luod.open() as dev:
        incoming = dev.retrieve_session("svc")
    with incoming:
        data_fd = incoming.retrieve(1)
        try:
            assert read_all(data_fd) == b"service-state"
        finally:
            os.close(data_fd)
        incoming.finish()
