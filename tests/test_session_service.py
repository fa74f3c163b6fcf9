"""LUOD_SESSION_SET_SERVICE: which service runs on a session, for the operator.

Set on an outgoing session by its owner (or root), shown in the listing as the
session's ``service`` (``SessionInfo.service``), cleared by pid 0, never handed
over (not by a per-session update, not by a live update of luod); bad input
gets the contract's errno and changes nothing. ``luoctl run`` says it when it
starts the service, after each restart and after re-binding the session to a
new generation.
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi, wire
from liveupdate.client.listing import ServiceInfo
from luodtest import Luod, luoctl_reboot, preserved_session, wait_for
from test_service_supervisor import Service

pytestmark = pytest.mark.luod_only


def service_of(daemon: Luod, name: str) -> ServiceInfo | None:
    """The service the outgoing session ``name`` has in the listing."""
    with daemon.open() as dev:
        listing = dev.list_sessions(name, files=False)
    (outgoing,) = [s for s in listing.sessions if s.direction == uapi.SessionDirection.OUTGOING]
    return outgoing.service


def set_service_arg(**fields: int) -> bytes:
    arg = uapi.luod_session_set_service(size=ctypes.sizeof(uapi.luod_session_set_service))
    for name, value in fields.items():
        setattr(arg, name, value)
    return bytes(arg)


def call(session: liveupdate.Session, arg: bytes, creds: tuple[int, int, int] | None = None) -> int:
    """One LUOD_SESSION_SET_SERVICE on ``session``'s fd, with ``creds`` (pid, uid,
    gid) as the message's SCM_CREDENTIALS when given (root may say any); its ret."""
    sock = socket.socket(fileno=os.dup(session.fileno()))
    try:
        request = wire.encode_request(uapi.LUOD_SESSION_SET_SERVICE, arg)
        ancillary = []
        if creds is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, struct.pack("iII", *creds))]
        sock.sendmsg([request], ancillary)
        ret, _out = wire.decode_reply(sock.recv(wire.REPLY_HEADER.size + 64))
        return ret
    finally:
        sock.close()


def test_a_service_set_on_a_session_is_listed_until_cleared(luod: Luod) -> None:
    session = preserved_session(luod, "svc", b"state")
    assert service_of(luod, "svc") is None
    session.set_service(4321, restarts=3, last_exit=-signal.SIGKILL)
    assert service_of(luod, "svc") == ServiceInfo(4321, 3, -signal.SIGKILL)
    with luod.open() as dev:
        (info,) = dev.list_sessions("svc").sessions
    assert info.to_dict()["service"] == {"pid": 4321, "restarts": 3, "last_exit": -9}
    session.set_service(4322, restarts=4, last_exit=1)
    assert service_of(luod, "svc") == ServiceInfo(4322, 4, 1)
    session.set_service(0)
    assert service_of(luod, "svc") is None
    with luod.open() as dev:
        (info,) = dev.list_sessions("svc").sessions
    assert "service" not in info.to_dict()
    session.close()


@pytest.mark.parametrize(
    ("fields", "err"),
    [
        ({"flags": 1}, errno.EOPNOTSUPP),
        ({"reserved": 1}, errno.EINVAL),
        ({"pid": uapi.LUOD_SERVICE_PID_MAX + 1}, errno.EINVAL),
    ],
    ids=["flags", "reserved", "pid-beyond-pid-max"],
)
def test_bad_input_is_refused_and_changes_nothing(
    luod: Luod, fields: dict[str, int], err: int
) -> None:
    session = preserved_session(luod, "svc", b"state")
    session.set_service(10, 1, 2)
    assert call(session, set_service_arg(**{"pid": 11, **fields})) == -err
    assert service_of(luod, "svc") == ServiceInfo(10, 1, 2)
    session.close()


def test_the_client_refuses_values_the_struct_cannot_hold(luod: Luod) -> None:
    session = preserved_session(luod, "svc", b"state")
    for args in ((-1, 0, 0), (1, -1, 0), (1, 1 << 32, 0), (1, 0, 1 << 31)):
        with pytest.raises(ValueError):
            session.set_service(*args)
    assert service_of(luod, "svc") is None
    session.close()


