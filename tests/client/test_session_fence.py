"""``Session.fence()`` (LUOD_SESSION_SYNC): replies left by a dead sharer are discarded.

A supervisor shares its session fds with the service it runs. A service
killed between sending a request and reading luod's answer leaves that
answer on the shared socket; without a fence, the supervisor's next call
would read it as its own. Everything here is real: luod, the service
process that dies mid-request, and ``luoctl run``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import LUOCTL, Luod

pytestmark = pytest.mark.luod_only

#: A process that sends requests on the inherited session fd ARGV[1] and is
#: killed before it reads any answer: UPDATE with reserved=1 (EINVAL, changes
#: nothing) and GET_NAME, raw on the wire as the library would frame them.
DIES_MID_REQUEST = textwrap.dedent(
    """
    import ctypes, os, signal, socket, sys
    from liveupdate import uapi, wire

    sock = socket.socket(fileno=int(sys.argv[1]))
    update = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update), reserved=1)
    name = uapi.liveupdate_session_get_name(
        size=ctypes.sizeof(uapi.liveupdate_session_get_name)
    )
    for _ in range(int(sys.argv[2])):
        wire.send_message(sock, wire.encode_request(uapi.LUOD_SESSION_UPDATE, bytes(update)))
        wire.send_message(sock, wire.encode_request(uapi.LIVEUPDATE_SESSION_GET_NAME, bytes(name)))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _die_mid_request(session: liveupdate.Session, rounds: int) -> None:
    fd = session.fileno()
    proc = subprocess.run(
        [sys.executable, "-c", DIES_MID_REQUEST, str(fd), str(rounds)],
        pass_fds=[fd],
        check=False,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def test_a_stale_reply_is_what_the_next_call_reads_without_a_fence(luod: Luod) -> None:
    # The hazard the fence exists for: this must fail for the fence to matter.
    with luod.open() as dev:
        session = dev.create_session("no-fence")
    with session:
        _die_mid_request(session, 1)
        with pytest.raises(liveupdate.InvalidArgumentError):
            session.get_name()  # reads the dead process's UPDATE answer: EINVAL


def test_the_fence_discards_every_reply_a_killed_sharer_left(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("fenced")
    with session:
        _die_mid_request(session, 3)
        assert _readable(session.fileno(), 30.0), "luod never answered the dead process"
        assert session.fence() == 6
        assert not _readable(session.fileno(), 0.0)
        # Every call now reads its own answer.
        assert session.get_name() == b"fenced"
        assert session.set_flags(uapi.LUOD_SESSION_KEEP_ON_CLOSE) == 0
        assert session.set_flags(0) == uapi.LUOD_SESSION_KEEP_ON_CLOSE
        assert session.fence() == 0  # nothing stale: the fence is its own answer


def test_the_fence_closes_fds_carried_by_stale_replies(luod: Luod) -> None:
    # A RETRIEVE_FD answered to a dead process carries an fd: it must not leak here.
    with luod.open() as dev:
        out = dev.create_session("fds")
        mfd = os.memfd_create("fds")
        out.preserve(mfd, 1)
        os.close(mfd)
        out.update()
        incoming = dev.retrieve_session("fds")
    script = textwrap.dedent(
        """
        import ctypes, os, signal, socket, sys
        from liveupdate import uapi, wire

        sock = socket.socket(fileno=int(sys.argv[1]))
        arg = uapi.liveupdate_session_retrieve_fd(
            size=ctypes.sizeof(uapi.liveupdate_session_retrieve_fd), fd=-1, token=1
        )
        cmd = uapi.LIVEUPDATE_SESSION_RETRIEVE_FD
        wire.send_message(sock, wire.encode_request(cmd, bytes(arg)))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    with incoming:
        fd = incoming.fileno()
        subprocess.run([sys.executable, "-c", script, str(fd)], pass_fds=[fd], timeout=60)
        assert _readable(fd, 30.0)
        before = sorted(os.listdir("/proc/self/fd"))
        assert incoming.fence() == 1
        assert sorted(os.listdir("/proc/self/fd")) == before
        again = incoming.retrieve(1)  # a retrieve may be repeated: the file is still there
        os.close(again)


def test_the_fence_of_a_dead_session_fd_is_stale_generation(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("gone")
    copy = liveupdate.Session.from_fd(os.dup(session.fileno()))
    session.update()  # hands the session over: luod answers ENODEV on its old fd
    with copy, pytest.raises(liveupdate.StaleGenerationError):
        copy.fence()


# -- the supervisor ---------------------------------------------------------------------

SERVICE = textwrap.dedent(
    """
    import os, signal, subprocess, sys
    import liveupdate

    svc = liveupdate.inherited_session()
    marker = sys.argv[1]
    if svc.state == "outgoing":
        # First run: leave requests unanswered on the shared fd, then crash.
        fd = str(svc.session.fileno())
        subprocess.run(
            [sys.executable, "-c", sys.argv[2], fd, "2"], pass_fds=[int(fd)], check=False
        )
        with open(marker + ".tmp", "w") as f:
            f.write("crashing")
        os.kill(os.getpid(), signal.SIGKILL)
    fds = svc.restore()
    with open(marker + ".tmp", "w") as f:
        f.write(f"{svc.state} {svc.session.get_name().decode()} {sorted(fds)}")
    os.rename(marker + ".tmp", marker)
    """
)


def test_the_supervisor_survives_a_service_killed_mid_request(luod: Luod, tmp_path: Path) -> None:
    service = tmp_path / "service.py"
    service.write_text(SERVICE)
    marker = tmp_path / "marker"
    proc = subprocess.run(
        [
            *LUOCTL, "--socket", luod.socket, "run", "--session", "svc", "--",
            sys.executable, str(service), str(marker), DIES_MID_REQUEST,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    # The service crashed once with 4 requests in flight; the supervisor
    # fenced them off, handed the session over and ran it again, which
    # restored its state and exited 0.
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "incoming svc []", proc.stderr
    assert "crashed" in proc.stderr and "Traceback" not in proc.stderr
