"""Each handler in process: what it takes, freeze/describe_data round trips, restore checks.

No daemon here: the handlers are called directly on real fds, as luod would
call them, to pin down their data formats and their refusals.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from handlerlib import timerfd

from liveupdate.core.file import FileHandler, PreservedFile, file_key
from liveupdate.core.handlers import default_registry, describe_data
from liveupdate.core.handlers.socket import borrowed, format_address

REGISTRY = default_registry(plugins=False)


@dataclass
class Opened:
    """Fds a case opened; the first is the one under test."""

    fds: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    keep: list[Any] = field(default_factory=list)

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def sock(self, sock: socket.socket) -> int:
        self.keep.append(sock)
        return sock.fileno()

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        for obj in self.keep:
            obj.close()
        for proc in self.procs:
            proc.kill()
            proc.wait()


@pytest.fixture
def opened() -> Iterator[Opened]:
    o = Opened()
    yield o
    o.close()


def _preserved(fd: int) -> PreservedFile:
    st = os.fstat(fd)
    handler = REGISTRY.find(fd, st)
    file = PreservedFile(1, handler, fd, file_key(fd, st))
    handler.preserve(file)
    return file


def _round_trip(fd: int) -> tuple[FileHandler, dict[str, Any], PreservedFile]:
    """preserve, freeze, restore on the same fd; the decoded data."""
    file = _preserved(fd)
    file.data = file.handler.freeze(file)
    file.handler.restore(file)
    decoded = describe_data(file.handler.compatible, file.data, REGISTRY)
    assert decoded is not None and "error" not in decoded, decoded
    # describe() of a file whose fd is gone falls back to the data.
    offline = PreservedFile(1, file.handler, -1, file.key, file.data)
    assert offline.handler.describe(offline)["type"] == decoded["type"]
    return file.handler, decoded, file


# -- cases: (name, maker) where maker(opened, tmp_path) -> (fd, compatible, expected) ---------

Case = Callable[[Opened, Path], tuple[int, str, dict[str, Any]]]


def _tcp_listener(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    return (
        o.sock(s),
        "socket-v1",
        {"socket": "tcp", "listening": True, "address": f"127.0.0.1:{port}"},
    )


def _tcp6_connected(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    try:
        listener = socket.socket(socket.AF_INET6)
        o.keep.append(listener)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    o.keep.append(client)
    lport, cport = listener.getsockname()[1], client.getsockname()[1]
    expected = {
        "socket": "tcp6",
        "family": "inet6",
        "listening": False,
        "address": f"[::1]:{cport}",
        "peer": f"[::1]:{lport}",
    }
    return client.fileno(), "socket-v1", expected


def _udp(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return o.sock(s), "socket-v1", {"socket": "udp", "socktype": "dgram", "protocol": 17}


def _pair_made_elsewhere(kind: int) -> tuple[socket.socket, socket.socket]:
    """A socketpair created by a child process.

    The handler refuses a Unix socket whose peer is the process asking (for
    luod: its own device and session fds); a pair made here would be one.
    """
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    pid = os.fork()
    if pid == 0:
        try:
            a, b = socket.socketpair(socket.AF_UNIX, kind)
            socket.send_fds(child, [b"p"], [a.fileno(), b.fileno()])
        finally:
            os._exit(0)
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(parent, 1, 2)
    finally:
        os.waitpid(pid, 0)
        parent.close()
        child.close()
    return socket.socket(fileno=fds[0]), socket.socket(fileno=fds[1])


def _unix_seqpacket(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    a, b = _pair_made_elsewhere(socket.SOCK_SEQPACKET)
    o.keep.append(b)
    return o.sock(a), "socket-v1", {"socket": "unix-seqpacket", "address": "", "peer": ""}


def _unix_abstract(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0luo\0unit " + os.urandom(4).hex().encode())
    name = s.getsockname()
    return o.sock(s), "socket-v1", {"address": "@" + name[1:].decode().replace("\0", "\\x00")}


def _unix_path(o: Opened, tmp: Path) -> tuple[int, str, dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp / "s"))
    s.listen()
    return o.sock(s), "socket-v1", {"socket": "unix-stream", "address": str(tmp / "s")}


def _pipe_read(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    r, w = os.pipe()
    o.add(r)
    o.add(w)
    return r, "pipe-v1", {"type": "pipe", "end": "read", "size": 0}


def _pipe_write(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    r, w = os.pipe()
    o.add(r)
    o.add(w)
    os.write(w, b"12345")
    return (
        w,
        "pipe-v1",
        {"type": "pipe", "end": "write", "size": 5, "path": f"pipe:[{os.fstat(w).st_ino}]"},
    )


def _fifo(o: Opened, tmp: Path) -> tuple[int, str, dict[str, Any]]:
    os.mkfifo(tmp / "f")
    fd = o.add(os.open(tmp / "f", os.O_RDWR))
    return fd, "pipe-v1", {"type": "fifo", "end": "read-write", "path": str(tmp / "f")}


def _eventfd(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    fd = o.add(os.eventfd(7, os.EFD_SEMAPHORE | os.EFD_NONBLOCK))
    return fd, "eventfd-v1", {"type": "eventfd", "count": 7, "semaphore": True, "nonblock": True}


def _file(o: Opened, tmp: Path) -> tuple[int, str, dict[str, Any]]:
    (tmp / "f.txt").write_bytes(b"abcdef")
    fd = o.add(os.open(tmp / "f.txt", os.O_RDONLY | os.O_APPEND))
    os.lseek(fd, 3, os.SEEK_SET)
    expected = {"type": "file", "path": str(tmp / "f.txt"), "position": 3}
    return fd, "file-v1", expected


def _directory(o: Opened, tmp: Path) -> tuple[int, str, dict[str, Any]]:
    fd = o.add(os.open(tmp, os.O_RDONLY | os.O_DIRECTORY))
    return fd, "file-v1", {"type": "directory", "path": str(tmp)}


def _pty(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    master, slave = os.openpty()
    o.add(master)
    o.add(slave)
    return master, "pty-v1", {"type": "pty", "path": os.ttyname(slave)}


def _pidfd(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    proc = subprocess.Popen(["sleep", "30"])
    o.procs.append(proc)
    return o.add(os.pidfd_open(proc.pid)), "pidfd-v1", {"type": "pidfd", "pid": proc.pid}


def _memfd(o: Opened, _: Path) -> tuple[int, str, dict[str, Any]]:
    fd = o.add(os.memfd_create("unit"))
    os.write(fd, b"xyz")
    return fd, "memfd-v1", {"type": "memfd", "size": 3, "position": 3}


CASES: dict[str, Case] = {
    "tcp-listener": _tcp_listener,
    "tcp6-connected": _tcp6_connected,
    "udp": _udp,
    "unix-seqpacket-pair": _unix_seqpacket,
    "unix-abstract": _unix_abstract,
    "unix-path": _unix_path,
    "pipe-read-end": _pipe_read,
    "pipe-write-end": _pipe_write,
    "fifo-rdwr": _fifo,
    "eventfd": _eventfd,
    "file": _file,
    "directory": _directory,
    "pty-master": _pty,
    "pidfd": _pidfd,
    "memfd": _memfd,
}


@pytest.mark.parametrize("case", CASES)
def test_freeze_then_describe_data_round_trip(case: str, opened: Opened, tmp_path: Path) -> None:
    fd, compatible, expected = CASES[case](opened, tmp_path)
    handler, decoded, file = _round_trip(fd)
    assert handler.compatible == compatible
    assert {k: decoded.get(k) for k in expected} == expected
    if compatible != "memfd-v1":
        assert decoded["version"] == 1
        # Malformed data is a ValueError for inspection, EINVAL for a restore.
        for bad in (b"", file.data[:-1], bytes([2]) + file.data[1:], file.data + b"\0"):
            with pytest.raises(ValueError):
                handler.describe_data(bad)  # type: ignore[attr-defined]
            assert "error" in (describe_data(compatible, bad, REGISTRY) or {})
            with pytest.raises(OSError) as info:
                handler.restore(PreservedFile(1, handler, fd, file.key, bad))
            assert info.value.errno == errno.EINVAL
    # A live description agrees with the frozen one on what does not move.
    live = handler.describe(file)
    assert live["type"] == decoded["type"]


@pytest.mark.parametrize("case", [c for c in CASES if c != "memfd"])
def test_restore_refuses_another_file(case: str, opened: Opened, tmp_path: Path) -> None:
    fd, _, _ = CASES[case](opened, tmp_path)
    file = _preserved(fd)
    file.data = file.handler.freeze(file)
    # The data of this file against an fd of another kind, or another of the same kind.
    others = [opened.add(os.open("/dev/null", os.O_RDONLY)), opened.add(os.memfd_create("o"))]
    for other in others:
        with pytest.raises(OSError) as info:
            file.handler.restore(PreservedFile(1, file.handler, other, file.key, file.data))
        assert info.value.errno == errno.EINVAL


def test_restore_refuses_a_sibling_of_the_same_kind(opened: Opened) -> None:
    # Same kind, other object: sockets, pipes, eventfds and PTYs are told apart.
    def first(fds: tuple[int, int]) -> int:
        opened.add(fds[1])
        return opened.add(fds[0])

    pairs = [
        (opened.sock(socket.socket()), opened.sock(socket.socket())),
        (first(os.pipe()), first(os.pipe())),
        (opened.add(os.eventfd(0)), opened.add(os.eventfd(0))),
        (first(os.openpty()), first(os.openpty())),
    ]
    r, w = os.pipe()
    opened.add(r)
    opened.add(w)
    pairs.append((r, w))  # the other end of the same pipe
    for fd, sibling in pairs:
        file = _preserved(fd)
        file.data = file.handler.freeze(file)
        with pytest.raises(OSError):
            file.handler.restore(PreservedFile(1, file.handler, sibling, file.key, file.data))


def test_registry_order_and_refusals(opened: Opened) -> None:
    assert REGISTRY.compatibles == [
        "memfd-v1",
        "socket-v1",
        "pipe-v1",
        "eventfd-v1",
        "file-v1",
        "pty-v1",
        "pidfd-v1",
    ]
    refused = {
        "/dev/null": opened.add(os.open("/dev/null", os.O_RDWR)),
        "pty slave": opened.add(os.openpty()[1]),  # its master is closed: a hung-up slave
        "timerfd": opened.add(timerfd(10**9)),
        "netlink": opened.sock(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
        "O_PATH file": opened.add(os.open("/etc/passwd", os.O_PATH)),
        "O_PATH dir": opened.add(os.open("/etc", os.O_PATH)),
    }
    for what, fd in refused.items():
        with pytest.raises(OSError) as info:
            REGISTRY.find(fd, os.fstat(fd))
        assert info.value.errno == errno.ENOENT, what


def test_eventfd_counter_is_never_consumed(opened: Opened) -> None:
    fd = opened.add(os.eventfd(3, os.EFD_NONBLOCK))
    file = _preserved(fd)
    for _ in range(3):
        file.handler.freeze(file)
        file.handler.describe(file)
    assert os.eventfd_read(fd) == 3


def test_pipe_bytes_are_never_consumed(opened: Opened) -> None:
    r, w = os.pipe()
    opened.add(r)
    opened.add(w)
    os.write(w, b"keep me")
    file = _preserved(r)
    data = file.handler.freeze(file)
    assert file.handler.describe_data(data)["size"] == 7  # type: ignore[attr-defined]
    assert os.read(r, 100) == b"keep me"


def test_socket_inspection_never_closes_the_fd(opened: Opened) -> None:
    r = opened.add(os.pipe()[0])
    with pytest.raises(OSError) as info, borrowed(r):
        pass
    assert info.value.errno == errno.ENOTSOCK
    os.fstat(r)  # still open
    s = socket.socket()
    fd = opened.sock(s)
    with borrowed(fd) as view:
        assert view.fileno() == fd
    os.fstat(fd)


def test_socket_address_formats() -> None:
    v6 = struct.pack("<HII", 80, 0, 3) + socket.inet_pton(socket.AF_INET6, "fe80::1")
    assert format_address(socket.AF_INET6, v6) == "[fe80::1%3]:80"
    assert format_address(socket.AF_UNIX, b"\0a\0b") == "@a\\x00b"
    assert format_address(socket.AF_UNIX, b"") == ""
    assert format_address(socket.AF_UNIX, b"/run/x.sock") == "/run/x.sock"


def test_describe_data_for_unknown_handlers() -> None:
    assert describe_data("nope-v1", b"", REGISTRY) is None


def test_handlers_leave_no_fd_behind(opened: Opened, tmp_path: Path) -> None:
    fds = [
        CASES[case](opened, tmp_path)[0] for case in ("tcp-listener", "pipe-read-end", "pty-master")
    ]
    fds += [opened.add(os.open("/dev/null", os.O_RDONLY)), opened.add(timerfd(10**9))]
    before = sorted(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for fd in fds:
            st = os.fstat(fd)
            for handler in REGISTRY:
                handler.can_preserve(fd, st)
            try:
                file = _preserved(fd)
            except OSError:
                continue
            file.data = file.handler.freeze(file)
            file.handler.restore(file)
            file.handler.describe(file)
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_socket_inspection_keeps_the_blocking_mode(opened: Opened) -> None:
    fd = opened.sock(socket.socket())
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)  # makes every new socket object non-blocking
    try:
        REGISTRY.find(fd, os.fstat(fd))
        with borrowed(fd):
            assert os.get_blocking(fd)
    finally:
        socket.setdefaulttimeout(previous)
    assert os.get_blocking(fd)
