"""Helpers of the stress tests: a raw wire client and polling for luod's fd count."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence

from liveupdate import uapi, wire
from luodtest import Luod, wait_until


def assert_fd_count_back(daemon: Luod, baseline: int, timeout: float = 10.0) -> None:
    """luod closes asynchronously: poll until it holds ``baseline`` fds again."""
    ok = wait_until(lambda: daemon.fd_count() == baseline, timeout)
    assert ok, f"luod holds {daemon.fd_count()} fds, {baseline} at the start:\n" + "\n".join(
        f"  {fd} -> {target}" for fd, target in sorted(daemon_fds(daemon.pid).items())
    )


def daemon_fds(pid: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(entry)] = os.readlink(f"/proc/{pid}/fd/{entry}")
        except FileNotFoundError:
            pass
    return out


def assert_still_serves(daemon: Luod, name: str) -> None:
    """The daemon is alive and does its job: open, create, preserve."""
    assert daemon.alive()
    with daemon.open(timeout=10) as dev, dev.create_session(name) as session:
        fd = os.memfd_create("still-serving", os.MFD_CLOEXEC)
        try:
            os.write(fd, b"ok")
            session.preserve(fd, 1)
            assert session.get_name() == name.encode()
        finally:
            os.close(fd)


def create_arg(name: str, size: int | None = None) -> bytes:
    arg = uapi.liveupdate_ioctl_create_session()
    arg.size = uapi.CREATE_SESSION.sizeof if size is None else size
    arg.fd = -1
    raw = name.encode()
    arg.name[: len(raw)] = raw  # type: ignore[index]
    return bytes(arg)


def preserve_arg(fd: int, token: int) -> bytes:
    return bytes(
        uapi.liveupdate_session_preserve_fd(size=uapi.PRESERVE_FD.sizeof, fd=fd, token=token)
    )


def get_name_arg() -> bytes:
    return bytes(uapi.liveupdate_session_get_name(size=uapi.GET_NAME.sizeof))


class Raw:
    """One device or session connection, spoken to message by message."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(10)

    @classmethod
    def device(cls, path: str, retry: float = 5.0) -> Raw:
        deadline = time.monotonic() + retry
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.connect(path)
            status = wire.decode_hello(sock.recv(64))
            if status == 0:
                return cls(sock)
            sock.close()
            assert status == -16 and time.monotonic() < deadline, f"hello status {status}"
            time.sleep(0.005)

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        wire.send_message(self.sock, data, fds)

    def reply(self) -> tuple[int, bytes, list[int]]:
        msg = wire.recv_message(self.sock, 1 << 17)
        assert msg.length > 0, "luod closed the connection"
        ret, out = wire.decode_reply(msg.data)
        return ret, out, msg.fds

    def call(self, cmd: int, arg: bytes, fds: Sequence[int] = ()) -> int:
        self.send(wire.encode_request(cmd, arg), fds)
        ret, _out, got = self.reply()
        wire.close_fds(got)
        return ret

    def ret_of(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """Send any bytes as one message; the reply's ret (exactly one reply)."""
        self.send(data, fds)
        ret, _out, got = self.reply()
        wire.close_fds(got)
        return ret

    def create_session(self, name: str) -> Raw:
        self.send(wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, create_arg(name)))
        ret, _out, fds = self.reply()
        assert ret == 0 and len(fds) == 1, (ret, fds)
        return Raw(socket.socket(fileno=fds[0]))

    def eof(self) -> bool:
        """Whether luod has closed its end (waits for it, up to the socket timeout)."""
        try:
            return wire.recv_message(self.sock, 64).length == 0
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
