"""What the ghost-hold census can and cannot see, with real processes and namespaces.

:func:`~liveupdate.server.census.take_census` walks ``/proc`` for the
processes holding each socket. A holder it misses would make luod take a live
client's connection for a ghost and break it, so the census must either see
every holder or say why it cannot (``blind``/``unseen``, which makes
:mod:`liveupdate.server.holds` never break anything).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from liveupdate.server.census import take_census

pytestmark = pytest.mark.luod_only

UNSHARE = shutil.which("unshare")
needs_pid_namespaces = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare (util-linux)"
)

#: A process whose second thread gives itself its own fd table
#: (``unshare(CLONE_FILES)``) and only then opens a socket: the socket is in
#: no table but that thread's.
THREAD_WITH_ITS_OWN_TABLE = textwrap.dedent(
    """
    import ctypes, os, socket, sys, threading
    CLONE_FILES = 0x400
    libc = ctypes.CDLL(None, use_errno=True)
    done = threading.Event()

    def hold():
        if libc.unshare(CLONE_FILES) != 0:
            print("unshare failed", ctypes.get_errno(), flush=True)
            return
        a, b = socket.socketpair()
        print(os.fstat(a.fileno()).st_ino, flush=True)
        done.wait()

    t = threading.Thread(target=hold)
    t.start()
    sys.stdin.read()
    done.set()
    t.join()
    """
)


def test_a_socket_only_a_threads_own_fd_table_holds_is_found() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", THREAD_WITH_ITS_OWN_TABLE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.isdigit(), line
        inode = int(line)
        # Not in the process's own table: only the thread's.
        own = {os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")}
        assert f"socket:[{inode}]" not in own

        census = take_census()

        assert census.blind == ""
        assert proc.pid in census.holders.get(inode, frozenset())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def test_a_proc_that_cannot_be_listed_makes_the_census_blind() -> None:
    census = take_census("/nonexistent-proc")
    assert census.blind.startswith("cannot list /nonexistent-proc: ")
    assert census.holders == {}


CENSUS_REPORT = "from liveupdate.server.census import take_census; print(repr(take_census().blind))"


@needs_pid_namespaces
def test_a_census_in_a_pid_namespace_without_its_own_proc_is_blind() -> None:
    assert UNSHARE is not None
    result = subprocess.run(
        [UNSHARE, "--pid", "--fork", sys.executable, "-c", CENSUS_REPORT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == repr("/proc is not mounted for luod's pid namespace")


@needs_pid_namespaces
def test_a_census_in_a_child_pid_namespace_with_its_own_proc_says_it_is_partial() -> None:
    """A luod in a container once took its census as complete (NSpid there lists one
    pid), so a device connection held from outside looked held by no process and
    was broken as a ghost: the client's next call failed with ENODEV."""
    assert UNSHARE is not None
    result = subprocess.run(
        [UNSHARE, "--pid", "--fork", "--mount-proc", sys.executable, "-c", CENSUS_REPORT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() != repr(""), "the census claims to see every process"
