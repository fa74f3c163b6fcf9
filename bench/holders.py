#!/usr/bin/env python3
"""Benchmark: 1,000 fds stored and retrieved through fd holders, end to end.

The same memfds (each with its own content), on the same machine, in one
run, go through every way a service can park fds outside itself today and
come back; every fd's content is checked after it came back. The ways:

* **floor, socket pair**: the fds sent over a bare ``SOCK_SEQPACKET``
  socket pair to a running Python process that keeps them, and sent back
  (at most 253 per message, the kernel's limit): what any holder written in
  Python pays to move them, and the baseline of every ratio;
* **floor, process start**: a new Python process started with the fds at
  3.. (``LISTEN_FDS``), up to its first line: what a holder that hands fds
  over by starting a process pays before its own work;
* **s6-fdholder, one tool run per fd** (Debian ``s6``): ``s6-fdholder-store``
  once per fd, then ``s6-fdholder-retrieve ... cat`` once per fd (the tool
  execs its program with the fd as stdin; ``cat`` reads the content back):
  two process starts per fd, the second one two execs;
* **s6-fdholder, bulk store**: ``s6-fdholder-setdump`` in runs of 253 fds
  (the most one run passes); back through ``s6-fdholder-getdump`` when it
  hands all of them to a started process, else one ``s6-fdholder-retrieve``
  per fd (s6 2.11.3.2 fails a getdump of more than 253 fds: the table says
  which was used);
* **systemd fd store protocol**: this benchmark's own peer, a separate
  Python process playing the service manager's side as systemd documents
  it: a datagram ``NOTIFY_SOCKET`` (credentials checked: only the main pid
  is heard) receiving ``FDSTORE=1``/``FDNAME=`` with ``SCM_RIGHTS``, one
  datagram per fd so each keeps its name, ``BARRIER=1`` to know all were
  taken; it hands them back by starting a process with
  ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (fork, fds moved to 3..,
  exec), as systemd starts a service again;
* **luod, one generation**: ``PRESERVE_FD`` of every fd into a session,
  ``LUOD_SESSION_UPDATE`` (the hand-over ``luoctl update`` does), then
  ``RETRIEVE_SESSION`` and ``RETRIEVE_FD`` of every fd;
* **luod, across a reboot**: the same, but the hand-over is a live update
  of luod itself (``PREPARE`` ahead, untimed, then ``REBOOT`` until the
  next generation answers, as ``luoctl reboot`` does).

luod runs in its default configuration (the keeper on: a copy of every
preserved fd in another process); a last row repeats "one generation"
against a second luod started with ``--keeper off``. Its rows retrieve
into this running process, as a service's successor does once started; the
ways that hand fds over by starting a process include that start, which
the process-start floor shows alone. Ways take turns in each repetition;
the table shows medians.

    .venv/bin/python bench/holders.py            # 1000 fds, 5 repetitions (about a minute)
    .venv/bin/python bench/holders.py --quick    # 100 fds, 2 repetitions
"""

from __future__ import annotations

import argparse
import array
import fcntl
import math
import os
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import resultfile

import liveupdate
from liveupdate import uapi, wire

#: The most fds one SCM_RIGHTS message carries (the kernel's SCM_MAX_FD).
SCM_MAX_FD = 253

#: The program every started process runs: it finds its fds the way the
#: holder hands them over (``listen``: systemd's LISTEN_FDS at 3..; ``s6``:
#: s6-fdholder-getdump's S6_FD# environment), says it has them, then checks
#: each one's content against its name.
CHECKER = r"""
import os, sys
form, pattern = sys.argv[1], sys.argv[2]
env = os.environ
if form == "listen":
    if env.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("LISTEN_PID is not this process")
    fds = range(3, 3 + int(env["LISTEN_FDS"]))
    names = env["LISTEN_FDNAMES"].split(":")
else:
    count = int(env["S6_FD#"])
    fds = [int(env["S6_FD_%d" % i]) for i in range(count)]
    names = [env["S6_FDID_%d" % i] for i in range(count)]
os.write(1, b"have %d\n" % len(fds))
good = sum(os.pread(fd, 4096, 0) == pattern.replace("{name}", name).encode()
           for fd, name in zip(fds, names))
os.write(1, b"checked %d\n" % good)
"""

