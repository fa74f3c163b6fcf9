"""Pre-started updates: the next version is ready before the old one freezes.

A real service under ``luoctl run`` opts in with ``svc.freeze_fd()``. On
``luoctl update`` the supervisor starts the next version first (it waits in
``svc.restore()``), freezes the old one only once the new one reported
ready, and hands the session over. A next version that fails, or never gets
ready, leaves the old one serving, and ``luoctl update`` says why. A request
in flight at the freeze is answered by the old version; what comes after,
by the new one, on the same connection. A service that never opted in is
updated the old way (stopped, then started).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from liveupdate.client import service as service_api
from luodtest import LUOCTL, Luod, luoctl, wait_for

pytestmark = pytest.mark.luod_only

#: The service under test. Its MODE file, read at each start, says how this
#: instance behaves: ok, fail (exits 3 before ready), hang (never ready),
#: gate (initialises only once the GATE file exists), nowatch (never opts in).
#: A line ``hold`` is answered only once the RELEASE file exists; any other
#: line is answered at once. Answers say which pid gave them.
SERVICE = r"""
import os, selectors, signal, socket, sys, time
import liveupdate

env = os.environ
def log(what):
    with open(env["PRE_LOG"], "a") as f:
        f.write(f"{os.getpid()} {what}\n")

mode = open(env["PRE_MODE"]).read().strip()
svc = liveupdate.inherited_session()
log("start " + ("prestarted" if svc.prestarted else svc.state))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
if mode == "fail":
    sys.exit(3)
if mode == "hang":
    time.sleep(3600)
while mode == "gate" and not os.path.exists(env["PRE_GATE"]):
    time.sleep(0.01)
sel = selectors.DefaultSelector()
if mode != "nowatch":
    sel.register(svc.freeze_fd(), selectors.EVENT_READ, "freeze")
log("initialised")
fds = svc.restore()
log("restored " + svc.state)
# Token 99: a memfd the first version preserved on the session directly, so
# the supervisor holds no copy of it: what restore() takes over is luod's word.
memfd = fds.pop(99, None)
if memfd is None:
    memfd = os.memfd_create("direct")
    os.write(memfd, str(os.getpid()).encode())
    svc.outgoing.preserve(memfd, 99)
log("memfd of " + os.pread(memfd, 16, 0).decode())
if 1 in fds:
    listener = socket.socket(fileno=fds.pop(1))
else:
    listener = socket.create_server(("127.0.0.1", 0))
    svc.preserve(listener, 1)
