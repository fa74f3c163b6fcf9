"""``luoctl run``: a real echo service updated and crashed under a client's nose.

A client keeps one TCP connection open and sends numbered lines through:
an update (``luoctl update``), a crash of the service (SIGKILL: the
supervisor restarts it with its state), a crash of the supervisor itself
(SIGKILL of the whole process group, then ``luoctl run`` again: keep-on-close
hands the session over) and a live update of luod itself (which the service
does not even notice). Meanwhile another client connects in a loop. The
promise: zero refused connections, zero lost bytes, the connection stays up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import (
    REPO,
    Luod,
    assert_retrieves,
    luoctl,
    luoctl_reboot,
    preserved_session,
    wait_for,
)

pytestmark = pytest.mark.luod_only

ECHO = REPO / "examples" / "echo_service.py"


class Service:
    """``luoctl run --session echo --keep-on-close -- python echo_service.py``."""

    def __init__(self, daemon: Luod, tmp: Path) -> None:
        self.daemon = daemon
        self.port_file = tmp / "port"
        self.log = tmp / "run.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.port_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable, "-m", "liveupdate.cli.luoctl", "--socket", self.daemon.socket,
                    "run", "--session", "echo", "--keep-on-close", "--stop-timeout", "5",
                    "--", sys.executable, str(ECHO), "0",
                ],
                stdout=log,
                stderr=log,
                env={**os.environ, "ECHO_PORT_FILE": str(self.port_file)},
                start_new_session=True,
            )  # fmt: skip
        wait_for(
            self.port_file.exists, f"the service did not start:\n{self.log.read_text()}", timeout=30
        )

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    def service_pid(self) -> int:
        """The echo service's pid (the supervisor's child; waits while it has none)."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + 30
        while not (pids := children.read_text().split()):
            assert time.monotonic() < deadline, "the supervisor has no service"
            time.sleep(0.01)
        return int(pids[0])

    def kill_all(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_all()


class Talker(threading.Thread):
    """Sends numbered lines on one connection and checks every echo comes back."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(60)
        self.sent = 0
        self.received: list[int] = []
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()

    def run(self) -> None:
        buf = b""
        try:
            while not self.stop_flag.is_set():
                self.sock.sendall(f"{self.sent}\n".encode())
                self.sent += 1
                while b"\n" not in buf:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("connection closed by the service")
                    buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    seq = int(line)
                    # A crash can repeat an echo (never lose one): drop repeats.
                    if not self.received or seq > self.received[-1]:
                        self.received.append(seq)
                time.sleep(0.002)
        except BaseException as exc:  # reported by the test
            self.error = exc


class Connector(threading.Thread):
    """Opens new connections in a loop, counting refusals.

    A connection that a service had accepted when it was SIGKILLed can be
    reset (nothing could have saved it); that is counted apart. A refused
    connection, which would mean the listener was ever closed, is the failure.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.refused = 0
        self.reset = 0
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    s.sendall(b"ping\n")
                    s.settimeout(30)
                    if s.recv(16).startswith(b"ping"):
                        self.ok += 1
                    else:
                        self.reset += 1
            except ConnectionRefusedError:
                self.refused += 1
            except OSError:
                self.reset += 1
            time.sleep(0.01)


def test_echo_service_survives_update_and_crashes(luod: Luod, tmp_path: Path) -> None:
    service = Service(luod, tmp_path)
    service.start()
    port = service.port
    talker = Talker(port)
    connector = Connector(port)
    talker.start()
    connector.start()
    try:
        wait_for(lambda: len(talker.received) > 20, "no echo before the update", timeout=30)

        # 1. A live update of the service.
        first = service.service_pid()
        result = luoctl(luod.socket, "update", "echo")
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: service.service_pid() != first, "the service was not restarted", timeout=30
        )
        mark = talker.sent
        wait_for(
            lambda: talker.received and talker.received[-1] > mark,
            "no echo after update",
            timeout=30,
        )

        # 2. The service crashes: the supervisor hands its state to a new one.
        second = service.service_pid()
        os.kill(second, signal.SIGKILL)
        wait_for(
            lambda: service.service_pid() != second, "the service was not restarted", timeout=30
        )
        mark = talker.sent
        wait_for(
            lambda: talker.received and talker.received[-1] > mark,
            "no echo after crash",
            timeout=30,
        )

        # 3. The supervisor and the service die together: keep-on-close keeps
        # the session; a new `luoctl run` takes it over.
        service.kill_all()
        time.sleep(0.2)
        with liveupdate.open_device(luod.socket, timeout=10) as dev:
            listing = dev.list_sessions("echo")
        directions = {s.direction for s in listing.sessions}
        assert uapi.SessionDirection.INCOMING in directions, listing
        service.start()
        assert service.port == port
        mark = talker.sent
        wait_for(
            lambda: talker.received and talker.received[-1] > mark,
            "no echo after restart",
            timeout=30,
        )

        # 4. luod itself is live-updated: the supervisor sees its session fds
        # die and re-attaches the session to the new generation; the service
        # keeps running (same pid), the connection and the listener carry on.
        before = service.service_pid()
        result = luoctl(luod.socket, "reboot")
        assert result.returncode == 0, result.stderr
        wait_for(
            lambda: "luod rebooted (live update)" in service.log.read_text(),
            "the supervisor did not re-attach after the reboot",
            timeout=30,
        )
        assert service.service_pid() == before
        mark = talker.sent
        wait_for(
            lambda: talker.received and talker.received[-1] > mark,
            "no echo after reboot",
            timeout=30,
        )
    finally:
        talker.stop_flag.set()
        connector.stop_flag.set()
        talker.join(10)
        connector.join(60)
        service.stop()
    assert talker.error is None, talker.error
    # Every line sent was echoed, in order, over the one connection.
    assert talker.received == list(range(len(talker.received)))
    assert len(talker.received) >= talker.sent - 1
    assert connector.refused == 0
    assert connector.ok > 0


def test_luoctl_run_refuses_a_held_session_without_finishing_the_incoming_one(
    luod: Luod,
) -> None:
    """``luoctl run`` when another process holds the outgoing session: refused, nothing lost.

    Broke once (review finding L1): ``luoctl run`` retrieved and finished the
    incoming session before finding the outgoing name taken, so the
    service's state was gone.
    """
    previous = preserved_session(luod, "svc", b"service-state")
    luoctl_reboot(luod)
    previous.close()
    with luod.open() as dev:
        intruder = dev.create_session("svc")  # another process's outgoing "svc"

    result = luoctl(luod.socket, "run", "--session", "svc", "--", "true", timeout=30)
    assert result.returncode != 0, result
    # luoctl's one-line error: user interface, not a log.
    message = result.stdout + result.stderr
    assert "session 'svc' is held by another process" in message, message

    # Nothing was retrieved, so nothing was finished: the state is still there.
    intruder.close()
    with luod.open() as dev:
        incoming = dev.retrieve_session("svc")
    with incoming:
        assert_retrieves(incoming, 1, b"service-state")
        incoming.finish()
