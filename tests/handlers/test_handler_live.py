"""Every built-in handler, end to end: a live object survives a real ``luoctl reboot``.

Each test hands live kernel objects to a real luod (closing its own copies
where that proves luod's reference is what keeps them alive), live-updates
the daemon with ``luoctl reboot`` (the same process re-executes with the fds
inherited), retrieves the objects and shows they still work: bytes queued
before the reboot are still there, listeners accept, the PTY still reaches
its process, the pidfd still names its child. Each also checks what the
handler recorded in the handover image (decoded with ``describe_data``).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import tty
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from handlerlib import LiveSession, read_exactly, recv_exactly, timerfd, wait_readable

import liveupdate

pytestmark = pytest.mark.luod_only


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- sockets ---------------------------------------------------------------------------------


def test_tcp_listening_sockets_accept_after_reboot(live: LiveSession) -> None:
    families = [(socket.AF_INET, "127.0.0.1", "{}:{}")]
    if _ipv6_loopback():
        families.append((socket.AF_INET6, "::1", "[{}]:{}"))
    endpoints: dict[int, tuple[tuple[str, int], socket.socket, str]] = {}
    for i, (family, host, fmt) in enumerate(families):
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(8)
        address = listener.getsockname()[:2]
        # A connection made before the reboot waits in the backlog throughout.
        early = socket.create_connection(address, timeout=10)
        early.sendall(b"early")
        live.preserve(listener, 0x10 + i)
        endpoints[0x10 + i] = (address, early, fmt.format(*address))

    live.reboot()

    for token, (address, early, text) in endpoints.items():
        listener = live.retrieve_socket(token)
        assert listener.getsockname()[:2] == address
        conn, _ = listener.accept()
        with conn, early:
            conn.settimeout(10)
            assert recv_exactly(conn, 5) == b"early"
            conn.sendall(b"ack")
            assert recv_exactly(early, 3) == b"ack"
        with socket.create_connection(address, timeout=10) as late:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                late.sendall(b"late")
                assert recv_exactly(conn, 4) == b"late"
        listener.close()
        compatible, data = live.handed_over()[token]
        assert compatible == "socket-v1"
        assert data is not None
        assert data["listening"] is True
        assert data["address"] == text
        assert "peer" not in data


def test_tcp_connected_pair_keeps_bytes_both_ways(live: LiveSession) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    # Sent before the reboot and not read until after it.
    client.sendall(b"to server, before")
    server.sendall(b"to client, before")
    live.preserve(server, 0x20)
    live.preserve(client, 0x21)

    live.reboot()

    server, client = live.retrieve_socket(0x20), live.retrieve_socket(0x21)
    with server, client:
        assert recv_exactly(server, 17) == b"to server, before"
        assert recv_exactly(client, 17) == b"to client, before"
        client.sendall(b"to server, after")
        server.sendall(b"to client, after")
        assert recv_exactly(server, 16) == b"to server, after"
        assert recv_exactly(client, 16) == b"to client, after"
    records = live.handed_over()
    (_, srv), (_, cli) = records[0x20], records[0x21]
    assert srv is not None and cli is not None
    assert srv["socket"] == cli["socket"] == "tcp"
    assert srv["listening"] is cli["listening"] is False
    assert srv["peer"] == cli["address"] and cli["peer"] == srv["address"]


def test_udp_sockets_still_receive(live: LiveSession) -> None:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    address = receiver.getsockname()
    connected = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    connected.connect(address)
    connected.send(b"queued before")
    live.preserve(receiver, 0x30)
    live.preserve(connected, 0x31)

    live.reboot()

    receiver, connected = live.retrieve_socket(0x30), live.retrieve_socket(0x31)
    with receiver, connected, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        assert receiver.recv(100) == b"queued before"
        other.sendto(b"sent after", address)
        assert receiver.recv(100) == b"sent after"
        # The connected one still has its peer.
        connected.send(b"from the connected one")
        data, sender = receiver.recvfrom(100)
        assert data == b"from the connected one"
        assert sender == connected.getsockname()
    records = live.handed_over()
    (_, rx), (_, tx) = records[0x30], records[0x31]
    assert rx is not None and tx is not None
    assert rx["socket"] == "udp" and rx["address"] == f"127.0.0.1:{address[1]}"
    assert "peer" not in rx and tx["peer"] == rx["address"]


def test_unix_sockets_still_talk(live: LiveSession, tmp_path: Path) -> None:
    kinds = {
        socket.SOCK_STREAM: "unix-stream",
        socket.SOCK_DGRAM: "unix-dgram",
        socket.SOCK_SEQPACKET: "unix-seqpacket",
    }
    for i, kind in enumerate(kinds):
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        a.send(f"before {i}".encode())
        live.preserve(a, 0x40 + 2 * i)
        live.preserve(b, 0x41 + 2 * i)
    # A listener with an abstract name and a datagram socket bound to a path.
    abstract = f"\0luod-handler-test-{uuid.uuid4().hex}".encode()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(abstract)
    listener.listen(4)
    live.preserve(listener, 0x4E)
    path = str(tmp_path / "dgram.sock")
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    bound.bind(path)
    live.preserve(bound, 0x4F)

    live.reboot()

    for i, kind in enumerate(kinds):
        a, b = live.retrieve_socket(0x40 + 2 * i), live.retrieve_socket(0x41 + 2 * i)
        with a, b:
            expected = f"before {i}".encode()
            got = recv_exactly(b, len(expected)) if kind == socket.SOCK_STREAM else b.recv(100)
            assert got == expected
            b.send(b"after")
            assert (recv_exactly(a, 5) if kind == socket.SOCK_STREAM else a.recv(100)) == b"after"
    listener = live.retrieve_socket(0x4E)
    with listener, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(abstract)
        conn, _ = listener.accept()
        with conn:
            client.sendall(b"hi")
            conn.settimeout(10)
            assert recv_exactly(conn, 2) == b"hi"
    bound = live.retrieve_socket(0x4F)
    with bound, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"to the path", path)
        assert bound.recv(100) == b"to the path"

    records = live.handed_over()
    for i, name in enumerate(kinds.values()):
        _, data = records[0x40 + 2 * i]
        assert data is not None
        assert data["socket"] == name and data["address"] == "" and data["peer"] == ""
    _, data = records[0x4E]
    assert data is not None and data["listening"] is True
    assert data["address"] == "@" + abstract[1:].decode()
    _, data = records[0x4F]
    assert data is not None and data["address"] == path and "peer" not in data


# -- pipes and FIFOs ---------------------------------------------------------------------


def test_pipe_delivers_bytes_written_before(live: LiveSession) -> None:
    r, w = os.pipe()
    os.write(w, b"written before the reboot")
    ino = os.fstat(r).st_ino
    live.preserve(r, 0x50)
    live.preserve(w, 0x51)

    live.reboot()

    r, w = live.retrieve(0x50), live.retrieve(0x51)
    assert read_exactly(r, 25) == b"written before the reboot"
    os.write(w, b"after")
    assert read_exactly(r, 5) == b"after"
    records = live.handed_over()
    assert records[0x50] == (
        "pipe-v1",
        {
            "version": 1,
            "type": "pipe",
            "end": "read",
            "path": f"pipe:[{ino}]",
            "size": 25,
            "capacity": records[0x50][1]["capacity"],  # type: ignore[index]
            "inode": ino,
        },
    )
    write_end = records[0x51][1]
    assert write_end is not None and write_end["end"] == "write" and write_end["size"] == 25


def test_fifo_delivers_bytes_written_before(live: LiveSession, tmp_path: Path) -> None:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    os.write(w, b"fifo before")
    live.preserve(r, 0x60)
    live.preserve(w, 0x61)

    live.reboot()

    r = live.retrieve(0x60)
    assert read_exactly(r, 11) == b"fifo before"
    # The name still leads to the same pipe: luod holds its read end open.
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(writer, b"through the name")
    finally:
        os.close(writer)
    assert read_exactly(r, 16) == b"through the name"
    os.write(live.retrieve(0x61), b"!")
    assert read_exactly(r, 1) == b"!"
    _, data = live.handed_over()[0x60]
    assert data is not None
    assert data["type"] == "fifo" and data["path"] == str(path) and data["size"] == 11


# -- eventfd ---------------------------------------------------------------------------


def test_eventfd_keeps_its_count(live: LiveSession) -> None:
    efd = os.eventfd(0)
    try:
        os.eventfd_write(efd, 5)
        live.preserve(efd, 0x70, close=False)

        live.reboot()

        retrieved = live.retrieve(0x70)
        assert os.eventfd_read(retrieved) == 5
        # The very same eventfd as the one this process kept.
        os.eventfd_write(efd, 2)
        assert os.eventfd_read(retrieved) == 2
    finally:
        os.close(efd)
    _, data = live.handed_over()[0x70]
    assert data is not None and data["type"] == "eventfd" and data["count"] == 5


# -- files and directories ----------------------------------------------------------------


def test_file_keeps_its_position_and_a_directory_still_lists(
    live: LiveSession, tmp_path: Path
) -> None:
    path = tmp_path / "data.txt"
    path.write_bytes(b"0123456789")
    fd = os.open(path, os.O_RDWR)
    os.lseek(fd, 4, os.SEEK_SET)
    live.preserve(fd, 0x80)
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "a").touch()
    (directory / "b").touch()
    live.preserve(os.open(directory, os.O_RDONLY | os.O_DIRECTORY), 0x81)

    live.reboot()

    fd = live.retrieve(0x80)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 4
    assert os.read(fd, 3) == b"456"
    os.write(fd, b"X")
    assert path.read_bytes() == b"0123456X89"
    dfd = live.retrieve(0x81)
    assert stat.S_ISDIR(os.fstat(dfd).st_mode)
    assert sorted(os.listdir(dfd)) == ["a", "b"]
    records = live.handed_over()
    _, data = records[0x80]
    assert data is not None
    assert data["type"] == "file" and data["path"] == str(path) and data["position"] == 4
    assert data["flags"] & os.O_ACCMODE == os.O_RDWR
    _, data = records[0x81]
    assert data is not None and data["type"] == "directory" and data["path"] == str(directory)


# -- PTY masters -------------------------------------------------------------------------

_UPPERCASE_ECHO = """
import os
while True:
    data = os.read(0, 1024)
    if not data:
        break
    os.write(1, data.upper())
