"""``luoctl run`` keeps its service running whatever happens to luod.

The echo example under a real supervisor, with a client that keeps one TCP
connection open and sends numbered lines through it, and another that opens
connections in a loop: luod is live-updated ten times, SIGKILLed and started
again, SIGKILLed for good. The service is never restarted (same pid), its
listener never closes (no refused connection), the connection never drops
and no echo is lost.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from luodtest import Luod, luoctl, wait_for
from test_service_supervisor import Connector, Service, Talker

pytestmark = pytest.mark.luod_only


def _started(service: Service) -> list[str]:
    """The supervisor's "started pid N" lines: one per start of the service."""
    return [line for line in service.log.read_text().splitlines() if "started pid" in line]


def _echoes_after_now(talker: Talker, what: str) -> None:
    mark = talker.sent
    wait_for(lambda: bool(talker.received) and talker.received[-1] > mark, what, timeout=30)


def _finish(service: Service, talker: Talker, connector: Connector) -> None:
    talker.stop_flag.set()
    connector.stop_flag.set()
    talker.join(10)
    connector.join(60)
    service.stop()


def _serving(luod: Luod, tmp_path: Path) -> tuple[Service, int, Talker, Connector]:
    """The echo service under a supervisor, its pid, and its two clients at work."""
    service = Service(luod, tmp_path)
    service.start()
    pid = service.service_pid()
    talker, connector = Talker(service.port), Connector(service.port)
    talker.start()
    connector.start()
    return service, pid, talker, connector


def _check_clients(talker: Talker, connector: Connector) -> None:
    assert talker.error is None, talker.error
    # Every line was echoed, in order, over the one connection.
    assert talker.received == list(range(len(talker.received)))
    assert len(talker.received) >= talker.sent - 1
    assert connector.refused == 0
    assert connector.ok > 0


def test_ten_luod_reboots_restart_the_service_zero_times(luod: Luod, tmp_path: Path) -> None:
    service, pid, talker, connector = _serving(luod, tmp_path)
    try:
        _echoes_after_now(talker, "no echo before the reboots")
        for n in range(10):
            result = luoctl(luod.socket, "reboot")
            assert result.returncode == 0, result.stderr
            wait_for(
                lambda n=n: service.log.read_text().count("luod rebooted (live update)") > n,
                f"no re-attach after reboot {n + 1}:\n{service.log.read_text()}",
                timeout=30,
            )
            # The client sees the service answer across the reboot.
            _echoes_after_now(talker, f"no echo after reboot {n + 1}")
        assert service.service_pid() == pid
        assert len(_started(service)) == 1, service.log.read_text()
        assert "luod is gone" not in service.log.read_text()
        # The session is in the newest generation, with the listener and
        # every open connection (a later update can hand them over).
        result = luoctl(luod.socket, "update", "echo")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: service.service_pid() != pid, "no update after the reboots", timeout=30)
        _echoes_after_now(talker, "no echo after the update")
    finally:
        _finish(service, talker, connector)
    _check_clients(talker, connector)
    assert len(_started(service)) == 2


@pytest.mark.parametrize(
    ("keeper", "comes_back"),
    [
        ("auto", "it kept the session"),  # luod's keeper gives it back as incoming
        ("off", "re-created from the supervisor's copies"),  # luod lost it all
    ],
)
def test_luod_sigkilled_and_started_again_gets_the_session_back(
    luod_factory: Callable[..., Luod], tmp_path: Path, keeper: str, comes_back: str
) -> None:
    luod = luod_factory("--keeper", keeper)
    service, pid, talker, connector = _serving(luod, tmp_path)
    try:
        _echoes_after_now(talker, "no echo before the crash")
        luod.stop(signal.SIGKILL)
        wait_for(
            lambda: "luod is gone (connection lost)" in service.log.read_text(),
            f"the supervisor did not notice luod's death:\n{service.log.read_text()}",
            timeout=30,
        )
        # luod is away: the service serves on, its listener open.
        _echoes_after_now(talker, "no echo while luod is away")
        ok = connector.ok
        wait_for(lambda: connector.ok > ok, "no new connection while luod is away", timeout=30)

        luod.start()
        wait_for(
            lambda: comes_back in service.log.read_text(),
            f"the supervisor did not re-attach:\n{service.log.read_text()}",
            timeout=30,
        )
        result = luoctl(luod.socket, "sessions")
        assert result.returncode == 0, result.stderr
        assert "echo" in result.stdout, result.stdout
        assert service.service_pid() == pid
        assert len(_started(service)) == 1

        # The state is in the new luod: an update hands it to a new service,
        # which takes the listener and the talker's connection over.
        result = luoctl(luod.socket, "update", "echo")
        assert result.returncode == 0, result.stderr
        wait_for(lambda: service.service_pid() != pid, "no update after the crash", timeout=30)
        _echoes_after_now(talker, "no echo after the update")
    finally:
        _finish(service, talker, connector)
    _check_clients(talker, connector)
    lines = service.log.read_text().splitlines()
    # The second instance started from the state the supervisor gave back.
    assert any("incoming, " in line and "connections" in line for line in lines[-6:]), lines


def test_luod_that_never_comes_back_leaves_the_service_running(luod: Luod, tmp_path: Path) -> None:
    service, pid, talker, connector = _serving(luod, tmp_path)
    try:
        _echoes_after_now(talker, "no echo before the crash")
        luod.stop(signal.SIGKILL)
        # The supervisor keeps trying, with a growing delay.
        wait_for(
            lambda: service.log.read_text().count("luod unreachable") >= 4,
            f"the supervisor does not retry:\n{service.log.read_text()}",
            timeout=30,
        )
        delays = [
            float(line.rsplit("next attempt in ", 1)[1].split()[0])
            for line in service.log.read_text().splitlines()
            if "luod unreachable" in line
        ]
        assert delays == sorted(delays) and delays[-1] > delays[0], delays
        assert service.service_pid() == pid
        _echoes_after_now(talker, "no echo while luod is away")
    finally:
        talker.stop_flag.set()
        connector.stop_flag.set()
        talker.join(10)
        connector.join(60)
    assert service.proc is not None
    os.kill(service.proc.pid, signal.SIGTERM)
    assert service.proc.wait(30) == 0, service.log.read_text()
    assert "stopped (SIGTERM)" in service.log.read_text()
    _check_clients(talker, connector)
