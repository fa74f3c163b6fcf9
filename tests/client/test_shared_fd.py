"""Processes sharing one session or device fd each get their own replies (wire 1.1).

Over luod's socket a reply goes to whoever reads the fd first; the library
binds a private channel per process that did not get the fd from luod
itself, as ``docs/concepts/wire.md`` describes. The processes here are real:
forked children that keep using the parent's :class:`liveupdate.Session`,
and exec'd programs that adopt the inherited fd with ``Session.from_fd``,
all calling at the same time as the parent.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi, wire
from liveupdate.client.errors import LiveUpdateError
from liveupdate.client.transport import SocketTransport
from luodtest import Luod, copies_settled, fds_settle, memfd, wait_for

sys.path.insert(0, str(Path(__file__).parent))
from _shared_worker import hammer

pytestmark = pytest.mark.luod_only

WORKER = Path(__file__).parent / "_shared_worker.py"
PROCESSES = 8
CALLS = 1000


def _fork_hammer(session: liveupdate.Session, index: int, name: bytes) -> int:
    """A forked child calling through the parent's object; its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        problem = hammer(session, index, CALLS, name)
        if problem is not None:
            os.write(2, f"child {index}: {problem}\n".encode())
        os._exit(0 if problem is None else 1)
    return pid


def test_eight_processes_sharing_a_session_fd_each_get_their_own_replies(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev:
        session = dev.create_session("shared")
        keep = memfd(b"kept")
        session.preserve(keep, 7)
        copies_settled(dev)
        baseline = luod.fd_count()
        # Half the processes are forked (the library notices the fork), half
        # exec'd (they adopt the inherited fd); the parent calls meanwhile.
        forked = [_fork_hammer(session, i, b"shared") for i in range(PROCESSES // 2)]
        fd = session.fileno()
        execd = [
            subprocess.Popen(
                [sys.executable, str(WORKER), str(fd), str(i), str(CALLS)],
                pass_fds=[fd],
                stderr=subprocess.PIPE,
            )
            for i in range(PROCESSES // 2, PROCESSES)
        ]
        assert hammer(session, PROCESSES, CALLS, b"shared") is None
        for pid in forked:
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        for proc in execd:
            _out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
        # Every channel ended with its process; the session is as it was.
        fds_settle(luod, baseline)
        assert sorted(f.token for f in dev.list_sessions("shared").sessions[0].files) == [7]
        os.close(keep)


def test_a_forked_child_binds_one_channel_and_the_parent_calls_directly(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev, dev.create_session("one") as session:
        copies_settled(dev)
        baseline = luod.fd_count()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            ok = all(session.get_name() == b"one" for _ in range(20))
            os._exit(0 if ok else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        # The child's channel was one fd in luod, gone with the child; the
        # parent never bound one.
        assert session._channel == -1
        fds_settle(luod, baseline)


def test_an_adopted_session_fd_calls_through_its_own_channel(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev, dev.create_session("adopted") as session:
        adopted = liveupdate.Session.from_fd(os.dup(session.fileno()))
        assert adopted.get_name() == b"adopted"
        assert adopted._channel >= 0
        channel = adopted._channel
        adopted.close()
        with pytest.raises(OSError) as exc:
            os.fstat(channel)
        assert exc.value.errno == errno.EBADF
        # Closing the adopted copy released nothing: the creator's fd is open.
        assert session.get_name() == b"adopted"


def test_closing_the_shared_fd_ends_its_channels(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev:
        session = dev.create_session("ending")
        adopted = liveupdate.Session.from_fd(os.dup(session.fileno()))
        adopted.get_name()
        # A copy of the channel's client end, to watch luod's end of it.
        watch = socket.socket(fileno=os.dup(adopted._channel))
        adopted.close()
        # The last copy of the session fd closed: the session is released,
        # and luod closes the channel with it, though a process still holds
        # the channel's other end.
        session.close()
        wait_for(lambda: "ending" not in [s.name for s in dev.list_sessions().sessions])
        watch.settimeout(10)
        assert watch.recv(16) == b""
        watch.close()


def test_binding_against_a_luod_without_channels_falls_back_to_the_shared_fd(
    scripted: Callable[..., object], tmp_path: Path
) -> None:
    # A 1.0 luod closes the fd a BIND carries and answers it ENOTTY.
    def answer(msg: wire.Message) -> tuple[bytes, list[int]]:
        req = wire.decode_request(msg.data)
        if req.cmd == wire.BIND_CMD:
            return wire.encode_reply(-errno.ENOTTY), []
        return wire.encode_reply(0, req.arg), []

    server = scripted(wire.HELLO.pack(wire.HELLO_MAGIC, 1, 0, 0), answer)
    transport = SocketTransport()
    fd = transport.open(server.path)  # type: ignore[attr-defined]
    try:
        assert transport.bind(fd) == fd
    finally:
        os.close(fd)


def test_a_refused_bind_raises_its_errno(scripted: Callable[..., object]) -> None:
    def answer(msg: wire.Message) -> tuple[bytes, list[int]]:
        return wire.encode_reply(-errno.EMFILE), []

    server = scripted(wire.encode_hello(), answer)
    transport = SocketTransport()
    fd = transport.open(server.path)  # type: ignore[attr-defined]
    try:
        with pytest.raises(LiveUpdateError) as exc:
            transport.bind(fd)
        assert exc.value.errno == errno.EMFILE
    finally:
        os.close(fd)


def test_a_kernel_fd_needs_no_channel() -> None:
    from liveupdate.client.transport import KernelTransport

    assert KernelTransport().bind(5) == 5


def test_the_device_fd_shared_by_a_forked_child_answers_each_caller(luod: Luod) -> None:
    with liveupdate.open_device(luod.socket) as dev:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's coverage is not collected
            ok = True
            for i in range(200):
                with dev.create_session(f"child-{i}") as s:
                    ok = ok and s.get_name() == f"child-{i}".encode()
            os._exit(0 if ok else 1)
        for i in range(200):
            with dev.create_session(f"parent-{i}") as s:
                assert s.get_name() == f"parent-{i}".encode()
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert dev.get_state().state == uapi.LuodState.NORMAL
