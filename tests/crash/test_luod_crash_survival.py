"""A SIGKILLed luod, started again the same way, gives every session back.

luod keeps a copy of every preserved fd and of its state outside itself
(its keeper process by default, systemd's fd store under systemd:
``liveupdate.server.fdstore``). The acceptance test of issue 11: 100 memfds
with distinct content in 10 sessions, luod killed at seeded random points
(some in the middle of a reboot, stopped there by the fault hook), started
again, and every file retrieved with its content.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate import wire
from luodtest import Luod, copies_settled, events, memfd, running, wait_for

SESSIONS = 10
FILES_PER_SESSION = 10
TRIALS = 20
#: Steps of a reboot luod is stopped at (then killed) in some trials.
REBOOT_STEPS = ("freeze", "after-image", "before-handoff", "after-handoff-sent", "before-exec")

pytestmark = pytest.mark.luod_only


def content(session: int, token: int) -> bytes:
    return f"session {session} file {token}|".encode() * (1 + token % 7)


def fill(daemon: Luod, held: contextlib.ExitStack) -> None:
    """100 memfds in 10 sessions; the test's own references are closed, the
    session fds are kept in ``held`` (closing one would release it)."""
    with liveupdate.open_device(daemon.socket, timeout=5) as dev:
        for s in range(SESSIONS):
            session = held.enter_context(dev.create_session(f"s{s}"))
            for t in range(FILES_PER_SESSION):
                fd = memfd(content(s, t))
                session.preserve(fd, t)
                os.close(fd)
        copies_settled(dev)


def retrieve_all(daemon: Luod) -> None:
    with liveupdate.open_device(daemon.socket, timeout=5) as dev:
        for s in range(SESSIONS):
            session = dev.retrieve_session(f"s{s}")
            for t in range(FILES_PER_SESSION):
                fd = session.retrieve(t)
                try:
                    expected = content(s, t)
                    assert os.pread(fd, len(expected) + 1, 0) == expected
                finally:
                    os.close(fd)
            session.finish()
            session.close()


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def crash(daemon: Luod, rng: random.Random, tmp: Path) -> str:
    """Kill luod at a random point; what point it was."""
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.05)
        kill(daemon.pid)
        return "serving"
    step = rng.choice(REBOOT_STEPS)
    faults = tmp / "faults"
    faults.write_text(f"stop-at {step}\n")
    reboot = subprocess.Popen(
        [*luoctl_argv(daemon), "reboot", "--wait", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: bool(events(daemon, "fault-stop")), timeout=20)
    finally:
        for pid in stopped_luods(daemon):
            kill(pid)
        reboot.kill()
        reboot.wait()
    return step


def luoctl_argv(daemon: Luod) -> list[str]:
    import sys

    return [sys.executable, "-m", "liveupdate.cli.luoctl", "--socket", daemon.socket]


def stopped_luods(daemon: Luod) -> list[int]:
    """Every luod process of this daemon: the generation started and its
    successor (a child), never the keeper."""
    assert daemon.proc is not None
    pids = {daemon.proc.pid, daemon.pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == daemon.proc.pid and comm == "luod":
            pids.add(int(entry))
    return [p for p in pids if running(p)]


def test_a_sigkilled_luod_gives_every_file_back(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    rng = random.Random(11)
    faults = tmp_path / "faults"
    faults.write_text("")
    daemon = luod_factory(env={"LUOD_FAULT_FILE": str(faults)})
    points = []
    for trial in range(TRIALS):
        with contextlib.ExitStack() as held:
            fill(daemon, held)
            where = crash(daemon, rng, tmp_path)
        points.append(where)
        faults.write_text("")
        daemon.log = daemon.state_dir / f"restart-{trial}.log"
        daemon.start()
        back = events(daemon, "recovered")
        assert back and back[0]["sessions"] == SESSIONS, (where, daemon.log_text())
        assert back[0]["files"] == SESSIONS * FILES_PER_SESSION
        assert not events(daemon, "session-lost")
        retrieve_all(daemon)
    # Some kills fell in the middle of a reboot, at several of its steps.
    assert len(set(points) - {"serving"}) >= 3, points
    print(points)
    daemon.stop()


# -- under systemd: the fd store ------------------------------------------------------------

#: ``FileDescriptorStoreMax=`` of the test's unit: room for the 100 copies,
#: the two state slots and a margin, far below what a leak would reach in 20 trials.
FDSTORE_MAX = 256

#: How the test's service manager starts luod, in two stages run in the same
#: pid, as systemd does after fork(). ``outer``: the listener goes to fd 3 in
#: ``LISTEN_FDS``, and the process becomes ``systemd-socket-activate``, which
#: passes it through, passes on only the variables named with ``-E`` and execs
#: the next stage once a client connects. ``inner``: the fd store's copies
#: (which systemd-socket-activate cannot take itself: it polls every fd it is
#: given, and a memfd cannot be polled) go to fd 4.., named in
#: ``LISTEN_FDNAMES``, and the process becomes luod.
LAUNCHER = """
import fcntl, os, sys
stage, stored, names = sys.argv[1], sys.argv[2], sys.argv[3]
fds = [int(fd) for fd in stored.split(",") if fd]
first = 3 if stage == "outer" else 4
base = max([*fds, first + len(fds)]) + 1
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
for fd in fds:
    os.close(fd)
