"""Helpers shared by the conformance tests (sections A and B of conformance.md).

The decision the tests branch on, :func:`kernel_device` (is
``LIVEUPDATE_TEST_DEVICE`` set?), comes from ``tests/luodtest.py``. This
module holds the helpers that keep every test runnable unchanged against a
real ``/dev/liveupdate``:

* unique session names (kernel state lives as long as the boot, across tests);
* an fd tracker so every memfd/pipe a test opens is closed exactly once;
* raw-struct builders for ``Device.ioctl``/``Session.ioctl``;
* a raw ``SOCK_SEQPACKET`` client for the wire-only scenarios (luod only).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from liveupdate import uapi, wire
from luodtest import errno_of as errno_of  # the conformance tests' import
from luodtest import kernel_device, linux_exact_luod
from luodtest import read_all as read_all  # the conformance tests' import

NAME_MAX = uapi.LIVEUPDATE_SESSION_NAME_LENGTH - 1  # 63 bytes, NUL excluded


def on_kernel() -> bool:
    """Whether the library-level tests expect Linux's answers: they run against
    a kernel, or against ``luod --compat=linux`` (``LIVEUPDATE_TEST_COMPAT``)."""
    return kernel_device() is not None or linux_exact_luod()


def luod_xfail(reason: str) -> pytest.MarkDecorator:
    """A strict xfail that applies only against luod (the kernel behaves as the spec says)."""
    return pytest.mark.xfail(not on_kernel(), strict=True, reason=reason)


# -- errors -------------------------------------------------------------------


def ename(err: int) -> str:
    return "0" if err == 0 else errno.errorcode.get(err, str(err))


def assert_errno(fn: Callable[[], Any], expected: int) -> None:
    got = errno_of(fn)
    assert got == expected, f"expected {ename(expected)}, got {ename(got)}"


# -- fds ----------------------------------------------------------------------


@dataclass
class Fds:
    """Every fd a test opens, closed exactly once at teardown (never twice)."""

    open_fds: set[int] = field(default_factory=set)

    def add(self, fd: int) -> int:
        self.open_fds.add(fd)
        return fd

    def memfd(self, data: bytes = b"", name: str = "conformance") -> int:
        """A memfd holding ``data``, file position back at 0.

        Data goes in *before* the file is preserved: Linux locks the size of a
        preserved memfd (EPERM on growth) until it is retrieved.
        """
        fd = self.add(os.memfd_create(name, os.MFD_CLOEXEC))
        if data:
            os.write(fd, data)
            os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        return self.add(r), self.add(w)

    def open(self, path: str, flags: int) -> int:
        return self.add(os.open(path, flags | os.O_CLOEXEC))

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)
        os.close(fd)

    def close_all(self) -> None:
        while self.open_fds:
            os.close(self.open_fds.pop())


# -- session names ------------------------------------------------------------


def session_name(prefix: str, suffix: str = "", width: int = 48) -> str:
    """A name unique to this test run: the kernel keeps sessions for the whole boot.

    At most ``width`` bytes (48 by default, leaving room to pad it to 63).
    """
    tail = f".{os.getpid():x}" + (f"-{suffix}" if suffix else "")
    return prefix[: max(0, width - len(tail))] + tail


def name63(name: str) -> str:
    """``name`` padded to the longest valid name, 63 bytes."""
    return (name + "-").ljust(NAME_MAX, "6")[:NAME_MAX]


# -- raw structs --------------------------------------------------------------


def struct_buffer(
    info: uapi.IoctlInfo,
    size: int | None = None,
    length: int | None = None,
    **fields: Any,
) -> bytearray:
    """The bytes of ``info.struct`` with ``fields`` set, ``size`` declared and
    ``length`` bytes in all (zero-padded beyond the struct)."""
    obj = info.struct()
    for key, value in fields.items():
        if key == "name":
            raw = uapi.encode_name(value)
            ctypes.memmove(obj.name, raw, len(raw))
        else:
            setattr(obj, key, value)
    obj.size = info.sizeof if size is None else size
    raw = bytes(obj)
    total = max(len(raw), obj.size) if length is None else length
    buf = bytearray(total)
    n = min(len(raw), total)
    buf[:n] = raw[:n]
    return buf


def fd_field(buf: bytearray) -> int:
    return int.from_bytes(buf[4:8], "little", signed=True)


# -- raw wire client (luod only) ----------------------------------------------


class RawConn:
    """A device or session connection spoken to byte by byte (wire protocol v1)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(10)

    @classmethod
    def open_device(cls, path: str) -> RawConn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.connect(path)
        conn = cls(sock)
        status = wire.decode_hello(sock.recv(64))
        assert status == 0, f"device open answered {status}"
        return conn

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        wire.send_message(self.sock, data, fds)

    def reply(self) -> tuple[int, bytes, list[int]]:
        """The next reply: ``(ret, out, fds)``; the caller owns the fds."""
        msg = wire.recv_message(self.sock, 1 << 17)
        assert msg.length > 0, "connection closed by luod"
        assert not msg.truncated and not msg.fds_truncated
        ret, out = wire.decode_reply(msg.data)
        return ret, out, msg.fds

    def call(self, cmd: int, arg: bytes | bytearray, fds: Sequence[int] = ()) -> tuple[int, bytes]:
        """One request, one reply; an fd in the reply is closed (see :meth:`call_fd`)."""
        self.send(wire.encode_request(cmd, arg), fds)
        ret, out, got = self.reply()
        wire.close_fds(got)
        return ret, out

    def raw(self, data: bytes, fds: Sequence[int] = ()) -> int:
        """Send arbitrary bytes as one message; return the reply's ``ret``."""
        self.send(data, fds)
        ret, _out, got = self.reply()
        wire.close_fds(got)
        return ret

    def create_session(self, name: str) -> RawConn:
        arg = struct_buffer(uapi.CREATE_SESSION, name=name)
        self.send(wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, arg))
        ret, out, fds = self.reply()
        assert ret == 0 and len(fds) == 1, (ret, fds)
        assert fd_field(bytearray(out)) == wire.FD_PLACEHOLDER
        return RawConn(socket.socket(fileno=fds[0]))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def daemon_fds(pid: int) -> dict[int, str]:
    """``/proc/PID/fd``: fd number -> link target, for fds still open while listed."""
    out: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for entry in os.listdir(base):
        try:
            out[int(entry)] = os.readlink(f"{base}/{entry}")
        except FileNotFoundError:
            pass
    return out


# -- another process ------------------------------------------------------------


class Peer:
    """A second process holding (or not) the device, through the library."""

    def __init__(self, device: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parent / "_peer.py"), device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            close_fds=True,
        )

    def _ask(self, cmd: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"peer died (rc={self.proc.poll()})"
        return int(line)

    def open(self) -> int:
        """``open_device(timeout=0)`` in the peer: 0 or its errno."""
        return self._ask("open")

    def close(self) -> int:
        return self._ask("close")

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                stream.close()
