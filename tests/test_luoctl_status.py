"""``luoctl status``, ``luoctl state --watch``, the busy device and the progress display
(issue 11, item 4).

Every command runs as a real ``luoctl`` process against a real ``luod``;
the terminal cases run ``luoctl`` on a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import liveupdate
from liveupdate.cli.schemas import STATUS, WATCH, validate
from luodtest import LUOCTL, Luod, luoctl, luoctl_reboot, memfd, wait_for

pytestmark = pytest.mark.luod_only


def status_json(daemon: Luod) -> dict[str, Any]:
    result = luoctl(daemon.socket, "--json", "status")
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    assert validate(doc, STATUS) == []
    return doc


def on_terminal(*args: str, timeout: float = 60.0) -> tuple[int, str]:
    """Run ``args`` with stdin, stdout and stderr on a new pseudo-terminal.

    Returns the exit status and everything written to the terminal, escape
    sequences included.
    """
    main, sub = pty.openpty()
    proc = subprocess.Popen(
        args,
        stdin=sub,
        stdout=sub,
        stderr=sub,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"},
        close_fds=True,
    )
    os.close(sub)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: every end of the terminal is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(main)
    return proc.wait(timeout), out.decode(errors="replace")


# -- luoctl status ------------------------------------------------------------------------


@pytest.fixture(name="populated")
def populated_fixture(luod: Luod) -> Iterator[Luod]:
    """luod holding ``vm`` (two memfds and a pipe) and ``web`` (a listening socket)."""
    with luod.open() as dev:
        vm = dev.create_session("vm")
        web = dev.create_session("web")
    r, w = os.pipe()
    listener = socket.create_server(("127.0.0.1", 0))
    fds = [memfd(b"ram"), memfd(b"disk")]
    try:
        vm.preserve(fds[0], 1)
        vm.preserve(fds[1], 2)
        vm.preserve(r, 3)
        web.preserve(listener, 1)
    finally:
        for fd in (*fds, r, w):
            os.close(fd)
        listener.close()
    yield luod
    vm.close()
    web.close()


def test_status_counts_sessions_and_files_by_handler(populated: Luod) -> None:
    doc = status_json(populated)
    assert doc["state"] == "normal"
    assert doc["generation"] == 1
    assert doc["sessions"]["outgoing"] == 2
    assert doc["sessions"]["incoming"] == 0
    assert doc["files"]["preserved"] == 4
    assert doc["files"]["by_handler"] == {"memfd-v1": 2, "pipe-v1": 1, "socket-v1": 1}
    assert doc["device"] == populated.socket
    assert doc["control_socket"] == str(Path(populated.socket).parent / "control")
    assert doc["limits"] == {"max_sessions": 4096, "max_files": 1024}
    assert doc["health"] == "ok"
    assert doc["problems"] == []


def test_status_names_the_daemon_its_uptime_and_fd_budget(populated: Luod) -> None:
    before = time.time()
    doc = status_json(populated)
    assert doc["pid"] == populated.pid
    assert doc["started"] is not None and doc["cold_started"] is not None
    assert doc["cold_started"] <= doc["started"] <= before
    assert doc["uptime"] is not None and doc["uptime"] >= 0
    fds = doc["fds"]
    assert fds["limit"] > 0
    assert 0 < fds["open"] <= fds["limit"]
    assert fds["per_file"] in (1, 2)
    assert fds["room"] == (fds["limit"] - fds["reserve"] - fds["open"]) // fds["per_file"]
    assert doc["copies"]["mode"] in ("keeper", "fdstore")
    assert doc["copies"]["ok"] is True
    assert doc["journal"] == {"ok": True, "error": ""}
    assert doc["last_reboot"] == {"ended": None, "blackout": None, "error": ""}


def test_status_screen_is_plain_text_when_not_on_a_terminal(populated: Luod) -> None:
    result = luoctl(populated.socket, "status")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "\x1b[" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0].startswith("● luod") and lines[0].endswith(": ok")
    text = "\n".join(" ".join(line.split()) for line in lines)
    assert f"pid {populated.pid}" in text
    assert "sessions 2 outgoing, 0 incoming" in text
    assert "files 4 preserved: 2 memfd-v1, 1 pipe-v1, 1 socket-v1" in text
    assert "last reboot none since the cold start" in text
    assert "journal ok" in text


def test_status_screen_is_coloured_on_a_terminal(populated: Luod) -> None:
    rc, out = on_terminal(*LUOCTL, "--socket", populated.socket, "status")
    assert rc == 0, out
    assert "\x1b[32m●" in out  # the green dot of a healthy luod
    assert "memfd-v1" in out


def test_status_reports_the_last_live_update(populated: Luod) -> None:
    first = status_json(populated)
    luoctl_reboot(populated)
    doc = status_json(populated)
    assert doc["generation"] == 2
    assert doc["state"] == "updated"
    assert doc["sessions"]["incoming"] == 2
    assert doc["pid"] == populated.pid
    assert doc["cold_started"] == pytest.approx(first["cold_started"])
    assert doc["started"] > first["started"]
    reboot = doc["last_reboot"]
    assert reboot["error"] == ""
    assert reboot["ended"] is not None and reboot["ended"] >= first["started"]
    assert reboot["blackout"] is not None and reboot["blackout"] > 0
    plain = luoctl(populated.socket, "status").stdout
    assert "blackout" in plain and ", ok" in plain


def _memfds_held(pids: list[int]) -> int:
    """How many of the tests' memfds (``luodtest``) the processes ``pids`` hold."""
    held = 0
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                held += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:luodtest")
            except OSError:
                pass
    return held