"""


def test_pty_master_still_talks_to_its_process(
    live: LiveSession, children: list[subprocess.Popen[bytes]]
) -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    pts = os.ttyname(slave)
    children.append(
        subprocess.Popen(
            [sys.executable, "-c", _UPPERCASE_ECHO],
            stdin=slave,
            stdout=slave,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    )
    os.close(slave)
    os.write(master, b"before\n")
    assert read_exactly(master, 7) == b"BEFORE\n"
    # The answer to this one is read only after the reboot.
    os.write(master, b"pending\n")
    live.preserve(master, 0x90)

    live.reboot()

    master = live.retrieve(0x90)
    assert read_exactly(master, 8) == b"PENDING\n"
    os.write(master, b"after\n")
    assert read_exactly(master, 6) == b"AFTER\n"
    assert children[0].poll() is None
    _, data = live.handed_over()[0x90]
    assert data is not None and data["type"] == "pty" and data["path"] == pts


# -- pidfds -----------------------------------------------------------------------------------


def test_pidfd_still_refers_to_the_child(
    live: LiveSession, children: list[subprocess.Popen[bytes]]
) -> None:
    child = subprocess.Popen(["sleep", "60"])
    children.append(child)
    live.preserve(os.pidfd_open(child.pid), 0xA0)

    live.reboot()

    pidfd = live.retrieve(0xA0)
    assert select.select([pidfd], [], [], 0)[0] == []  # still running
    signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    wait_readable(pidfd)  # a pidfd polls readable once its process exits
    result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    assert result is not None
    assert result.si_pid == child.pid
    assert result.si_code == os.CLD_KILLED and result.si_status == signal.SIGTERM
    child.returncode = -signal.SIGTERM  # reaped through the pidfd
    _, data = live.handed_over()[0xA0]
    assert data is not None and data["type"] == "pidfd" and data["pid"] == child.pid


# -- what no handler takes ------------------------------------------------------------------


def test_files_without_a_handler_are_not_found(live: LiveSession) -> None:
    fds: list[int] = []
    try:
        master, slave = os.openpty()
        fds += [master, slave]
        candidates = {
            "/dev/null": os.open("/dev/null", os.O_RDWR),
            "/dev/zero": os.open("/dev/zero", os.O_RDONLY),
            "timerfd (no plugin)": timerfd(10**9),
            "netlink socket": socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).detach(),
        }
        fds += candidates.values()
        candidates["pty slave"] = slave
        for what, fd in candidates.items():
            with pytest.raises(liveupdate.NotFoundError) as info:
                live.outgoing.preserve(fd, 0xDEAD)
            assert info.value.errno == errno.ENOENT, what
        # O_PATH is not even a usable fd (EBADF comes before the handlers).
        fds.append(os.open("/etc", os.O_PATH))
        with pytest.raises(liveupdate.BadFileError):
            live.outgoing.preserve(fds[-1], 0xDEAD)
        # Nothing was taken: the token is still free.
        live.outgoing.preserve(master, 0xDEAD)
    finally:
        for fd in fds:
            os.close(fd)


# -- "the same file" for objects that share an inode --------------------------------------

# Every eventfd shares one anonymous inode and every PTY master the ptmx
# inode: their handlers tell instances apart (FileHandler.file_key).


def test_two_eventfds_are_two_files(live: LiveSession) -> None:
    a, b = os.eventfd(1), os.eventfd(2)
    dup = os.dup(a)
    try:
        live.preserve(a, 1, close=False)
        live.preserve(b, 2, close=False)
        # ... while the same eventfd, through another fd, is still the same file.
        with pytest.raises(liveupdate.DeviceBusyError):
            live.preserve(dup, 3, close=False)
    finally:
        for fd in (a, b, dup):
            os.close(fd)


def test_two_pty_masters_are_two_files(live: LiveSession) -> None:
    fds: list[int] = []
    try:
        for token in (1, 2):
            master, slave = os.openpty()
            fds += [master, slave]
            live.preserve(master, token, close=False)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_preserved_object_is_busy_in_another_session(
    luod: Any, live_factory: Callable[..., LiveSession]
) -> None:
    one, two = live_factory(luod, "one"), live_factory(luod, "two")
    a, b = socket.socketpair()
    with a, b:
        one.preserve(a, 1, close=False)
        # "The same file" is the socket, whatever fd names it.
        dup = os.dup(a.fileno())
        try:
            with pytest.raises(liveupdate.DeviceBusyError):
                two.preserve(dup, 1, close=False)
        finally:
            os.close(dup)
        two.preserve(b, 1, close=False)
