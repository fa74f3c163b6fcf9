"""luod out of fds: it keeps serving what it can and does not busy-loop.

Runs against a real luod whose RLIMIT_NOFILE is lowered with ``prlimit``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

import liveupdate
from luodtest import Luod, events, memfd, sessions, wait_for

pytestmark = pytest.mark.luod_only


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid``, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_accept_failing_for_lack_of_fds_does_not_spin(luod: Luod) -> None:
    """Connections waiting in the backlog while luod has no fd left cost no CPU.

    Broke once (review finding M2): accept() failing for lack of fds made
    luod spin.
    """
    subprocess.run(["prlimit", "--pid", str(luod.pid), "--nofile=40:40"], check=True)
    with luod.open() as dev:
        session = dev.create_session("out-of-fds")
    preserved = 0
    with pytest.raises(liveupdate.LiveUpdateError):
        for token in range(100):
            fd = memfd()
            try:
                session.preserve(fd, token)
            finally:
                os.close(fd)
            preserved += 1
    assert 10 < preserved < 40

    # More connection attempts than luod has fds: they wait in the backlog.
    waiting = []
    for _ in range(5):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.connect(luod.socket)
        waiting.append(sock)
    time.sleep(0.2)
    before = cpu_ticks(luod.pid)
    time.sleep(2.0)
    used = cpu_ticks(luod.pid) - before
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    assert used < ticks_per_second // 2, f"luod used {used} ticks in 2 s while out of fds"
    assert len(events(luod, "accept-failed")) <= 3
    for sock in waiting:
        sock.close()

    session.unpreserve(0)  # one fd free again
    with luod.open(timeout=5.0) as dev:
        assert dev.get_state().preserved_files == preserved - 1
    session.close()
    wait_for(lambda: sessions(luod) == [], "the session to be released")
    assert luod.alive()
