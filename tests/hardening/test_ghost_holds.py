"""Holds luod cannot see: a client parks its own luod fds in flight and exits.

The attack (issue 8, finding 4): a client sends its device fd and session
fds with ``SCM_RIGHTS`` into a socketpair, preserves the other end of that
socketpair in a session, and exits. Those fds now live only in the queue of
a socket luod itself holds, so luod never sees them close. Every test here
runs that client as a real process against a real luod, and checks that luod
breaks such cycles (and only those): the device opens again, the parked
sessions are released, nobody else's session is touched, and an fd passed
to a live process is never taken away from it.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

import liveupdate
from liveupdate.server.census import inodes_in_queues, unix_peer_inode
from luodtest import Luod, events, luoctl, memfd, wait_for

pytestmark = pytest.mark.luod_only

#: How often a polling loop tries before the test fails (each try sleeps
#: _POLL seconds): bounds, not timings under test.
_TRIES = 400
_POLL = 0.05

_PARKER = textwrap.dedent(
    """
    import os, socket, sys
    import liveupdate

    path, park_device, names = sys.argv[1], sys.argv[2] == "device", sys.argv[3:]
    dev = liveupdate.open_device(path, timeout=10)
    sessions = [dev.create_session(name) for name in names]
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # The socket that will carry the fds is preserved in the first session...
    sessions[0].preserve(theirs.fileno(), 1)
    # ...and the fds go into its queue, where only luod holds them.
    parked = [s.fileno() for s in sessions] + ([dev.fileno()] if park_device else [])
    socket.send_fds(mine, [b"parked"], parked)
    if not park_device:
        dev.close()
    print(os.getpid(), flush=True)
    os._exit(0)  # no close of anything: the kernel drops what the process held
    """
)


def park(daemon: Luod, *names: str, device: bool = True) -> int:
    """Run the attacking client to its exit; its pid."""
    out = subprocess.run(
        [sys.executable, "-c", _PARKER, daemon.socket, "device" if device else "-", *names],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.strip())


def poll(predicate: Callable[[], bool], what: str) -> None:
    wait_for(predicate, what, timeout=_TRIES * _POLL)


def broken(daemon: Luod, kind: str, **fields: object) -> list[dict[str, object]]:
    """The ``hold-broken`` events of ``kind`` endpoints (with ``fields``)."""
    return events(daemon, "hold-broken", kind=kind, **fields)


def holders(daemon: Luod, kind: str, **fields: object) -> list[list[str]]:
    """The ``holders`` of each ``hold`` event (SIGUSR1 report) of ``kind`` endpoints."""
    return [str(e["holders"]).split(",") for e in events(daemon, "hold", kind=kind, **fields)]


def open_when_free(daemon: Luod) -> liveupdate.Device:
    """Open the device, retrying EBUSY a bounded number of times."""
    for _ in range(_TRIES):
        try:
            return daemon.open(timeout=0)
        except liveupdate.DeviceBusyError:
            time.sleep(_POLL)
    raise AssertionError(f"the device stayed busy:\n{daemon.log_text()[-3000:]}")


def create_when_possible(dev: liveupdate.Device, name: str) -> liveupdate.Session:
    """Create ``name``, retrying a bounded number of times while the limit is hit."""
    for _ in range(_TRIES):
        try:
            return dev.create_session(name)
        except liveupdate.OutOfResourcesError:
            time.sleep(_POLL)
    raise AssertionError("the session limit stayed exhausted")


def session_names(daemon: Luod) -> list[str]:
    with open_when_free(daemon) as dev:
        return sorted(s.name for s in dev.list_sessions().sessions)


def test_a_device_fd_parked_in_a_preserved_socket_does_not_keep_the_device_busy(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--max-sessions", "2")
    # Another client's session, with a file, held open the ordinary way.
    with daemon.open() as dev:
        bystander = dev.create_session("bystander")
    fd = memfd(b"still here")
    bystander.preserve(fd, 7)
    os.close(fd)

    park(daemon, "parked")
    with pytest.raises(liveupdate.DeviceBusyError):
        daemon.open(timeout=0)  # today's behaviour, for ever before the fix

    with open_when_free(daemon) as dev:
        assert dev.get_state().state is not None
        # The parked session is a ghost too: bystander + parked are the
        # limit (2), so creating another makes luod look, and release it.
        extra = create_when_possible(dev, "extra")
        assert len(broken(daemon, "device")) == 1
        assert broken(daemon, "session", session="parked")
        extra.close()
    assert events(daemon, "session-released", session="parked")
    poll(lambda: session_names(daemon) == ["bystander"], "only the bystander to remain")

    # Nobody else lost anything: the bystander's file crosses a live update.
    result = luoctl(daemon.socket, "reboot", "--wait", "20")
    assert result.returncode == 0, result.stderr + daemon.log_text()[-3000:]
    with open_when_free(daemon) as dev:
        successor = dev.retrieve_session("bystander")
    with successor:
        data_fd = successor.retrieve(7)
        try:
            assert os.pread(data_fd, 100, 0) == b"still here"
        finally:
            os.close(data_fd)
        successor.finish()
    bystander.close()


def test_parked_session_fds_do_not_exhaust_the_session_limit(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--max-sessions", "3")
    park(daemon, "ghost-1", "ghost-2", device=False)
    with open_when_free(daemon) as dev:
        keep = dev.create_session("live")  # 3 of 3
        # Each refusal makes luod look; the ghosts go once proven so.
        first = create_when_possible(dev, "after-1")
        second = create_when_possible(dev, "after-2")
    for name in ("ghost-1", "ghost-2"):
        assert broken(daemon, "session", session=name), daemon.log_text()[-3000:]
    assert not events(daemon, "hold-broken", session="live")
    assert keep.get_name() == b"live"  # the live client's session works on
    for session in (keep, first, second):
        session.close()


def test_sigusr1_lists_holds_and_breaks_a_parked_device(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    with daemon.open() as dev:
        held = dev.create_session("held-by-me")
    attacker = park(daemon, "parked")
    daemon.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
    poll(lambda: bool(events(daemon, "holds-reported")), "the holds report")
    assert any(str(os.getpid()) in h for h in holders(daemon, "session", session="held-by-me"))
    assert ["in-flight"] in holders(daemon, "device"), daemon.log_text()[-3000:]
    # A grace period later luod looks again by itself, and breaks both ghosts.
    poll(lambda: bool(broken(daemon, "device")), "the device to be freed")
    poll(lambda: bool(broken(daemon, "session", session="parked")), "the parked session")
    assert events(daemon, "hold-broken", peer_pid=attacker)
    with daemon.open(timeout=0) as dev:  # free at the first try
        assert [s.name for s in dev.list_sessions().sessions] == ["held-by-me"]
    assert held.get_name() == b"held-by-me"
    held.close()


_HOLDER = textwrap.dedent(
    """
    import os, socket, sys
    import liveupdate
    from liveupdate.client.transport import SocketTransport

    channel = socket.socket(fileno=int(sys.argv[1]))
    _msg, fds, _flags, _addr = socket.recv_fds(channel, 16, 4)
    print("received", flush=True)
    # Hold the device until told, then prove the fd still works.
    channel.recv(1)
    dev = liveupdate.Device(fds[0], SocketTransport(), "passed")
    print(dev.get_state().state.name, flush=True)
    dev.close()
    """
)


def test_a_device_fd_passed_to_a_live_process_is_never_broken(luod: Luod) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        dev = luod.open()
        socket.send_fds(ours, [b"dev"], [dev.fileno()])
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "received"
        dev.close()  # the holder has the only client end now

        for round_ in range(2):
            # Contention, and the operator's report, again and again.
            for _ in range(20):
                with pytest.raises(liveupdate.DeviceBusyError):
                    luod.open(timeout=0)
                time.sleep(_POLL)
            luod.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
            poll(
                lambda n=round_: len(events(luod, "holds-reported")) > n,
                "the holds report",
            )
        assert any(str(holder.pid) in h for h in holders(luod, "device")), luod.log_text()
        assert not events(luod, "hold-broken")
        ours.send(b"go")
        assert holder.stdout.readline().strip() == "NORMAL"
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        ours.close()
    with luod.open(timeout=5):
        pass


_SLOW_RECEIVER = textwrap.dedent(
    """
    import socket, sys
    import liveupdate

    channel = socket.socket(fileno=int(sys.argv[1]))
    sys.stdin.readline()  # told to receive only now: the fd waited in our queue
    _msg, fds, _flags, _addr = socket.recv_fds(channel, 16, 4)
    print(liveupdate.Session.from_fd(fds[0]).get_name().decode(), flush=True)
    """
)


def test_a_session_fd_waiting_for_a_live_receiver_is_never_released(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--max-sessions", "1")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = subprocess.Popen(
        [sys.executable, "-c", _SLOW_RECEIVER, str(theirs.fileno())],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    theirs.close()
    try:
        with daemon.open() as dev:
            session = dev.create_session("in-transit")
            # In flight, held by no process, in a queue luod does not hold.
            socket.send_fds(ours, [b"s"], [session.fileno()])
            session.close()
            for _ in range(60):  # a few grace periods of refusals
                with pytest.raises(liveupdate.OutOfResourcesError) as exc:
                    dev.create_session("another")
                assert exc.value.errno == errno.ENOMEM
                time.sleep(_POLL)
        assert not events(daemon, "hold-broken")
        assert receiver.stdin is not None
        receiver.stdin.write("go\n")
        receiver.stdin.flush()
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "in-transit"
        assert receiver.wait(timeout=30) == 0
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
        ours.close()


def test_the_kernel_names_the_peer_of_a_unix_socket() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert unix_peer_inode(os.fstat(a.fileno()).st_ino) == os.fstat(b.fileno()).st_ino
    with open(os.devnull) as f:
        assert unix_peer_inode(os.fstat(f.fileno()).st_ino) is None  # not a socket


def test_queues_are_walked_two_hops_deep_without_dequeuing_anything() -> None:
    outer_w, outer_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inner_w, inner_r = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    parked_a, parked_b = socket.socketpair()
    with outer_w, outer_r, inner_w, inner_r, parked_a, parked_b:
        parked = os.fstat(parked_a.fileno()).st_ino
        carrier = os.fstat(inner_r.fileno()).st_ino
        outer_w.send(b"first, no fds")
        socket.send_fds(inner_w, [b"deep"], [parked_a.fileno()])
        socket.send_fds(outer_w, [b"carrier"], [inner_r.fileno()])
        found = inodes_in_queues([outer_r.fileno()])
        assert {parked, carrier} <= found
        # Nothing was taken from the queue, and the peek offset is back to off.
        assert outer_r.recv(100) == b"first, no fds"
        _msg, fds, _flags, _addr = socket.recv_fds(outer_r, 100, 4)
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == carrier
        os.close(fds[0])
        assert outer_r.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_PEEK_OFF", 42)) == -1