def test_status_reports_what_a_crash_gave_back(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory()
    with daemon.open() as dev:
        session = dev.create_session("kept")
    fds = [memfd(b"one"), memfd(b"two")]
    for token, fd in enumerate(fds, 1):
        session.preserve(fd, token)
        os.close(fd)
    # Crash copies are sent after the reply (docs/concepts/crash-safety.md):
    # kill once the keeper holds both files, not in that window.
    wait_for(lambda: _memfds_held(daemon.keeper_pids()) == 2, "the keeper's copies", 30)
    daemon.stop(signal.SIGKILL)
    session.close()
    daemon.log = daemon.state_dir / "restart.log"  # wait for this start's "serving"
    daemon.start()
    doc = status_json(daemon)
    assert doc["sessions"]["recovered"] == 1
    assert doc["files"]["recovered"] == 2
    assert doc["sessions"]["lost"] == 0
    assert "1 session, 2 files given back after a crash" in " ".join(
        luoctl(daemon.socket, "status").stdout.split()
    )


def test_status_exits_3_when_luod_is_not_running(tmp_path: Path) -> None:
    result = luoctl(str(tmp_path / "device"), "status")
    assert result.returncode == 3
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("luoctl: ") and "(ENOENT)" in line
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "stale"))
    stale.close()  # a socket file nobody listens on: a luod that was killed
    result = luoctl(str(tmp_path / "stale"), "--json", "status")
    assert result.returncode == 3
    assert "(ECONNREFUSED)" in result.stderr


def _service_entry(daemon: Luod, name: str) -> dict[str, Any] | None:
    return next((s for s in status_json(daemon)["services"] if s["session"] == name), None)