if stage == "outer":  # the listener first; the copies just above, for inner
    listener, copies = moved[0], moved[1:]
    os.dup2(listener, 3, inheritable=True)
    os.close(listener)
    for fd in copies:
        os.set_inheritable(fd, True)
    split = sys.argv.index("--")
    activate, luod = sys.argv[4:split], sys.argv[split + 1 :]
    inner = [sys.executable, sys.argv[0], "inner", ",".join(map(str, copies)), names, *luod]
    env = dict(os.environ, LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execve(activate[0], [*activate, *inner], env)
for i, fd in enumerate(moved):
    os.dup2(fd, 4 + i, inheritable=True)
    os.close(fd)
env = dict(os.environ, LISTEN_FDS=str(1 + len(moved)), LISTEN_PID=str(os.getpid()))
env["LISTEN_FDNAMES"] = ":".join(["luod.socket", *filter(None, names.split(":"))])
os.execve(sys.executable, [sys.executable, *sys.argv[4:]], env)
"""

#: Debian's ``systemd-socket-activate`` (package ``systemd``, installed by CI).
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


class FdStorePeer:
    """The service manager's side of ``sd_notify`` and of the fd store, as
    systemd documents it: a datagram socket at ``$NOTIFY_SOCKET``; ``READY=1``;
    ``MAINPID=`` moves the main pid; ``FDSTORE=1`` keeps the attached fds under
    ``FDNAME=`` (names need not be unique; an fd already stored is not stored
    twice; beyond ``FileDescriptorStoreMax=`` fds are refused); and
    ``FDSTOREREMOVE=1`` with ``FDNAME=`` closes every fd of that name. It owns
    the listening socket too (``luod.socket``), and starts luod with both,
    socket first, in ``LISTEN_FDS``/``LISTEN_FDNAMES``."""

    def __init__(self, address: str, device: str) -> None:
        import socket
        import threading

        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + address[1:])
        self.sock.settimeout(0.05)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(device)
        self.listener.listen(128)
        self.lock = threading.Lock()
        #: (name, fd), oldest first.
        self.store: list[tuple[str, int]] = []
        self.ready = 0
        self.main_pid = 0
        #: What systemd would log and refuse: fds over the limit, truncated messages.
        self.refused = 0
        self.truncated = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import array
        import socket

        room = socket.CMSG_SPACE(253 * array.array("i").itemsize)
        while not self._stop.is_set():
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(65536, room, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                continue
            fds = wire.fds_of(ancdata)
            with self.lock:
                if flags & socket.MSG_CTRUNC:
                    self.truncated += 1
                self._handle(data.decode(errors="replace"), fds)

    def _handle(self, text: str, fds: list[int]) -> None:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("READY") == "1":
            self.ready += 1
        if "MAINPID" in fields:
            self.main_pid = int(fields["MAINPID"])
        if fields.get("FDSTOREREMOVE") == "1":
            for _, fd in [e for e in self.store if e[0] == name]:
                os.close(fd)
            self.store = [e for e in self.store if e[0] != name]
        keep = fields.get("FDSTORE") == "1"
        for fd in fds:
            # Each copy in this test is its own inode: the same inode is the
            # same file (systemd compares open file descriptions).
            st = os.fstat(fd)
            same = any(
                (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino)
                for s in (os.fstat(f) for _, f in self.store)
            )
            if keep and not same and len(self.store) >= FDSTORE_MAX:
                self.refused += 1
            if keep and not same and len(self.store) < FDSTORE_MAX:
                self.store.append((name, fd))
            else:
                os.close(fd)

    def names(self) -> list[str]:
        with self.lock:
            return [name for name, _ in self.store]

    def start(self, daemon: Luod) -> None:
        """Start luod as systemd would: the listener and a dup of every stored fd."""
        import sys

        with self.lock:
            names = [name for name, _ in self.store]
            fds = [self.listener.fileno(), *(os.dup(fd) for _, fd in self.store)]
        assert SOCKET_ACTIVATE is not None
        fmt = ["--log-format", daemon.log_format]
        passed = [arg for name in daemon.env for arg in ("-E", name)]
        activate = [SOCKET_ACTIVATE, "--fdname=luod.socket", *passed]
        luod = ["-m", "liveupdate.server.luod", "--socket", daemon.socket, *fmt, *daemon.args]
        launcher = daemon.state_dir / "launcher.py"
        launcher.write_text(LAUNCHER)
        try:
            with open(daemon.log, "ab") as logf:
                daemon.proc = subprocess.Popen(
                    [
                        sys.executable,
                        str(launcher),
                        "outer",
                        ",".join(map(str, fds)),
                        ":".join(names),
                        *activate,
                        "--",
                        *luod,
                    ],
                    stdout=logf,
                    stderr=logf,
                    env=daemon.env,
                    pass_fds=fds,
                )
        finally:
            for fd in fds[1:]:
                os.close(fd)
        self.main_pid = daemon.proc.pid
        # A client's connection is what activates luod when nothing is stored yet.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as client:
            client.connect(daemon.socket)
            daemon.wait_serving()
        started = events(daemon, "started")[-1]
        assert started["activated"] is True and started["pid"] == daemon.proc.pid

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        self.listener.close()
        for _, fd in self.store:
            os.close(fd)
        self.store = []


def file_copies(peer: FdStorePeer) -> int:
    return sum(name.startswith("f-") for name in peer.names())


@pytest.mark.skipif(
    SOCKET_ACTIVATE is None, reason="needs systemd-socket-activate (Debian package systemd)"
)
def test_a_sigkilled_luod_under_systemd_gets_every_file_back_from_the_fd_store(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    rng = random.Random(1111)
    faults = tmp_path / "faults"
    faults.write_text("")
    daemon = luod_factory(start=False, env={"LUOD_FAULT_FILE": str(faults)})
    peer = FdStorePeer(f"@luod-fdstore-test-{os.getpid()}-{id(daemon)}", daemon.socket)
    daemon.env.update(NOTIFY_SOCKET=peer.address, FDSTORE=str(FDSTORE_MAX))
    try:
        peer.start(daemon)
        assert events(daemon, "copies")[0]["kind"] == "fdstore", daemon.log_text()
        wait_for(lambda: peer.ready == 1)
        points = []
        for trial in range(TRIALS):
            with contextlib.ExitStack() as held:
                fill(daemon, held)
                # Every file and the state are in the store before luod dies.
                wait_for(lambda: file_copies(peer) == SESSIONS * FILES_PER_SESSION)
                assert any(n.startswith("luod-state") for n in peer.names())
                where = crash(daemon, rng, tmp_path)
            points.append(where)
            faults.write_text("")
            daemon.log = daemon.state_dir / f"restart-{trial}.log"
            peer.start(daemon)
            back = events(daemon, "recovered")
            assert back and back[0]["source"] == "fdstore", (where, daemon.log_text())
            assert back[0]["sessions"] == SESSIONS, (where, back)
            assert back[0]["files"] == SESSIONS * FILES_PER_SESSION and not back[0]["missing"]
            assert not events(daemon, "session-lost") and not events(daemon, "file-lost")
            retrieve_all(daemon)
            # Finished sessions leave the store: it does not grow trial after trial.
            wait_for(
                lambda: file_copies(peer) == 0, f"no copies left: {peer.names()}", daemon=daemon
            )
        assert len(set(points) - {"serving"}) >= 3, points
        # Every start said READY=1; a successor that took over before the kill said it too.
        assert peer.ready >= TRIALS + 1 and not peer.refused and not peer.truncated
        daemon.stop()
        # A clean stop releases the copies on purpose.
        wait_for(lambda: not peer.names())
    finally:
        peer.close()
