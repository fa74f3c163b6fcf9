"""luod's control socket (issue 11, item 5): the operator's way in while an
agent holds the device.

The device admits one opener; ``luoctl state``, ``prepare``, ``cancel``,
``reboot``, ``finish`` and ``sessions`` go through the control socket
(``control`` next to the device socket) when it exists, so a long-running
agent holding the device never makes them fail with ``EBUSY``. The control
socket answers GET_STATE, SET_EVENT and LIST_SESSIONS only, to any number of
connections at once, and follows live updates like the device's listener.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from liveupdate.client.control import Control, control_path, open_control
from luodtest import Luod, luoctl, luoctl_reboot, memfd, read_all

pytestmark = pytest.mark.luod_only

#: Holds the device open until its stdin closes.
_HOLDER = """
import sys, liveupdate
dev = liveupdate.open_device(sys.argv[1], timeout=10)
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture(name="holder")
def holder_fixture() -> Iterator[Callable[[Luod], subprocess.Popen[str]]]:
    """Another process that holds a luod's device open."""
    procs: list[subprocess.Popen[str]] = []

    def hold(daemon: Luod) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, daemon.socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "holding"
        return proc

    yield hold
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def control_of(daemon: Luod) -> str:
    return str(Path(daemon.socket).parent / "control")


def test_luoctl_reboot_succeeds_while_another_process_holds_the_device(
    luod: Luod, holder: Callable[[Luod], subprocess.Popen[str]]
) -> None:
    with luod.open() as dev:
        session = dev.create_session("kept")
    fd = memfd(b"across the update")
    session.preserve(fd, 1)
    os.close(fd)
    holder(luod)
    with pytest.raises(liveupdate.DeviceBusyError):
        luod.open(timeout=0)

    result = luoctl(luod.socket, "--json", "state")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outgoing_sessions"] == 1
    listed = luoctl(luod.socket, "--json", "sessions")
    assert listed.returncode == 0, listed.stderr
    assert [s["name"] for s in json.loads(listed.stdout)["sessions"]] == ["kept"]

    assert luoctl_reboot(luod, "--wait", "30") == (1, 2)
    # The next generation took the control listener over: still served.
    with open_control(control_of(luod)) as control:
        after = control.get_state()
    assert (after.generation, after.incoming_sessions) == (2, 1)
    session.close()
    with luod.open(timeout=10) as dev, dev.retrieve_session("kept") as incoming:
        got = incoming.retrieve(1)
        assert read_all(got) == b"across the update"
        os.close(got)
        incoming.finish()
    finish = luoctl(luod.socket, "finish")
    assert finish.returncode == 0, finish.stderr


def test_control_connections_are_many_and_never_create_sessions(luod: Luod) -> None:
    path = control_path(luod.socket)
    assert path == control_of(luod)
    with luod.open() as dev, open_control(path) as first, open_control(path) as second:
        assert first.get_state().generation == second.get_state().generation == 1
        raw = liveupdate.Device(os.dup(first.fileno()), dev.transport, path)  # type: ignore[arg-type]
        with raw:
            for call in (raw.create_session, raw.retrieve_session):
                with pytest.raises(liveupdate.LiveUpdateError) as refused:
                    call("not-here")
                assert refused.value.errno == errno.ENOTTY
        assert dev.list_sessions().sessions == ()


def test_control_socket_is_created_with_its_own_mode(luod_factory: Callable[..., Luod]) -> None:
    default = luod_factory()
    assert stat.S_IMODE(os.stat(control_of(default)).st_mode) == 0o600
    elsewhere = Path(default.state_dir).parent / "ctl"
    custom = luod_factory(
        "--control-socket", str(elsewhere / "ops"), "--control-socket-mode", "0660"
    )
    assert stat.S_IMODE(os.stat(elsewhere / "ops").st_mode) == 0o660
    result = luoctl(custom.socket, "--control-socket", str(elsewhere / "ops"), "--json", "state")
    assert result.returncode == 0, result.stderr
    custom.stop()
    assert not (elsewhere / "ops").exists()


def test_luoctl_falls_back_to_the_device_without_a_control_socket(luod: Luod) -> None:
    os.unlink(control_of(luod))
    assert control_path(luod.socket) is None
    result = luoctl(luod.socket, "--json", "state")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["generation"] == 1


def test_open_control_returns_a_control(luod: Luod) -> None:
    with open_control(control_of(luod)) as control:
        assert isinstance(control, Control)
        assert control.set_event(uapi.LuodEvent.FINISH) == 1
    assert control.closed