def test_status_lists_services_under_luoctl_run(luod: Luod, tmp_path: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(
            [*LUOCTL, "--socket", luod.socket, "run", "--session", "svc", "--", *sleeper],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        wait_for(lambda: bool(children.read_text().split()), "the service", 30)
        first = int(children.read_text().split()[0])
        wait_for(lambda: _service_entry(luod, "svc") is not None, "the service's report", 30)
        entry = _service_entry(luod, "svc")
        assert entry == {
            "session": "svc",
            "supervisor": supervisor.pid,
            "pid": first,
            "restarts": 0,
            "last_exit": 0,
        }
        os.kill(first, signal.SIGKILL)  # a crash: the supervisor restarts it
        wait_for(
            lambda: (_service_entry(luod, "svc") or {}).get("restarts") == 1,
            f"the restart's report\n{log.read_text()}",
            30,
        )
        entry = _service_entry(luod, "svc")
        assert entry is not None
        assert entry["last_exit"] == -signal.SIGKILL
        assert entry["pid"] not in (first, 0)
        text = " ".join(luoctl(luod.socket, "status").stdout.split())
        assert f"svc {supervisor.pid} {entry['pid']} 1 SIGKILL" in text
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()


# -- luoctl state --watch -----------------------------------------------------------------


class Watch:
    """``luoctl --json state --watch`` as a real process, its lines read as they come."""

    def __init__(self, daemon: Luod, *options: str) -> None:
        self.proc = subprocess.Popen(
            [*LUOCTL, "--socket", daemon.socket, *options, "state", "--watch",
             "--interval", "0.02"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []

    def next_line(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"no line from luoctl state --watch in {timeout} s"
        line = self.proc.stdout.readline()
        assert line, f"luoctl state --watch ended: {self.proc.wait()} {self.proc.stderr}"
        self.lines.append(line)
        return line

    def until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            doc: dict[str, Any] = json.loads(self.next_line())
            assert validate(doc, WATCH) == []
            if predicate(doc):
                return doc

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        _out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err


def test_state_watch_prints_each_change_and_ends_with_0_on_sigint(luod: Luod) -> None:
    watch = Watch(luod, "--json")
    try:
        first = watch.until(lambda d: True)
        assert (first["state"], first["generation"]) == ("normal", 1)
        assert luoctl(luod.socket, "prepare").returncode == 0
        watch.until(lambda d: d["state"] == "prepared")
        assert luoctl(luod.socket, "cancel").returncode == 0
        watch.until(lambda d: d["state"] == "normal")
        with luod.open() as dev, dev.create_session("seen"):
            watch.until(lambda d: d["outgoing_sessions"] == 1)
        watch.until(lambda d: d["outgoing_sessions"] == 0)
        luoctl_reboot(luod, "--no-exec")
        after = watch.until(lambda d: d["generation"] == 2)
        assert after["time"] >= first["time"]
    finally:
        rc, err = watch.interrupt()
    assert rc == 0, err
    assert "Aborted" not in err and "Traceback" not in err


def test_state_watch_waits_for_a_luod_that_went_away(luod: Luod) -> None:
    watch = Watch(luod)
    try:
        with luod.open() as dev, dev.create_session("gone"):
            line = watch.next_line()
            while "1 outgoing" not in line:
                line = watch.next_line()
            luod.stop()  # a clean stop: the session goes with it
        assert watch.proc.stderr is not None
        notice = watch.proc.stderr.readline()
        assert notice.startswith("luoctl: ") and notice.endswith(
            "; waiting for luod to serve again\n"
        )
        luod.log = luod.state_dir / "restart.log"  # wait for this start's "serving"
        luod.start()
        line = watch.next_line()
        assert "generation 1 normal: 0 outgoing" in line
        assert "(changed: " in line and "outgoing sessions" in line
    finally:
        rc, err = watch.interrupt()
    assert rc == 0, err


def test_state_watch_without_a_control_socket_never_keeps_the_device(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    control = tmp_path / "elsewhere" / "control"
    control.parent.mkdir(mode=0o700)
    daemon = luod_factory("--control-socket", str(control))
    watch = Watch(daemon, "--json")
    try:
        watch.until(lambda d: True)  # it watches through the device
        for _ in range(20):  # ...closing it between looks: others get it
            with daemon.open(timeout=5) as dev:
                dev.get_state()
    finally:
        rc, err = watch.interrupt()
    assert rc == 0, err


# -- the busy device ---------------------------------------------------------------------

_HOLDER = """
import sys, liveupdate
dev = liveupdate.open_device(sys.argv[1], timeout=10)
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture(name="held")
def held_fixture(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> Iterator[tuple[Luod, subprocess.Popen[str]]]:
    """A luod whose control socket is elsewhere (luoctl uses the device) and a
    process holding its device until its stdin closes."""
    control = tmp_path / "ops" / "control"
    control.parent.mkdir(mode=0o700)
    daemon = luod_factory("--control-socket", str(control))
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, daemon.socket],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    yield daemon, holder
    assert holder.stdin is not None
    if not holder.stdin.closed:
        holder.stdin.close()
    holder.wait(10)


def test_busy_device_error_names_the_holder(held: tuple[Luod, subprocess.Popen[str]]) -> None:
    daemon, holder = held
    result = luoctl(daemon.socket, "--timeout", "0", "sessions")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(
        f"luoctl: open {daemon.socket}: held by pid {holder.pid} ({sys.executable} -c "
    )
    assert "(EBUSY); " in line


def test_busy_device_says_luoctl_waits_then_goes_on(
    held: tuple[Luod, subprocess.Popen[str]],
) -> None:
    daemon, holder = held
    proc = subprocess.Popen(
        [*LUOCTL, "--socket", daemon.socket, "--timeout", "60", "--json", "state"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    notice = proc.stderr.readline()
    assert notice.startswith(f"luoctl: {daemon.socket} is held by pid {holder.pid} (")
    assert "waiting for it (up to 60 s, --timeout)" in notice
    assert proc.poll() is None  # still waiting
    assert holder.stdin is not None
    holder.stdin.close()  # the agent lets go
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out)["state"] == "normal"


def test_busy_device_wait_that_runs_out_names_the_holder_again(
    held: tuple[Luod, subprocess.Popen[str]],
) -> None:
    daemon, holder = held
    result = luoctl(daemon.socket, "--timeout", "0.5", "sessions")
    assert result.returncode == 1
    notice, error = result.stderr.splitlines()
    assert "waiting for it" in notice
    assert f"held by pid {holder.pid} (" in error and "after waiting 0.5 s" in error
    assert error.endswith("retry once it has closed it, or wait longer with --timeout")


# -- the progress display ----------------------------------------------------------------


def test_reboot_shows_its_steps_on_a_terminal(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("steps")
    fd = memfd(b"x")
    session.preserve(fd, 1)
    os.close(fd)
    rc, out = on_terminal(*LUOCTL, "--socket", luod.socket, "reboot", "--no-exec")
    assert rc == 0, out
    assert "freeze of generation 1: 1 session, 1 file" in out
    assert "generation 2 starting: restoring 1 session, 1 file" in out
    assert "rebooted: generation 1 -> 2" in out
    session.close()


def test_prepare_shows_the_pre_flight_on_a_terminal(luod: Luod) -> None:
    rc, out = on_terminal(*LUOCTL, "--socket", luod.socket, "prepare")
    assert rc == 0, out
    assert "pre-flight: the installed luod reads a dry-run image of generation 1" in out
    assert "prepared: the installed luod can read this generation" in out


def test_no_progress_display_when_not_on_a_terminal(luod: Luod) -> None:
    result = luoctl(luod.socket, "reboot", "--no-exec")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("rebooted: generation 1 -> 2")
    assert len(result.stdout.splitlines()) == 1


def test_busy_device_wait_is_a_spinner_on_a_terminal(
    held: tuple[Luod, subprocess.Popen[str]],
) -> None:
    daemon, holder = held
    rc, out = on_terminal(*LUOCTL, "--socket", daemon.socket, "--timeout", "1", "state")
    assert rc == 1
    assert f"is held by pid {holder.pid} (" in out  # the spinner's step
    assert "(EBUSY)" in out
    # the client library's own error, not a traceback
    assert "Traceback" not in out
    assert liveupdate.DeviceBusyError.__name__ not in out
