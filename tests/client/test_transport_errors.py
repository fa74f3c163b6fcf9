"""What the client library says when the other end is not a healthy luod.

Each case is a real peer: a luod that is stopped (SIGSTOP) or killed during a
call, a character device that is no LUO device, or a listener in this test
that answers like a broken (or foreign) server would, over a real
``SOCK_SEQPACKET`` socket. Every one must end in one :class:`LiveUpdateError`
with a meaningful errno, never a hang, a bare ``struct.error`` or a leaked fd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from scripted_server import Answer, ScriptedServer

import liveupdate
from liveupdate import uapi, wire
from liveupdate.client.errors import LiveUpdateError
from liveupdate.client.transport import KernelTransport, SocketTransport
from luodtest import Luod, memfd, wait_for

pytestmark = pytest.mark.luod_only


def own_fds() -> set[int]:
    """The fds open in this process.

    The listing's own directory fd (and the duplicate ``listdir`` makes of
    it) is gone once the listing is done: each number is checked to be open
    still, so the result does not depend on which numbers were free.
    """
    names = os.listdir("/proc/self/fd")
    fds = set()
    for name in names:
        try:
            fcntl.fcntl(int(name), fcntl.F_GETFD)
        except OSError:
            continue  # the listing's own fd, closed by now
        fds.add(int(name))
    return fds


def stopped(daemon: Luod) -> bool:
    stat = Path(f"/proc/{daemon.pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


# -- opening ------------------------------------------------------------------------------


def test_a_peer_that_does_not_speak_luods_protocol_is_eproto(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(b"SSH-2.0-OpenSSH_9.2p1\r\n")
    before = own_fds()
    with pytest.raises(LiveUpdateError) as info:
        liveupdate.open_device(server.path, timeout=5.0)
    assert info.value.errno == errno.EPROTO
    assert server.path in str(info.value)
    # The scripted server is a thread of this process: its end of the
    # connection counts among our fds until it sees ours close (if the
    # library leaked its socket, the thread never ends).
    server.thread.join(10)
    assert not server.thread.is_alive(), "the library kept its connection open"
    assert own_fds() == before


def test_a_peer_speaking_another_protocol_version_is_eproto(
    scripted: Callable[..., ScriptedServer],
) -> None:
    future = wire.HELLO.pack(wire.HELLO_MAGIC, wire.PROTOCOL_VERSION + 1, 0, 0)
    server = scripted(future)
    with pytest.raises(LiveUpdateError) as info:
        liveupdate.open_device(server.path, timeout=5.0)
    assert info.value.errno == errno.EPROTO
    assert "protocol version" in str(info.value)


def test_a_peer_that_hangs_up_before_its_hello_is_enodev(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(None)
    with pytest.raises(LiveUpdateError) as info:
        liveupdate.open_device(server.path, timeout=5.0)
    assert info.value.errno == errno.ENODEV
    assert "closed the connection" in str(info.value)


def test_a_refusal_in_the_hello_is_the_callers_errno(
    scripted: Callable[..., ScriptedServer],
) -> None:
    # luod refuses a connection in its hello (-EIO: it could not restore its state).
    server = scripted(wire.encode_hello(-errno.EIO))
    with pytest.raises(liveupdate.OrchestratorIOError) as info:
        liveupdate.open_device(server.path, timeout=5.0)
    assert info.value.errno == errno.EIO


def test_a_stopped_luod_is_an_open_timeout_and_serves_again_once_continued(
    luod: Luod,
) -> None:
    os.kill(luod.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: stopped(luod), "luod stopped")
        before = own_fds()
        with pytest.raises(LiveUpdateError) as info:
            liveupdate.open_device(luod.socket, timeout=0.3)
        assert info.value.errno == errno.ETIMEDOUT
        assert "no answer from luod" in str(info.value)
        assert own_fds() == before
    finally:
        os.kill(luod.pid, signal.SIGCONT)
    with luod.open(timeout=10.0) as dev:
        assert dev.get_state().generation == 1


# -- calls --------------------------------------------------------------------------------


def test_a_luod_killed_during_a_call_is_enodev(luod: Luod) -> None:
    dev = luod.open()
    session = dev.create_session("cut-short")
    os.kill(luod.pid, signal.SIGSTOP)
    wait_for(lambda: stopped(luod), "luod stopped")
    outcome: list[BaseException | None] = []
    fd = memfd(b"in flight")

    def preserve() -> None:
        try:
            session.preserve(fd, 1)
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    caller = threading.Thread(target=preserve)
    caller.start()
    try:
        os.kill(luod.pid, signal.SIGKILL)
        caller.join(20)
        assert not caller.is_alive(), "the call never returned after luod died"
    finally:
        os.close(fd)
    (error,) = outcome
    assert isinstance(error, LiveUpdateError), error
    assert error.errno == errno.ENODEV
    assert "luod rebooted or stopped" in str(error)
    with pytest.raises(LiveUpdateError) as info:
        dev.get_state()
    assert info.value.errno == errno.ENODEV
    session.close()
    dev.close()


def test_a_fence_on_a_stopped_luod_times_out_and_on_a_dead_one_is_enodev(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("fenced")
    try:
        assert session.fence(timeout=10.0) == 0
        os.kill(luod.pid, signal.SIGSTOP)
        wait_for(lambda: stopped(luod), "luod stopped")
        with pytest.raises(LiveUpdateError) as info:
            session.fence(timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT
        os.kill(luod.pid, signal.SIGKILL)
        wait_for(lambda: not luod.alive(), "luod gone")
        # The SYNC sent to the stopped luod was never answered: the next
        # fence finds the connection closed.
        with pytest.raises(LiveUpdateError) as info:
            session.fence(timeout=10.0)
        assert info.value.errno == errno.ENODEV
    finally:
        session.close()


# -- replies a broken server could send -----------------------------------------------------


def _state_reply(extra: bytes) -> Answer:
    def answer(msg: wire.Message) -> tuple[bytes, list[int]]:
        size = ctypes.sizeof(uapi.luod_get_state)
        return wire.encode_reply(0, bytes(uapi.luod_get_state(size=size)) + extra), []

    return answer


def test_a_reply_longer_than_the_struct_is_eproto(
    scripted: Callable[..., ScriptedServer],
) -> None:
    server = scripted(wire.encode_hello(), _state_reply(b"\0" * 64))
    with (
        liveupdate.open_device(server.path, timeout=5.0) as dev,
        pytest.raises(LiveUpdateError) as info,
    ):
        dev.get_state()
    assert info.value.errno == errno.EPROTO
    assert "reply longer than the struct" in str(info.value)


def test_a_reply_whose_header_lies_is_eproto(
    scripted: Callable[..., ScriptedServer],
) -> None:
    def lying(msg: wire.Message) -> tuple[bytes, list[int]]:
        return wire.REPLY_HEADER.pack(0, 999) + b"\0" * 8, []

    server = scripted(wire.encode_hello(), lying)
    with (
        liveupdate.open_device(server.path, timeout=5.0) as dev,
        pytest.raises(LiveUpdateError) as info,
    ):
        dev.get_state()
    assert info.value.errno == errno.EPROTO


def test_a_session_reply_without_its_fd_is_eproto(
    scripted: Callable[..., ScriptedServer],
) -> None:
    def no_fd(msg: wire.Message) -> tuple[bytes, list[int]]:
        # Echo the argument back, as a successful CREATE_SESSION would, but no fd.
        return wire.encode_reply(0, msg.data[wire.REQUEST_HEADER.size :]), []

    server = scripted(wire.encode_hello(), no_fd)
    with liveupdate.open_device(server.path, timeout=5.0) as dev:
        before = own_fds()
        with pytest.raises(LiveUpdateError) as info:
            dev.create_session("no-fd-comes-back")
        assert own_fds() == before
    assert info.value.errno == errno.EPROTO
    assert "reply carried no fd" in str(info.value)


def test_fds_sent_with_a_reply_to_a_call_that_returns_none_are_closed(
    scripted: Callable[..., ScriptedServer],
) -> None:
    # A broken server pushes an fd along with GET_STATE's reply: the
    # library must not leak it into the caller's process.
    pushed = memfd(b"unwanted")

    def with_fd(msg: wire.Message) -> tuple[bytes, list[int]]:
        size = ctypes.sizeof(uapi.luod_get_state)
        return wire.encode_reply(0, bytes(uapi.luod_get_state(size=size))), [pushed]

    server = scripted(wire.encode_hello(), with_fd)
    try:
        with liveupdate.open_device(server.path, timeout=5.0) as dev:
            before = own_fds()
            dev.get_state()
            assert own_fds() == before
    finally:
        os.close(pushed)


# -- a character device that is not LUO ----------------------------------------------------


def test_a_character_device_that_is_not_luo_answers_enotty() -> None:
    # /dev/null is a character device: the kernel transport is chosen, and
    # the kernel's answer to an ioctl it does not know is ENOTTY.
    with liveupdate.open_device("/dev/null") as dev:
        assert dev.transport.name == "kernel"
        with pytest.raises(liveupdate.NotSupportedError) as info:
            dev.create_session("not-on-dev-null")
    assert info.value.errno == errno.ENOTTY


def test_the_kernel_transport_refuses_a_buffer_shorter_than_its_size() -> None:
    # The kernel would read past the caller's bytes; the library says EFAULT first.
    fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        short = bytearray(ctypes.sizeof(uapi.luod_get_state))
        short[0:4] = (ctypes.sizeof(uapi.luod_get_state) + 64).to_bytes(4, "little")
        with pytest.raises(LiveUpdateError) as info:
            KernelTransport().ioctl(fd, uapi.LUOD_IOCTL_GET_STATE, short)
        assert info.value.errno == errno.EFAULT
        with pytest.raises(LiveUpdateError) as info:
            KernelTransport().ioctl(fd, uapi.LUOD_IOCTL_GET_STATE, bytearray(2))
        assert info.value.errno == errno.EFAULT
    finally:
        os.close(fd)


def test_the_kernel_transport_names_a_missing_device(tmp_path: Path) -> None:
    with pytest.raises(liveupdate.NotFoundError) as info:
        KernelTransport().open(str(tmp_path / "liveupdate"))
    assert info.value.errno == errno.ENOENT


def test_an_ioctl_buffer_must_be_writable(luod: Luod) -> None:
    with luod.open() as dev:
        arg = bytes(uapi.luod_get_state(size=ctypes.sizeof(uapi.luod_get_state)))
        with pytest.raises(TypeError, match="writable"):
            SocketTransport().ioctl(dev.fileno(), uapi.LUOD_IOCTL_GET_STATE, arg)  # type: ignore[arg-type]