#: The socket-pair floor's other process: keep every fd received, send them
#: all back on ``R`` (then ``E``), close them on ``C``.
FLOOR_HOLDER = r"""
import array, os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
room = socket.CMSG_SPACE(253 * 4)
held = []
while True:
    data, anc, flags, _ = sock.recvmsg(16, room, socket.MSG_CMSG_CLOEXEC)
    if not data:
        break
    for level, kind, payload in anc:
        got = array.array("i")
        got.frombytes(payload[: len(payload) - len(payload) % 4])
        held.extend(got)
    if flags & socket.MSG_CTRUNC:
        sys.exit("truncated")
    if data == b"D":
        sock.send(b"ok")
    elif data == b"R":
        for i in range(0, len(held), 253):
            part = array.array("i", held[i:i + 253]).tobytes()
            sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, part)])
        sock.send(b"E")
    elif data == b"C":
        for fd in held:
            os.close(fd)
        held = []
        sock.send(b"ok")
"""

Memfds = list[tuple[str, int]]


def pattern(nonce: str) -> str:
    """The content of the fd named ``{name}`` in this run."""
    return f"holders bench {nonce} {{name}}\n"


def content(nonce: str, name: str) -> bytes:
    return pattern(nonce).replace("{name}", name).encode()


def make_memfds(count: int, nonce: str) -> Memfds:
    memfds = []
    for i in range(count):
        name = f"fd-{i}"
        fd = os.memfd_create(name)
        os.write(fd, content(nonce, name))
        memfds.append((name, fd))
    return memfds


def intact(fds: list[int], names: list[str], nonce: str) -> int:
    """How many of ``fds`` hold what the fd of the same name was given."""
    return sum(
        os.pread(fd, 4096, 0) == content(nonce, name) for fd, name in zip(fds, names, strict=True)
    )


