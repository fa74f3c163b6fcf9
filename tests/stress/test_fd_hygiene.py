"""Stress: luod's fd hygiene under churn, garbage and misbehaving clients (luod only).

Every preserved file and every session costs luod an fd, so a leak is a slow
death of the daemon. Each test records ``luod.fd_count()`` (``/proc/PID/fd``)
when the daemon starts, abuses it, and then checks that the count comes back
to that baseline (polling briefly: luod handles closes asynchronously) and
that the daemon still opens, creates and preserves.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _stress_util import (
    Raw,
    assert_fd_count_back,
    assert_still_serves,
    create_arg,
    daemon_fds,
    get_name_arg,
    preserve_arg,
)

from liveupdate import uapi, wire
from luodtest import Luod, memfd

pytestmark = pytest.mark.luod_only

WORKER = Path(__file__).resolve().parent / "_worker.py"
CREATE = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
PRESERVE = uapi.LIVEUPDATE_SESSION_PRESERVE_FD
GET_NAME = uapi.LIVEUPDATE_SESSION_GET_NAME


def _worker(daemon: Luod, mode: str, wid: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), daemon.socket, mode, wid],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        close_fds=True,
    )


def test_create_preserve_close_cycles(luod: Luod) -> None:
    baseline = luod.fd_count()
    with luod.open() as dev:
        for n in range(1000):
            with dev.create_session(f"cycle-{n}") as session:
                fd = memfd(b"cycle %d" % n)
                try:
                    session.preserve(fd, n)
                finally:
                    os.close(fd)
    assert_fd_count_back(luod, baseline)
    assert_still_serves(luod, "after-cycles")


def _garbage(rng: random.Random) -> list[bytes]:
    """Random bytes, truncated headers, lying headers and oversized messages."""
    messages = [rng.randbytes(rng.randint(1, 300)) for _ in range(300)]
    messages += [rng.randbytes(n) for n in range(1, 8)]  # shorter than a header
    messages += [
        wire.REQUEST_HEADER.pack(CREATE, 72) + bytes(10),  # arg_len lies (too big)
        wire.REQUEST_HEADER.pack(CREATE, 2) + bytes(72),  # arg_len lies (too small)
        wire.REQUEST_HEADER.pack(CREATE, 0xFFFFFFFF),  # absurd arg_len
        wire.REQUEST_HEADER.pack(CREATE, 100_000) + bytes(100_000),  # over the cap
        wire.REQUEST_HEADER.pack(CREATE, 150_000) + rng.randbytes(150_000),
        wire.REQUEST_HEADER.pack(GET_NAME, 4) + (0xFFFFFFFF).to_bytes(4, "little"),
        wire.REQUEST_HEADER.pack(0xFFFFFFFF, 0),
    ]
    rng.shuffle(messages)
    return messages


def test_garbage_gets_one_error_reply_each_and_leaks_nothing(luod: Luod) -> None:
    baseline = luod.fd_count()
    rng = random.Random(0x1A)
    with Raw.device(luod.socket) as dev, dev.create_session("garbage") as session:
        for conn in (dev, session):
            for message in _garbage(rng):
                ret = conn.ret_of(message)
                assert ret < 0, f"garbage {message[:16]!r}... accepted"
            # Still the same, working connection.
            assert dev.call(0xBA02, b"") == -errno.ENOTTY
            assert session.call(GET_NAME, get_name_arg()) == 0
        # A zero-length message is a close.
        session.send(b"")
        assert session.eof()
        dev.send(b"")
        assert dev.eof()
    assert_fd_count_back(luod, baseline)
    assert_still_serves(luod, "garbage")  # the name is free again: the session was released


def test_zero_length_message_with_an_fd_is_a_close(luod: Luod) -> None:
    baseline = luod.fd_count()
    with Raw.device(luod.socket) as dev:
        fd = memfd()
        try:
            dev.send(b"", [fd])
        finally:
            os.close(fd)
        assert dev.eof(), "luod answered instead of closing"
    assert_fd_count_back(luod, baseline)


def test_clients_vanishing_mid_call(luod: Luod) -> None:
    baseline = luod.fd_count()
    # A CREATE_SESSION whose reply (and session fd) is never read.
    for n in range(50):
        dev = Raw.device(luod.socket)
        dev.send(wire.encode_request(CREATE, create_arg(f"vanish-{n}")))
        dev.close()
    # A PRESERVE_FD whose session goes away before the reply.
    with Raw.device(luod.socket) as dev:
        for n in range(50):
            session = dev.create_session(f"vanish-session-{n}")
            fd = memfd(b"gone")
            session.send(wire.encode_request(PRESERVE, preserve_arg(fd, n)), [fd])
            os.close(fd)
            session.close()
    # A process killed (-9) in the middle of a create/preserve/close loop.
    churn = _worker(luod, "churn", "k")
    try:
        assert churn.stdout is not None and churn.stdout.readline().strip() == "looping"
    finally:
        churn.send_signal(signal.SIGKILL)
        churn.wait()
        if churn.stdout is not None:
            churn.stdout.close()
    assert churn.returncode == -signal.SIGKILL
    assert_fd_count_back(luod, baseline)
    # The names of the vanished sessions are free again.
    with luod.open() as dev:
        dev.create_session("vanish-0").close()
        dev.create_session("vanish-session-0").close()
    assert_still_serves(luod, "after-vanishing")


def test_stray_and_extra_fds_are_closed(luod: Luod) -> None:
    baseline = luod.fd_count()
    marker = f"stray-{os.getpid()}"
    fds = [memfd(b"stray", name=marker) for _ in range(8)]
    try:
        with Raw.device(luod.socket) as dev:
            # Fds attached to calls that take none are closed and ignored.
            ret = dev.ret_of(wire.encode_request(CREATE, create_arg("stray")), fds[:3])
            assert ret == 0
            assert dev.ret_of(wire.encode_request(0xBA02, b""), fds) == -errno.ENOTTY
            assert dev.ret_of(b"\x01\x02\x03", fds[:2]) == -errno.EFAULT
            session = dev.create_session("stray-session")
            with session:
                assert session.call(GET_NAME, get_name_arg(), fds[:5]) == 0
                assert session.call(0xBA44, b"", fds) == -errno.ENOTTY
                # PRESERVE_FD takes exactly one fd: two, or many, is EBADF.
                assert session.call(PRESERVE, preserve_arg(fds[0], 1), fds[:2]) == -errno.EBADF
                assert session.call(PRESERVE, preserve_arg(fds[0], 1), fds) == -errno.EBADF
                many = [os.dup(fds[0]) for _ in range(wire.MAX_FDS_PER_MESSAGE - 1)]
                try:
                    ret = session.call(PRESERVE, preserve_arg(fds[0], 1), many)
                    assert ret == -errno.EBADF
                finally:
                    wire.close_fds(many)
                assert not [t for t in daemon_fds(luod.pid).values() if marker in t]
                # One fd is fine, and then luod holds exactly that one.
                assert session.call(PRESERVE, preserve_arg(fds[0], 1), fds[:1]) == 0
                assert len([t for t in daemon_fds(luod.pid).values() if marker in t]) == 1
    finally:
        wire.close_fds(fds)
    assert_fd_count_back(luod, baseline)
    assert_still_serves(luod, "after-stray")


def test_requests_never_read_then_exit(luod: Luod) -> None:
    baseline = luod.fd_count()
    # In this process: pile up GET_NAMEs on a session, and CREATE_SESSIONs
    # (whose replies carry session fds) on the device, then just close.
    dev = Raw.device(luod.socket)
    session = dev.create_session("unread")
    for conn, request in (
        (session, wire.encode_request(GET_NAME, get_name_arg())),
        (dev, None),
    ):
        conn.sock.setblocking(False)
        sent = 0
        try:
            while sent < 20000:
                data = request or wire.encode_request(CREATE, create_arg(f"unread-{sent}"))
                conn.sock.send(data)
                sent += 1
        except BlockingIOError:
            pass
        assert sent > 10
    session.close()
    dev.close()
    # In another process that exits without reading anything.
    flood = _worker(luod, "flood", "x")
    out, _ = flood.communicate(timeout=60)
    assert flood.returncode == 0 and out.startswith("flooded")
    assert_fd_count_back(luod, baseline, timeout=20)
    with luod.open() as dev2:
        dev2.create_session("unread-0").close()
        dev2.create_session("floodx-0").close()
    assert_still_serves(luod, "after-unread")


def test_half_open_sockets_and_abrupt_shutdowns(luod: Luod) -> None:
    baseline = luod.fd_count()
    with Raw.device(luod.socket) as dev:
        sessions = [dev.create_session(f"half-{n}") for n in range(20)]
        for n, session in enumerate(sessions):
            if n % 2:
                session.sock.shutdown(socket.SHUT_WR)  # EOF from our side, socket kept
            else:
                session.sock.shutdown(socket.SHUT_RDWR)
        for session in sessions:
            assert session.eof()
            session.close()
    assert_fd_count_back(luod, baseline)
    assert_still_serves(luod, "after-half-open")