def test_an_incoming_session_takes_no_service(luod: Luod) -> None:
    session = preserved_session(luod, "svc", b"state")
    session.set_service(10)
    session.update()
    with luod.open() as dev:
        incoming = dev.retrieve_session("svc")
        (listed,) = dev.list_sessions("svc").sessions
    # The hand-over stopped the service: the session does not claim one any more.
    assert listed.service is None
    with pytest.raises(liveupdate.InvalidArgumentError):
        incoming.set_service(10)
    incoming.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="forging SCM_CREDENTIALS needs root")
def test_only_the_owner_or_root_may_set_the_service(luod: Luod) -> None:
    session = preserved_session(luod, "svc", b"state")  # root's
    other = (os.getpid(), 65534, 65534)
    assert call(session, set_service_arg(pid=77), creds=other) == -errno.EACCES
    assert service_of(luod, "svc") is None
    assert call(session, set_service_arg(pid=77), creds=(os.getpid(), 0, 0)) == 0
    assert service_of(luod, "svc") == ServiceInfo(77, 0, 0)
    session.close()


def test_a_live_update_of_luod_does_not_carry_the_service(luod: Luod) -> None:
    session = preserved_session(luod, "svc", b"state")
    session.set_service(10)
    luoctl_reboot(luod)
    with luod.open() as dev:
        (listed,) = dev.list_sessions("svc").sessions
    assert listed.direction == uapi.SessionDirection.INCOMING and listed.service is None
    session.close()


def test_setting_the_service_sends_nothing_to_the_crash_copies(luod: Luod) -> None:
    """Not part of what is handed over or copied: the keeper gets no message."""
    session = preserved_session(luod, "svc", b"state")
    keeper = luod.keeper_pids()[0]
    before = _settled_wakeups(keeper)  # the preserve's copies are in
    for pid in range(100, 150):
        session.set_service(pid)
    with luod.open() as dev:
        dev.get_state()  # a round trip: any idle turn after the calls has run
    assert _settled_wakeups(keeper) == before
    session.close()


def _settled_wakeups(pid: int) -> int:
    """How many times process ``pid`` was woken from a wait (``/proc/PID/status``'s
    voluntary context switches: the keeper sleeps until a message comes), once
    the count stopped changing (the copies are sent on the loop's idle turns,
    a slow one paused after)."""

    def wakeups() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")

    seen = [wakeups()]

    def settled() -> bool:
        time.sleep(0.2)
        seen.append(wakeups())
        return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]

    wait_for(settled, "the keeper to settle", timeout=20)
    return seen[-1]


def test_luoctl_run_says_which_service_runs_through_restarts_and_reboots(
    luod: Luod, tmp_path: Path
) -> None:
    service = Service(luod, tmp_path)
    service.start()
    try:
        first = service.service_pid()
        wait_for(lambda: service_of(luod, "echo") == ServiceInfo(first, 0, 0), "first service")

        # A crash: restarted with its state, and the count and the exit say so.
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: service.service_pid() != first, "the restart", timeout=30)
        second = service.service_pid()
        wait_for(
            lambda: service_of(luod, "echo") == ServiceInfo(second, 1, -signal.SIGKILL),
            "the restarted service",
            timeout=30,
        )

        # A live update of luod: the supervisor says it again to the new generation.
        luoctl_reboot(luod)
        wait_for(
            lambda: "luod rebooted (live update)" in service.log.read_text(),
            "the re-attach",
            timeout=30,
        )
        wait_for(
            lambda: service_of(luod, "echo") == ServiceInfo(second, 1, -signal.SIGKILL),
            "the service in the new generation",
            timeout=30,
        )
        assert service.service_pid() == second
    finally:
        service.stop()


def test_the_fds_of_a_set_service_reply_are_none(luod: Luod) -> None:
    """SET_SERVICE carries no fd either way; the reply is the struct, unchanged."""
    session = preserved_session(luod, "svc", b"state")
    sock = socket.socket(fileno=os.dup(session.fileno()))
    try:
        sock.sendmsg([wire.encode_request(uapi.LUOD_SESSION_SET_SERVICE, set_service_arg(pid=5))])
        fds = array.array("i")
        data, ancdata, _flags, _addr = sock.recvmsg(256, socket.CMSG_SPACE(fds.itemsize))
    finally:
        sock.close()
    assert not [a for a in ancdata if a[1] == socket.SCM_RIGHTS]
    ret, out = wire.decode_reply(data)
    assert ret == 0 and out == set_service_arg(pid=5)
    session.close()