def start_with_fds(fds: list[int], names: list[str], argv: list[str], stdout: int) -> int:
    """Start ``argv`` with ``fds`` at 3.. as systemd starts a service: fork,
    move the fds into place, ``LISTEN_PID`` set to the child's own pid, exec."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(fds))
    env["LISTEN_FDNAMES"] = ":".join(names)
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(stdout, 1)
            # Out of the way first: a stored fd may already sit at 3 + i for
            # another i, and dup2 onto itself would keep close-on-exec.
            base = max([*fds, 2 + len(fds)]) + 1
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i)
            env["LISTEN_PID"] = str(os.getpid())
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def checker_argv(form: str, nonce: str) -> list[str]:
    return [sys.executable, "-I", "-S", "-c", CHECKER, form, pattern(nonce)]


def read_checker(stream: IO[bytes], clock_start: float) -> tuple[float, int]:
    """Seconds until the started process said it has its fds, and how many
    of them it found intact."""
    have = stream.readline()
    elapsed = time.perf_counter() - clock_start
    if not have.startswith(b"have "):
        raise RuntimeError(f"the started process said {have!r}")
    checked = stream.readline()
    if not checked.startswith(b"checked "):
        raise RuntimeError(f"the started process said {checked!r}")
    return elapsed, int(checked.split()[1])


def reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"pid {pid} exited with {os.waitstatus_to_exitcode(status)}")


class Way:
    """One way of parking the fds and getting them back. ``store`` and
    ``retrieve`` return seconds; ``retrieve`` also how many came back intact."""

    name = ""
    #: Process starts per store and retrieve of all the fds.
    starts = 0
    #: Whom the fds come back to.
    into = "this process"

    def store(self, memfds: Memfds) -> float | None:
        return None

    def handover(self) -> float | None:
        return None

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        raise NotImplementedError

    def reset(self) -> None:
        """Drop what is held (untimed), ready for the next repetition."""

    def close(self) -> None:
        pass


class SocketPairFloor(Way):
    name = "floor: socket pair to a running process"

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", FLOOR_HOLDER, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
        )
        theirs.close()
        self.back: list[int] = []

    def store(self, memfds: Memfds) -> float:
        start = time.perf_counter()
        for i in range(0, len(memfds), SCM_MAX_FD):
            part = array.array("i", [fd for _, fd in memfds[i : i + SCM_MAX_FD]]).tobytes()
            self.sock.sendmsg([b"S"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, part)])
        self.sock.send(b"D")
        if self.sock.recv(16) != b"ok":
            raise RuntimeError("the floor's holder did not take the fds")
        return time.perf_counter() - start

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        room = socket.CMSG_SPACE(SCM_MAX_FD * 4)
        start = time.perf_counter()
        self.sock.send(b"R")
        while True:
            data, anc, flags, _ = self.sock.recvmsg(16, room, socket.MSG_CMSG_CLOEXEC)
            self.back.extend(wire.fds_of(anc))
            if flags & socket.MSG_CTRUNC:
                raise RuntimeError("fds lost: the control message was truncated")
            if data == b"E":
                break
        elapsed = time.perf_counter() - start
        return elapsed, intact(self.back, [name for name, _ in memfds], nonce)

    def reset(self) -> None:
        for fd in self.back:
            os.close(fd)
        self.back = []
        self.sock.send(b"C")
        self.sock.recv(16)

    def close(self) -> None:
        self.sock.close()
        self.child.wait(10)


class ProcessStartFloor(Way):
    name = "floor: start a process with the fds"
    starts = 1
    into = "a started process"

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        out_r, out_w = os.pipe()
        with os.fdopen(out_r, "rb") as stream:
            start = time.perf_counter()
            pid = start_with_fds(
                [fd for _, fd in memfds],
                [name for name, _ in memfds],
                checker_argv("listen", nonce),
                out_w,
            )
            os.close(out_w)
            result = read_checker(stream, start)
        reap(pid)
        return result


class S6FdHolder(Way):
    """s6-fdholder-daemon with an access-rules database letting this uid
    store, retrieve and dump ``fd-*`` ids. A fresh daemon per repetition."""

    def __init__(self, count: int, bulk: bool) -> None:
        if shutil.which("s6-fdholder-daemon") is None:
            raise RuntimeError("bench/holders.py needs Debian's s6: apt-get install s6")
        self.count = count
        self.bulk = bulk
        self.name = (
            "s6-fdholder: bulk store (setdump)" if bulk else "s6-fdholder: one tool run per fd"
        )
        self.dir = Path(tempfile.mkdtemp(prefix="holders-s6-"))
        env = self.dir / "rules" / "uid" / str(os.getuid()) / "env"
        env.mkdir(parents=True)
        (env.parent / "allow").touch()
        for right, value in (
            ("S6_FDHOLDER_STORE_REGEX", "^fd-"),
            ("S6_FDHOLDER_RETRIEVE_REGEX", "^fd-"),
            ("S6_FDHOLDER_GETDUMP", "1"),
            ("S6_FDHOLDER_SETDUMP", "1"),
        ):
            (env / right).write_text(value + "\n")
        self.rules = self.dir / "rules.cdb"
        subprocess.run(
            ["s6-accessrules-cdb-from-fs", str(self.rules), str(self.dir / "rules")], check=True
        )
        self.socket = str(self.dir / "socket")
        self.tools = {
            tool: shutil.which(f"s6-fdholder-{tool}") or f"s6-fdholder-{tool}"
            for tool in ("store", "retrieve", "setdump", "getdump")
        }
        self.cat = shutil.which("cat") or "/bin/cat"
        #: Set after the first bulk store: whether getdump handed every fd back.
        self.getdump_error: str | None = None
        self.getdump_tried = False
        self.daemon: subprocess.Popen[bytes] | None = None
        self._start_daemon()

    @property
    def starts(self) -> int:  # type: ignore[override]
        stores = math.ceil(self.count / SCM_MAX_FD) if self.bulk else self.count
        retrieves = 1 if self.bulk and self.getdump_error is None else self.count
        return stores + retrieves

    @property
    def into(self) -> str:  # type: ignore[override]
        if self.bulk and self.getdump_error is None:
            return "a started process (getdump)"
        return "cat, one started per fd"

    def _start_daemon(self) -> None:
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        self.daemon = subprocess.Popen(
            ["s6-fdholder-daemon", "-1", "-n", str(self.count), "-x", str(self.rules), self.socket],
            stdout=subprocess.PIPE,
        )
        assert self.daemon.stdout is not None
        if self.daemon.stdout.readline() != b"\n":  # -1: its readiness line
            raise RuntimeError("s6-fdholder-daemon did not start")

    def _spawn(self, argv: list[str], stdin: int | None = None, stdout: int | None = None) -> None:
        """One tool run, as a shell would start it: spawn, wait, check."""
        actions = []
        if stdin is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdin, 0))
        if stdout is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions)
        reap(pid)

    def store(self, memfds: Memfds) -> float:
        start = time.perf_counter()
        if not self.bulk:
            for name, fd in memfds:
                self._spawn([self.tools["store"], self.socket, name], stdin=fd)
        else:
            for i in range(0, len(memfds), SCM_MAX_FD):
                part = memfds[i : i + SCM_MAX_FD]
                env = dict(os.environ)
                env["S6_FD#"] = str(len(part))
                for j, (name, fd) in enumerate(part):
                    env[f"S6_FD_{j}"] = str(fd)
                    env[f"S6_FDID_{j}"] = name
                subprocess.run(
                    [self.tools["setdump"], self.socket],
                    pass_fds=[fd for _, fd in part],
                    env=env,
                    check=True,
                )
        return time.perf_counter() - start

    def _try_getdump(self, nonce: str) -> tuple[float, int] | None:
        """Every fd to a started process by one getdump; None (and why, kept)
        when s6 refuses."""
        start = time.perf_counter()
        proc = subprocess.Popen(
            [self.tools["getdump"], self.socket, *checker_argv("s6", nonce)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            result = read_checker(proc.stdout, start)
        except RuntimeError:
            proc.wait()
            self.getdump_error = proc.stderr.read().decode(errors="replace").strip()
            return None
        finally:
            proc.stdout.close()
            proc.stderr.close()
        if proc.wait() != 0:
            raise RuntimeError(f"s6-fdholder-getdump exited with {proc.returncode}")
        return result

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        if self.bulk and not self.getdump_tried:
            # Tried once, untimed: with s6 2.11.3.2, more than 253 fds fail.
            self.getdump_tried = True
            self._try_getdump(nonce)
        if self.bulk and self.getdump_error is None:
            result = self._try_getdump(nonce)
            if result is None:
                raise RuntimeError(f"s6-fdholder-getdump failed: {self.getdump_error}")
            return result
        # cat reads from the shared file offset: start each fd at 0 (untimed).
        for _, fd in memfds:
            os.lseek(fd, 0, os.SEEK_SET)
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        good = 0
        try:
            start = time.perf_counter()
            for name, _ in memfds:
                self._spawn([self.tools["retrieve"], self.socket, name, self.cat], stdout=out_w)
                try:
                    got = os.read(out_r, 4096)
                except BlockingIOError:
                    got = b""
                good += got == content(nonce, name)
            elapsed = time.perf_counter() - start
        finally:
            os.close(out_r)
            os.close(out_w)
        return elapsed, good

    def _stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            self.daemon.wait(10)
            if self.daemon.stdout is not None:
                self.daemon.stdout.close()
            self.daemon = None

    def reset(self) -> None:
        self._stop_daemon()
        self._start_daemon()

    def close(self) -> None:
        self._stop_daemon()
        shutil.rmtree(self.dir, ignore_errors=True)


class SystemdFdStore(Way):
    """The service's side of systemd's fd store, against :func:`fdstore_peer`
    in its own process."""

    name = "systemd fd store protocol (own peer)"
    starts = 1
    into = "a started process (LISTEN_FDS)"

    def __init__(self) -> None:
        self.address = f"\0liveupdate-holders-{os.getpid()}-{secrets.token_hex(4)}"
        self.peer = subprocess.Popen(
            [sys.executable, __file__, "--fdstore-peer", self.address.lstrip("\0"),
             "--main-pid", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.peer.stdin is not None and self.peer.stdout is not None
        self.to_peer, self.from_peer = self.peer.stdin, self.peer.stdout
        if self.from_peer.readline() != b"listening\n":
            raise RuntimeError("the fd store peer did not start")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def notify(self, text: str, fds: list[int]) -> None:
        self.sock.sendmsg([text.encode()], wire.rights(fds), 0, self.address)

    def store(self, memfds: Memfds) -> float:
        start = time.perf_counter()
        for name, fd in memfds:
            # One datagram per fd: FDNAME names every fd of its message.
            self.notify(f"FDSTORE=1\nFDNAME={name}", [fd])
        # sd_notify_barrier's way: the manager closes the pipe's write end
        # once it has handled every message sent before it.
        barrier_r, barrier_w = os.pipe()
        self.notify("BARRIER=1", [barrier_w])
        os.close(barrier_w)
        if os.read(barrier_r, 1) != b"":
            raise RuntimeError("the barrier pipe was written to")
        os.close(barrier_r)
        return time.perf_counter() - start

    def command(self, line: str) -> None:
        self.to_peer.write(line.encode() + b"\n")
        self.to_peer.flush()

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        start = time.perf_counter()
        self.command(f"start {nonce}")
        result = read_checker(self.from_peer, start)
        exited = self.from_peer.readline()
        if exited != b"exited 0\n":
            raise RuntimeError(f"the peer's started process: {exited!r}")
        return result

    def reset(self) -> None:
        self.command("clear")
        if self.from_peer.readline() != b"cleared\n":
            raise RuntimeError("the fd store peer did not clear")

    def close(self) -> None:
        self.sock.close()
        self.to_peer.close()
        self.peer.wait(10)
        self.from_peer.close()


def fdstore_peer(address: str, main_pid: int) -> None:
    """The manager's side: a datagram socket (``NOTIFY_SOCKET``) taking
    ``FDSTORE=1``/``FDNAME=``/``FDSTOREREMOVE=1``/``BARRIER=1`` from
    ``main_pid`` only (``NotifyAccess=main``: the kernel's credentials), and
    commands on stdin: ``start NONCE`` (start the checker with every stored
    fd, as systemd restarts a service), ``clear``; replies on stdout, which
    the started process shares."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind("\0" + address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    room = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(12)
    store: list[tuple[str, int]] = []
    refused = 0

    def reply(text: str) -> None:
        os.write(1, text.encode() + b"\n")

    def handle(data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int) -> None:
        nonlocal refused
        fds = wire.fds_of(ancdata)
        sender = next(
            (
                int.from_bytes(payload[:4], sys.byteorder)
                for level, kind, payload in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            ),
            0,
        )
        fields = dict(
            line.split("=", 1) for line in data.decode(errors="replace").split("\n") if "=" in line
        )
        keep = (
            sender == main_pid
            and not flags & socket.MSG_CTRUNC
            and fields.get("FDSTORE") == "1"
            and "BARRIER" not in fields
        )
        if sender == main_pid and fields.get("FDSTOREREMOVE") == "1":
            name = fields.get("FDNAME", "stored")
            for _, fd in [e for e in store if e[0] == name]:
                os.close(fd)
            store[:] = [e for e in store if e[0] != name]
        for fd in fds:
            if keep:
                store.append((fields.get("FDNAME", "stored"), fd))
            else:  # refused, or BARRIER=1's pipe: closing it is the answer
                refused += sender != main_pid
                os.close(fd)

    reply("listening")
    pending = b""
    while True:
        readable, _, _ = select.select([sock, 0], [], [])
        if sock in readable:
            data, ancdata, flags, _ = sock.recvmsg(4096, room, socket.MSG_CMSG_CLOEXEC)
            handle(data, ancdata, flags)
            continue  # the datagrams first: a command comes after the barrier
        chunk = os.read(0, 4096)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            words = line.decode().split()
            if words[0] == "start":
                pid = start_with_fds(
                    [fd for _, fd in store],
                    [name for name, _ in store],
                    checker_argv("listen", words[1]),
                    1,
                )
                _, status = os.waitpid(pid, 0)
                reply(f"exited {os.waitstatus_to_exitcode(status)}")
            elif words[0] == "clear":
                for _, fd in store:
                    os.close(fd)
                store.clear()
                reply("cleared")
    if refused:
        print(f"fd store peer: refused {refused} fds from other processes", file=sys.stderr)


class Luod(Way):
    """A luod in its default configuration (the keeper on), shared by both
    luod rows: one session per repetition, token ``i`` for ``fd-i``."""

    def __init__(self, daemon: LuodDaemon, across_reboot: bool) -> None:
        self.daemon = daemon
        self.across = across_reboot
        self.name = "luod: across a luod reboot" if across_reboot else "luod: one generation"
        if not daemon.keeper:
            self.name += ", --keeper off"
        # Across a reboot: luod's next generation, started ahead (PREPARE, untimed).
        self.starts = 1 if across_reboot else 0
        self.round = 0
        self.dev: liveupdate.Device | None = None
        self.session: liveupdate.Session | None = None
        self.back: list[int] = []

    @property
    def session_name(self) -> str:
        return f"holders-{'reboot' if self.across else 'update'}-{self.round}"

    def store(self, memfds: Memfds) -> float:
        self.round += 1
        start = time.perf_counter()
        self.dev = liveupdate.open_device(self.daemon.device, timeout=10)
        self.session = self.dev.create_session(self.session_name)
        for token, (_, fd) in enumerate(memfds):
            self.session.preserve(fd, token)
        return time.perf_counter() - start

    def handover(self) -> float:
        assert self.dev is not None and self.session is not None
        if not self.across:
            start = time.perf_counter()
            self.session.update()  # luoctl update's hand-over: outgoing becomes incoming
            return time.perf_counter() - start
        self.dev.set_event(uapi.LuodEvent.PREPARE)  # ahead, as luoctl reboot does
        old = self.dev.get_state().generation
        start = time.perf_counter()
        self.dev.set_event(uapi.LuodEvent.REBOOT)
        self.dev.close()
        self.session.close()  # frozen by the reboot: it went over
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                dev = liveupdate.open_device(self.daemon.device, timeout=10)
            except (liveupdate.StaleGenerationError, liveupdate.NotFoundError):
                continue
            if dev.get_state().generation > old:
                self.dev = dev
                return time.perf_counter() - start
            dev.close()
        raise RuntimeError("luod did not come back from the reboot")

    def retrieve(self, memfds: Memfds, nonce: str) -> tuple[float, int]:
        assert self.dev is not None
        start = time.perf_counter()
        self.session = self.dev.retrieve_session(self.session_name)
        self.back = [self.session.retrieve(token) for token in range(len(memfds))]
        elapsed = time.perf_counter() - start
        return elapsed, intact(self.back, [name for name, _ in memfds], nonce)

    def reset(self) -> None:
        for fd in self.back:
            os.close(fd)
        self.back = []
        if self.session is not None:
            self.session.finish()
            self.session.close()
            self.session = None
        if self.dev is not None:
            self.dev.close()
            self.dev = None


class LuodDaemon:
    """luod as a user starts it (``keeper``: its default, a copy of every
    preserved fd in a keeper process) or with ``--keeper off``; a reboot may
    move it to another process."""

    def __init__(self, keeper: bool = True) -> None:
        self.keeper = keeper
        self.state = Path(tempfile.mkdtemp(prefix="holders-luod-"))
        self.device = str(self.state / "device")
        self.log = self.state / "luod.log"
        argv = [sys.executable, "-m", "liveupdate.server.luod", "--socket", self.device]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv if keeper else [*argv, "--keeper", "off"],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 30
        while b"serving" not in self.log.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.01)

    def close(self) -> None:
        serving = int((self.state / "luod.lock").read_text().strip())
        for pid in {serving, self.proc.pid}:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.proc.wait(15)
        deadline = time.monotonic() + 15
        while (self.state / "luod.lock").exists() and time.monotonic() < deadline:
            try:
                os.kill(serving, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.state, ignore_errors=True)