conns = {t: socket.socket(fileno=fd) for t, fd in fds.items()}
with open(env["PRE_PORT"] + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.replace(env["PRE_PORT"] + ".tmp", env["PRE_PORT"])
listener.setblocking(False)
sel.register(listener, selectors.EVENT_READ, "listen")
for t, c in conns.items():
    sel.register(c, selectors.EVENT_READ, t)
held = []          # (conn, line): requests in flight
freezing = False
while not (freezing and not held):
    for key, _ in sel.select(0.02):
        if key.data == "freeze":
            if svc.freeze_requested():
                log("freeze requested")
                freezing = True  # stop reading: answer what is in flight, then hand over
                for k in list(sel.get_map().values()):
                    if k.data != "freeze":
                        sel.unregister(k.fileobj)
        elif key.data == "listen":
            try:
                c, _ = listener.accept()
            except BlockingIOError:
                continue
            t = max([1, *conns]) + 1
            svc.preserve(c, t)
            conns[t] = c
            sel.register(c, selectors.EVENT_READ, t)
        else:
            c = conns[key.data]
            data = c.recv(4096, socket.MSG_PEEK)
            if not data:
                sel.unregister(c); svc.unpreserve(key.data); c.close(); del conns[key.data]
                continue
            done = data[: data.rfind(b"\n") + 1]
            for line in done.decode().splitlines():
                if line == "hold":
                    held.append((c, line)); log("holding")
                elif not held:
                    c.sendall(f"{line} {os.getpid()}\n".encode())
                else:
                    held.append((c, line))
            c.recv(len(done))
    if held and os.path.exists(env["PRE_RELEASE"]):
        for c, line in held:
            c.sendall(f"{line} {os.getpid()}\n".encode())
        held = []
svc.frozen()
log("frozen")
"""


class Prestart:
    """The service above under ``luoctl run --session pre``."""

    def __init__(self, daemon: Luod, tmp: Path, *run_options: str) -> None:
        self.daemon, self.tmp = daemon, tmp
        self.script = tmp / "service.py"
        self.script.write_text(SERVICE)
        self.mode = tmp / "mode"
        self.set_mode("ok")
        self.events = tmp / "events.log"
        self.port_file = tmp / "port"
        self.gate, self.release = tmp / "gate", tmp / "release"
        self.run_log = tmp / "run.log"
        env = {
            **os.environ,
            "PRE_LOG": str(self.events),
            "PRE_MODE": str(self.mode),
            "PRE_PORT": str(self.port_file),
            "PRE_GATE": str(self.gate),
            "PRE_RELEASE": str(self.release),
        }
        with open(self.run_log, "wb") as log:
            self.proc = subprocess.Popen(
                [*LUOCTL, "--socket", daemon.socket, "run", "--session", "pre",
                 "--stop-timeout", "10", *run_options, "--", sys.executable, str(self.script)],
                stdout=log, stderr=log, env=env, start_new_session=True,
            )  # fmt: skip
        wait_for(self.port_file.exists, f"the service did not start:\n{self.log()}", timeout=30)
        self.port = int(self.port_file.read_text())

    def set_mode(self, mode: str) -> None:
        self.mode.write_text(mode)

    def log(self) -> str:
        return self.run_log.read_text()

    def lines(self) -> list[tuple[int, str]]:
        """(pid, event) of every event the instances logged, in order."""
        text = self.events.read_text() if self.events.exists() else ""
        return [(int(pid), what) for pid, what in (ln.split(" ", 1) for ln in text.splitlines())]

    def pid_of(self, event: str) -> list[int]:
        return [pid for pid, what in self.lines() if what == event]

    def update(self, *args: str) -> subprocess.CompletedProcess[str]:
        return luoctl(self.daemon.socket, "update", *args, "pre", timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Client:
    """One connection; ``ask`` sends a line and reads its answer: (line, pid)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(f"{line}\n".encode())

    def answer(self) -> tuple[str, int]:
        raw = self.file.readline()
        assert raw.endswith(b"\n"), f"connection dropped (got {raw!r})"
        line, pid = raw.decode().split()
        return line, int(pid)

    def ask(self, line: str) -> int:
        self.send(line)
        got, pid = self.answer()
        assert got == line
        return pid

    def close(self) -> None:
        self.file.close()
        self.sock.close()


StartService = Callable[..., Prestart]


@pytest.fixture
def prestart(luod: Luod, tmp_path: Path) -> Iterator[StartService]:
    services: list[Prestart] = []

    def start(*run_options: str) -> Prestart:
        services.append(Prestart(luod, tmp_path, *run_options))
        return services[-1]

    yield start
    for svc in services:
        svc.stop()


def test_new_version_is_ready_before_the_old_one_freezes(prestart: StartService) -> None:
    svc = prestart()
    client = Client(svc.port)
    old = client.ask("a")
    svc.set_mode("gate")  # the next version initialises only once the gate opens
    update = subprocess.Popen(
        [*LUOCTL, "--socket", svc.daemon.socket, "update", "pre"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: "start prestarted" in [w for _, w in svc.lines()], "no pre-started version")
    (new,) = [pid for pid, what in svc.lines() if what == "start prestarted"]
    # While the next version initialises, the old one serves on, unfrozen.
    for n in range(5):
        assert client.ask(f"b{n}") == old
    assert svc.pid_of("freeze requested") == []
    svc.gate.touch()
    out, err = update.communicate(timeout=60)
    assert update.returncode == 0, err
    assert f"pid {new} took over from pid {old}" in out
    assert client.ask("c") == new
    events = svc.lines()
    order = [events.index(e) for e in ((new, "initialised"), (old, "freeze requested"),
                                       (old, "frozen"), (new, "restored incoming"))]  # fmt: skip
    assert order == sorted(order), events
    assert "prestarted" in svc.log()
    client.close()


def test_in_flight_requests_are_answered_by_the_old_version_then_the_new_one_serves(
    prestart: StartService,
) -> None:
    svc = prestart()
    client = Client(svc.port)
    old = client.ask("a")
    client.send("hold")  # in flight when the freeze comes
    wait_for(lambda: old in svc.pid_of("holding"), "the request was not taken")
    update = subprocess.Popen(
        [*LUOCTL, "--socket", svc.daemon.socket, "update", "pre"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: old in svc.pid_of("freeze requested"), "the old version was not frozen")
    # Sent after the old one stopped reading: for the next version.
    for n in range(3):
        client.send(f"after{n}")
    svc.release.touch()
    _out, err = update.communicate(timeout=60)
    assert update.returncode == 0, err
    (new,) = svc.pid_of("restored incoming")
    answers = [client.answer() for _ in range(4)]
    assert answers == [("hold", old)] + [(f"after{n}", new) for n in range(3)]
    client.close()


@pytest.mark.parametrize(
    ("mode", "run_options", "why"),
    [
        ("fail", (), "the new version exited with status 3 before it was ready"),
        ("hang", ("--ready-timeout", "1"), "the new version was not ready within 1 s"),
    ],
)
def test_a_new_version_that_is_never_ready_leaves_the_old_one_serving(
    prestart: StartService,
    mode: str,
    run_options: tuple[str, ...],
    why: str,
) -> None:
    svc = prestart(*run_options)
    client = Client(svc.port)
    old = client.ask("a")
    svc.set_mode(mode)
    result = svc.update()
    assert result.returncode != 0
    assert why in result.stderr, result.stderr
    assert f"pid {old} keeps serving" in result.stderr
    # Untouched: never asked to freeze, same connection, same process.
    assert svc.pid_of("freeze requested") == []
    assert client.ask("b") == old
    # The pre-started one is gone, not left behind holding anything.
    (tried,) = [pid for pid, what in svc.lines() if what == "start prestarted"]
    wait_for(lambda: not Path(f"/proc/{tried}").exists(), "the failed version still runs")
    # And a good version still takes over afterwards.
    svc.set_mode("ok")
    result = svc.update()
    assert result.returncode == 0, result.stderr
    assert client.ask("c") != old
    client.close()


def test_a_service_that_never_opted_in_is_stopped_then_started(
    prestart: StartService,
) -> None:
    svc = prestart()
    svc.set_mode("nowatch")
    assert svc.update().returncode == 0  # this one opts in: the next does not
    client = Client(svc.port)
    first = client.ask("a")
    result = svc.update()
    assert result.returncode == 0, result.stderr
    second = client.ask("b")
    assert second != first
    # Stopped first (SIGTERM: exit 0), then started with the session: no pre-start.
    assert "update: service exit 0; handing session 'pre' over" in svc.log()
    assert svc.lines().count((second, "start incoming")) == 1
    client.close()


def test_sighup_updates_through_the_pre_start_too(prestart: StartService) -> None:
    svc = prestart()
    client = Client(svc.port)
    old = client.ask("a")
    os.kill(svc.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(svc.pid_of("restored incoming")) == 1, "no update on SIGHUP")
    (new,) = svc.pid_of("restored incoming")
    assert client.ask("b") == new != old
    assert svc.pid_of("freeze requested") == [old]
    client.close()


def test_a_prestarted_environment_without_a_supervisor_socket_is_refused() -> None:
    env = {
        service_api.SESSION_NAME_ENV: "pre",
        service_api.SESSION_STATE_ENV: service_api.PRESTARTED_STATE,
    }
    with pytest.raises(ValueError, match="LIVEUPDATE_SUPERVISOR_FD"):
        liveupdate.inherited_session(env)


def test_freeze_fd_without_a_supervisor_never_fires(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("alone")
    svc = service_api.InheritedSession("alone", uapi.SessionDirection.OUTGOING, session)
    fd = svc.freeze_fd()
    assert svc.freeze_fd() == fd
    assert svc.freeze_requested() is False
    svc.frozen()  # closes the session fds; tells nobody
    assert session.closed
    os.close(fd)


def test_a_file_preserved_without_the_library_is_handed_to_the_prestarted_version(
    prestart: StartService,
) -> None:
    # The supervisor sends restore() the tokens luod lists at the hand-over,
    # not those it holds copies of: a file the service preserved on its
    # session fd directly (the supervisor never heard of it) is taken over too.
    svc = prestart()
    (first,) = svc.pid_of("restored outgoing")
    assert svc.update().returncode == 0
    (second,) = svc.pid_of("restored incoming")
    assert svc.pid_of(f"memfd of {first}") == [first, second]
    assert svc.update().returncode == 0
    assert len(svc.pid_of(f"memfd of {first}")) == 3
