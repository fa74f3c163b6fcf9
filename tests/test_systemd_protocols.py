"""luod under a service manager: socket activation and sd_notify, with real processes.

* Socket activation: Debian's ``systemd-socket-activate`` (from the
  ``systemd`` package) binds the ``SOCK_SEQPACKET`` listener, waits for the
  first connection and execs luod with it as fd 3 (``LISTEN_FDS=1``,
  ``LISTEN_PID`` = its own pid, which luod keeps). That first connection must
  be served, the listener must survive a live update, and the socket file is
  the manager's: luod never removes it.
* ``LISTEN_*`` variables meant for another process (or malformed) are not
  activation: luod binds its own socket and removes it when it stops.
* ``NOTIFY_SOCKET`` may name an abstract socket (``@name``); a notify socket
  nobody listens on never stops luod from serving.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from luodtest import (
    Luod,
    assert_retrieves,
    can_connect,
    event_names,
    events,
    luoctl_reboot,
    preserved_session,
    wait_for,
)

pytestmark = pytest.mark.luod_only

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
LUOD = [sys.executable, "-m", "liveupdate.server.luod"]

needs_socket_activate = pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="needs systemd-socket-activate (Debian package systemd)",
)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    return env


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Luod]:
    """luod as systemd-socket-activate starts it: not running until a client connects.

    systemd-socket-activate passes on only the variables named with ``-E``:
    every one of ours is named, so luod runs as any other test's luod would.
    """
    assert SOCKET_ACTIVATE is not None
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    env = _env()
    daemon = Luod(str(state / "device"), state, state / "luod.log", [], env)
    passed = [arg for name in env for arg in ("-E", name)]
    with open(daemon.log, "ab") as log:
        daemon.proc = subprocess.Popen(
            [
                SOCKET_ACTIVATE,
                "--seqpacket",
                "--listen",
                daemon.socket,
                *passed,
                *LUOD,
                "--socket",
                daemon.socket,
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=log,
            env=env,
        )
    try:
        wait_for(lambda: os.path.exists(daemon.socket), "the manager's listener", daemon=daemon)
        yield daemon
    finally:
        daemon.stop()


@needs_socket_activate
def test_the_connection_that_activates_luod_is_served(activated: Luod) -> None:
    launcher = activated.proc
    assert launcher is not None
    manager_socket = os.stat(activated.socket).st_ino
    assert not events(activated, "started")  # nothing runs until a client comes

    with liveupdate.open_device(activated.socket, timeout=30.0) as dev:
        assert dev.get_state().generation == 1

    (started,) = events(activated, "started")
    assert started["activated"] is True
    # systemd-socket-activate execs luod in its own process: LISTEN_PID is luod's.
    assert started["pid"] == launcher.pid
    assert os.stat(activated.socket).st_ino == manager_socket  # used, never re-bound
    assert activated.stop() == 0
    assert event_names(activated)[-1] == "stopped"
    # The socket file is the manager's: it outlives luod (systemd removes it).
    assert os.stat(activated.socket).st_ino == manager_socket


@needs_socket_activate
def test_a_live_update_keeps_serving_on_the_activated_socket(activated: Luod) -> None:
    manager_socket = os.stat(activated.socket).st_ino
    with liveupdate.open_device(activated.socket, timeout=30.0):
        pass
    activated.wait_serving()
    session = preserved_session(activated, "activated-vm", b"kept by the manager's socket")

    old, new = luoctl_reboot(activated)
    session.close()  # the old generation's fd: luod closed its end at the reboot

    assert (old, new) == (1, 2)
    assert os.stat(activated.socket).st_ino == manager_socket
    assert events(activated, "started", generation=2, activated=True), activated.log_text()
    with activated.open() as dev, dev.retrieve_session("activated-vm") as incoming:
        assert_retrieves(incoming, 1, b"kept by the manager's socket")
        incoming.finish()
    assert activated.stop() == 0
    assert os.stat(activated.socket).st_ino == manager_socket


@pytest.mark.parametrize(
    ("listen_pid", "listen_fds"),
    [
        ("1", "1"),  # meant for another process (pid 1 is never luod)
        ("not-a-pid", "1"),
        ("$$", "0"),  # for luod itself, but no fd passed
        ("$$", "many"),
    ],
)
def test_listen_variables_that_are_not_activation_leave_luod_to_bind_its_own_socket(
    tmp_path: Path, listen_pid: str, listen_fds: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    daemon = Luod(str(state / "device"), state, state / "luod.log", [], _env())
    # A shell that exports the variables and then execs luod: "$$" is luod's own pid.
    launcher = f'export LISTEN_PID={listen_pid} LISTEN_FDS={listen_fds}; exec "$@"'
    with open(daemon.log, "ab") as log:
        daemon.proc = subprocess.Popen(
            ["sh", "-c", launcher, "sh", *LUOD, "--socket", daemon.socket, "--log-format", "json"],
            stdout=log,
            stderr=log,
            env=daemon.env,
        )
    try:
        daemon.wait_serving()
        assert events(daemon, "started", activated=False), daemon.log_text()
        assert can_connect(daemon.socket)
        with daemon.open() as dev:
            assert dev.get_state().generation == 1
    finally:
        assert daemon.stop() == 0
    # luod's own socket: removed when it stops (an activated one would stay).
    assert not os.path.lexists(daemon.socket)


def test_sd_notify_reaches_an_abstract_notify_socket(luod_factory: Callable[..., Luod]) -> None:
    name = f"luodtest-notify-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + name)
        notify.settimeout(20)
        daemon = luod_factory(start=False)
        daemon.env["NOTIFY_SOCKET"] = "@" + name
        daemon.start()

        assert notify.recv(4096).decode().split("\n") == [
            "READY=1",
            "STATUS=serving generation 1",
        ]
        assert daemon.stop(signal.SIGTERM) == 0
        assert notify.recv(4096).decode().split("\n") == ["STOPPING=1"]


def test_a_notify_socket_nobody_listens_on_does_not_stop_luod(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    daemon = luod_factory(start=False)
    daemon.env["NOTIFY_SOCKET"] = str(tmp_path / "no-manager-here")
    daemon.start()

    with daemon.open() as dev:
        assert dev.get_state().generation == 1
    assert daemon.stop() == 0
    assert event_names(daemon)[-1] == "stopped"