class Samples:
    def __init__(self) -> None:
        self.store: list[float] = []
        self.handover: list[float] = []
        self.retrieve: list[float] = []
        self.intact: list[int] = []


def median_ms(values: list[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


def run(count: int, repeat: int) -> tuple[list[Way], dict[str, Samples]]:
    nonce = secrets.token_hex(8)
    memfds = make_memfds(count, nonce)
    daemons: list[LuodDaemon] = []
    ways: list[Way] = []
    try:
        daemons = [LuodDaemon(), LuodDaemon(keeper=False)]
        ways = [
            SocketPairFloor(),
            ProcessStartFloor(),
            S6FdHolder(count, bulk=False),
            S6FdHolder(count, bulk=True),
            SystemdFdStore(),
            Luod(daemons[0], across_reboot=False),
            Luod(daemons[0], across_reboot=True),
            Luod(daemons[1], across_reboot=False),
        ]
        samples = {way.name: Samples() for way in ways}
        for rep in range(repeat):
            for way in ways:  # ways take turns, so a burst of load hits all alike
                got = samples[way.name]
                stored = way.store(memfds)
                handed = way.handover()
                took, good = way.retrieve(memfds, nonce)
                way.reset()
                if stored is not None:
                    got.store.append(stored)
                if handed is not None:
                    got.handover.append(handed)
                got.retrieve.append(took)
                got.intact.append(good)
            print(f"repetition {rep + 1} of {repeat} done", file=sys.stderr)
        return ways, samples
    finally:
        for way in ways:
            way.close()
        for daemon in daemons:
            daemon.close()
        for _, fd in memfds:
            os.close(fd)


def plot(rows: list[tuple[str, float, float, float]], path: Path, count: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    # One panel per phase, each on its own log scale: stacked on a log axis,
    # the phases' lengths would not read as their shares.
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(rows) + 1.6), sharey=True)
    phases = (("store", "tab:blue"), ("hand-over", "tab:gray"), ("retrieve", "tab:orange"))
    for index, (ax, (label, color)) in enumerate(zip(axes, phases, strict=True)):
        values = [r[1 + index] for r in rows]
        ax.barh(names, [v if v > 0 else float("nan") for v in values], color=color)
        for i, v in enumerate(values):
            ax.text(v if v > 0 else 0.1, i, f" {v:.1f}" if v > 0 else " -", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(0.1, max([*values, 1.0]) * 8)
        ax.set_xlabel(f"{label}, ms (median, log scale)")
    axes[0].invert_yaxis()
    fig.suptitle(f"{count} fds stored and retrieved end to end", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 fds, 2 repetitions")
    parser.add_argument("--fds", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", help="result file (default bench/results/holders.json)")
    parser.add_argument("--plots", help="directory for the plot")
    parser.add_argument("--fdstore-peer", help=argparse.SUPPRESS)
    parser.add_argument("--main-pid", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fdstore_peer:
        fdstore_peer(args.fdstore_peer, args.main_pid)
        return
    count, repeat = (100, 2) if args.quick else (args.fds, args.repeat)
    results_dir, stem, plots_dir = resultfile.destination(
        args.quick, args.out, args.plots, "holders"
    )
    machine = resultfile.machine()
    ways, samples = run(count, repeat)

    floor = samples[ways[0].name]
    floor_store, floor_retrieve = median_ms(floor.store), median_ms(floor.retrieve)
    assert floor_store is not None and floor_retrieve is not None
    floor_total = floor_store + floor_retrieve
    table_rows: list[resultfile.Row] = []
    plot_rows = []
    goals = []
    print(f"{'way':<42} {'starts':>6} {'store':>9} {'hand-over':>9} {'retrieve':>9} "
          f"{'total ms':>9} {'/ floor':>8} {'intact':>7}")  # fmt: skip
    for way in ways:
        got = samples[way.name]
        store, handover, retrieve = (
            median_ms(got.store), median_ms(got.handover), median_ms(got.retrieve)
        )  # fmt: skip
        assert retrieve is not None
        total = (store or 0.0) + (handover or 0.0) + retrieve
        worst = min(got.intact)

        def cell(value: float | None) -> str | float:
            return "-" if value is None else round(value, 2)

        def ratio(value: float | None, base: float) -> str | float:
            return "-" if value is None else round(value / base, 1)

        table_rows.append([
            way.name, way.into, way.starts, cell(store), cell(handover), cell(retrieve),
            round(total, 2), ratio(store, floor_store), ratio(retrieve, floor_retrieve),
            round(total / floor_total, 1), worst,
        ])  # fmt: skip
        plot_rows.append((way.name, store or 0.0, handover or 0.0, retrieve))
        print(f"{way.name:<42} {way.starts:>6} {cell(store):>9} {cell(handover):>9} "
              f"{cell(retrieve):>9} {total:>9.2f} {total / floor_total:>8.1f} "
              f"{worst:>7}")  # fmt: skip
        goals.append(resultfile.goal(
            f"all {count} fds back with their content, {way.name}",
            f"{worst} of {count} (the worst of {repeat} repetitions)", worst == count,
        ))  # fmt: skip
    notes = [
        way.getdump_error
        for way in ways
        if isinstance(way, S6FdHolder) and way.bulk and way.getdump_error
    ]
    png = plots_dir / "holders.png"
    plot(plot_rows, png, count)
    caption = (
        f"{count} memfds stored and retrieved end to end, median of {repeat} repetitions "
        "(ways taking turns), in milliseconds; ratios against the socket-pair floor of the "
        "same run; process starts per store and retrieve of all the fds"
    )
    if notes:
        caption += f"; s6-fdholder-getdump of {count} fds failed ({notes[0]}), so the bulk "
        caption += "row retrieves one fd per tool run"
    columns = ["way", "fds come back to", "process starts", "store ms", "hand-over ms",
               "retrieve ms", "total ms", "store / floor", "retrieve / floor", "total / floor",
               "fds back intact"]  # fmt: skip
    path = resultfile.write(
        results_dir,
        stem,
        "fd holders: s6-fdholder, systemd's fd store and luod",
        machine,
        [resultfile.table(caption, columns, table_rows)],
        goals,
        [png],
    )
    print(f"results: {resultfile.shown_path(path)}")


if __name__ == "__main__":
    main()
