"""The keeper never dies of its input, and never keeps what a bad message sent.

luod's keeper (``liveupdate.server.keeper``) holds a copy of every preserved
fd. Each malformed message, sent by a peer of its own euid on its socket,
makes it hang up on that connection and close the fds the message carried;
it goes on serving luod, whose sessions a restart still gets back.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
from collections.abc import Callable

import pytest

import liveupdate
from liveupdate.server import keeper
from luodtest import Luod, copies_settled, events, memfd

pytestmark = pytest.mark.luod_only

#: (what is sent, how many fds go with it): each must be refused whole.
BAD = [
    (b"not json", 1),
    (b"[1, 2]", 1),
    (json.dumps({"op": "nope"}).encode(), 1),
    (json.dumps({"op": "delta", "line": "a\nb"}).encode(), 0),
    (json.dumps({"op": "delta", "line": "x", "removes": 5}).encode(), 0),
    (json.dumps({"op": "add", "names": ["f-1-1-1"]}).encode(), 0),
    (json.dumps({"op": "add", "names": [1]}).encode(), 1),
    (json.dumps({"op": "add", "names": ["a", "b"]}).encode(), 1),
    (json.dumps({"op": "begin"}).encode(), 1),
    (json.dumps({"op": "commit"}).encode(), 0),
    (json.dumps({"op": "remove", "names": "f-1-1-1"}).encode(), 0),
    (json.dumps({"op": "fetch"}).encode(), 1),
    (json.dumps({"op": "stop"}).encode(), 1),
    (b"", 1),  # fds without a message
]


def keeper_pid(daemon: Luod) -> int:
    (started,) = [e for e in events(daemon, "copies") if e.get("keeper_pid")]
    return int(started["keeper_pid"])


def hung_up(sock: socket.socket) -> bool:
    ready, _, _ = select.select([sock], [], [], 10)
    return bool(ready) and sock.recv(1 << 16) == b""


def send_bad(daemon: Luod, message: bytes, nfds: int) -> None:
    """Send one malformed message with ``nfds`` copies of a pipe's write end;
    the keeper hangs up and keeps none of them."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.connect(str(daemon.state_dir / keeper.KEEPER_SOCKET))
        read_end, write_end = os.pipe()
        try:
            fds = [write_end] * nfds
            ancillary = (
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            )
            conn.sendmsg([message], ancillary)
            os.close(write_end)
            write_end = -1
            assert hung_up(conn), message
            # Every copy of the pipe's write end is closed: the keeper kept none.
            ready, _, _ = select.select([read_end], [], [], 10)
            assert ready and os.read(read_end, 1) == b"", message
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)


def test_bad_input_ends_its_connection_and_the_keeper_still_gives_every_session_back(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    pid = keeper_pid(daemon)
    with daemon.open() as dev:
        session = dev.create_session("kept")
        fd = memfd(b"survives the noise")
        session.preserve(fd, 7)
        os.close(fd)
        copies_settled(dev)
    for message, nfds in BAD:
        send_bad(daemon, message, nfds)
    os.kill(pid, 0)  # the keeper is still there
    daemon.stop(signal.SIGKILL)
    session.close()
    daemon.log = daemon.state_dir / "restarted.log"
    daemon.start()
    assert events(daemon, "recovered")
    with liveupdate.open_device(daemon.socket, timeout=5) as dev:
        back = dev.retrieve_session("kept")
        fd = back.retrieve(7)
        try:
            assert os.pread(fd, 64, 0) == b"survives the noise"
        finally:
            os.close(fd)
        back.finish()
        back.close()
