"""The keeper: a small process that holds a copy of every preserved fd.

Without systemd's fd store, luod starts a keeper (on by default,
``--keeper off`` turns it off): the installed code (``python -P -m
liveupdate.server.keeper``), in ``/``, with the environment luod builds for
its children, in a session of its own (a signal to luod's process group
does not reach it) and without a parent-death signal. It listens on
``STATE_DIR/keeper.sock`` (mode 0600, bound by luod in its checked state
directory and inherited) and serves one kind of peer: a process of its own
euid (``SO_PEERCRED``); anybody else is hung up on.

luod sends it, on its loop's idle hook, the new fds, the state (a sealed
memfd, see :mod:`liveupdate.server.fdstore`) and the names it no longer
holds; between two such snapshots, *deltas*: one message with the new fds,
a line of delta records (kept as text, in order, never parsed here) and the
names no longer held. A luod started after luod died asks for everything
back (``fetch``: what its predecessor queued is read first, then the
snapshot, the deltas and the fds are given back) and rebuilds its sessions
from it. ``stop`` (a clean stop of luod) closes
everything and ends the keeper.

Every message is one ``SOCK_SEQPACKET`` datagram: a JSON object, and at most
253 fds (``SCM_RIGHTS``). Fds are received close-on-exec; a truncated
message, bad JSON or an unknown operation hangs up on the sender and closes
what it sent: the keeper never dies of its input.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import selectors
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence

from liveupdate import wire
from liveupdate.core.luo import sealed_memfd
from liveupdate.core.policy import Limits, fd_reserve
from liveupdate.server.fdstore import STATE_MEMFD_NAME, Copies
from liveupdate.uapi import LuodCopies

__all__ = [
    "KEEPER_PID",
    "KEEPER_SOCKET",
    "MAX_FDS",
    "Keeper",
    "KeeperCopies",
    "is_keeper",
    "keeper_main",
    "nofile_hard_limit",
    "start_keeper",
]

KEEPER_SOCKET = "keeper.sock"
#: The keeper's pid, as luod last learnt it, in the state directory: a luod
#: that only reconnects (the next generation of a live update) reads it there.
KEEPER_PID = "keeper.pid"
#: What ``ps``/``pgrep`` show for the keeper.
PROCESS_NAME = b"luo-keeper"
#: fds per SCM_RIGHTS message (the kernel's SCM_MAX_FD).
MAX_FDS = 253
#: Largest message (JSON header) accepted.
MAX_MESSAGE = 1 << 20
#: Largest delta log kept after a snapshot (luod sends a snapshot long before).
MAX_DELTA_LOG = 64 << 20
_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)


def send(sock: socket.socket, header: Mapping[str, object], fds: Sequence[int] = ()) -> None:
    """One message: ``header`` as JSON and up to :data:`MAX_FDS` fds."""
    sock.sendmsg([json.dumps(header).encode()], wire.rights(fds))


def receive(
    sock: socket.socket, nowait: bool = False
) -> tuple[dict[str, object], list[int]] | None:
    """One message (``None``: the peer hung up); :class:`ValueError` when it is
    malformed (its fds are closed); ``nowait``: :class:`BlockingIOError` when
    none is queued."""
    recv_flags = socket.MSG_CMSG_CLOEXEC | (socket.MSG_DONTWAIT if nowait else 0)
    data, ancdata, flags, _addr = sock.recvmsg(MAX_MESSAGE, _CMSG_SPACE, recv_flags)
    fds = wire.fds_of(ancdata)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise ValueError("a truncated message")
        if not data:
            if fds:
                raise ValueError("fds without a message")
            return None
        header = json.loads(data)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise
    return header, fds


def _peer_is_ours(sock: socket.socket) -> bool:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.geteuid())


class Keeper:
    """The keeper's state and loop: the files by name, and the state memfd."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.files: dict[str, int] = {}
        self.state_fd = -1
        #: The deltas sent since the snapshot in :attr:`state_fd`, in order.
        self.deltas: list[str] = []
        self.delta_bytes = 0
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ)
        #: Per connection doing a full resync: the names it sent.
        self.resync: dict[int, set[str]] = {}
        self.stopped = False

    def serve(self) -> None:
        while not self.stopped:
            for key, _mask in self.selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    self._accept()
                else:
                    self._serve(sock)
        self.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        try:
            if not _peer_is_ours(conn):
                conn.close()
                return
        except OSError:
            conn.close()
            return
        self.selector.register(conn, selectors.EVENT_READ)

    def _hang_up(self, sock: socket.socket) -> None:
        self.resync.pop(sock.fileno(), None)
        self.selector.unregister(sock)
        sock.close()

    def _serve(self, sock: socket.socket) -> None:
        """Every message queued on ``sock`` (luod sends one per change and
        does not wait for the keeper: a wake-up serves them all)."""
        fds: list[int] = []
        try:
            nowait = False
            while not self.stopped:
                try:
                    message = receive(sock, nowait)
                except BlockingIOError:
                    return
                if message is None:
                    self._hang_up(sock)
                    return
                header, fds = message
                self._handle(sock, header, fds)
                fds = []
                nowait = True
        except Exception:  # bad input ends that connection, never the keeper
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._hang_up(sock)

    def _handle(self, sock: socket.socket, header: dict[str, object], fds: list[int]) -> None:
        op = header.get("op")
        if op == "add":
            self._add(sock, header, fds)
        elif op == "delta":
            # Checked whole before anything is applied: fds, then the record,
            # then the removals, as luod made them.
            line, removes = header.get("line"), header.get("removes", [])
            if not isinstance(line, str) or "\n" in line or not line:
                raise ValueError("a delta is one line")
            if not isinstance(removes, list):
                raise ValueError("removes is not a list")
            if self.state_fd < 0:
                raise ValueError("a delta before any snapshot")
            if self.delta_bytes + len(line) > MAX_DELTA_LOG:
                raise ValueError("the delta log is full")
            self._add(sock, header, fds)
            self.deltas.append(line)
            self.delta_bytes += len(line) + 1
            self._remove([n for n in removes if isinstance(n, str)])
        elif op == "begin":
            if fds:
                raise ValueError("fds with begin")
            self.resync[sock.fileno()] = set()
        elif op == "commit":
            if len(fds) != 1:
                raise ValueError("commit needs the state fd")
            old_state, self.state_fd = self.state_fd, fds.pop()
            if old_state >= 0:
                os.close(old_state)
            self.deltas.clear()  # the snapshot includes them
            self.delta_bytes = 0
            seen = self.resync.pop(sock.fileno(), None)
            if seen is not None:
                self._remove([n for n in self.files if n not in seen])
        elif op == "remove":
            names = header.get("names")
            if fds or not isinstance(names, list):
                raise ValueError("remove takes names")
            self._remove([n for n in names if isinstance(n, str)])
        elif op == "fetch":
            if fds:
                raise ValueError("fds with fetch")
            self._drain_others(sock)
            self._give_back(sock)
        elif op == "stop":
            if fds:
                raise ValueError("fds with stop")
            self.stopped = True
            send(sock, {"op": "stopped"})
        else:
            raise ValueError(f"unknown operation {op!r}")

    def _drain_others(self, asker: socket.socket) -> None:
        """Apply what a dead luod sent and the keeper had not read yet: its
        messages stay queued on its connection after it died (with their
        fds), and a fetch must not give back the state before them."""
        for key in list(self.selector.get_map().values()):
            other = key.fileobj
            if other is self.listener or other is asker or not isinstance(other, socket.socket):
                continue
            self._serve(other)

    def _add(self, sock: socket.socket, header: dict[str, object], fds: list[int]) -> None:
        names = header.get("names", [])
        if not isinstance(names, list) or len(names) != len(fds):
            raise ValueError("names do not match the fds")
        if not all(isinstance(name, str) for name in names):
            raise ValueError("a name is not a string")
        seen = self.resync.get(sock.fileno())
        for name, fd in zip(names, fds, strict=True):
            old = self.files.get(name)
            self.files[name] = fd
            if old is not None:
                os.close(old)
            if seen is not None:
                seen.add(name)
        fds.clear()

    def _remove(self, names: list[str]) -> None:
        for name in names:
            fd = self.files.pop(name, None)
            if fd is not None:
                os.close(fd)

    def _give_back(self, sock: socket.socket) -> None:
        send(
            sock, {"op": "state", "pid": os.getpid()}, [self.state_fd] if self.state_fd >= 0 else []
        )
        for line in self.deltas:
            send(sock, {"op": "delta", "line": line})
        items = list(self.files.items())
        for start in range(0, len(items), MAX_FDS):
            batch = items[start : start + MAX_FDS]
            send(sock, {"op": "fds", "names": [n for n, _ in batch]}, [fd for _, fd in batch])
        send(sock, {"op": "end", "files": len(items)})

    def close(self) -> None:
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1
        for key in list(self.selector.get_map().values()):
            obj = key.fileobj
            if isinstance(obj, socket.socket):
                obj.close()
        self.selector.close()


def _name_process(name: bytes) -> None:
    """``/proc/PID/comm``: not ``python``, and not ``luod`` (``pgrep luod`` finds luod alone)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def keeper_main(argv: Sequence[str]) -> int:
    """``python -P -m liveupdate.server.keeper FD``: keep until told to stop."""
    try:
        (listen_fd,) = (int(a) for a in argv)
    except ValueError:
        print("usage: keeper LISTEN_FD", file=sys.stderr)
        return 2
    _name_process(PROCESS_NAME)
    # Every copy costs the keeper an fd, as every file costs luod one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(fileno=listen_fd)
    os.set_inheritable(listen_fd, False)
    Keeper(listener).serve()
    return 0


def start_keeper(dir_fd: int, env: Mapping[str, str]) -> int:
    """Bind ``keeper.sock`` in the state directory (fd ``dir_fd``) and start a
    keeper on it; its pid. A stale socket file is replaced."""
    path = f"/proc/self/fd/{dir_fd}/{KEEPER_SOCKET}"
    try:
        os.unlink(KEEPER_SOCKET, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old_umask = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old_umask)
    try:
        listener.listen(16)
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "liveupdate.server.keeper", str(listener.fileno())],
            cwd="/",
            env=dict(env),
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        listener.close()
    return proc.pid


def is_keeper(pid: int) -> bool:
    """Whether ``pid`` is a keeper now (a pid read from a file may have been reused)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as comm:
            return comm.read().strip() == PROCESS_NAME
    except OSError:
        return False


def nofile_hard_limit(pid: int) -> int | None:
    """The hard ``RLIMIT_NOFILE`` of process ``pid`` (``None``: unlimited or unreadable)."""
    with open(f"/proc/{pid}/limits", encoding="ascii") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                hard = line[len("Max open files") :].split()[1]
                return int(hard) if hard.isdigit() else None
    return None


def connect_keeper(dir_fd: int) -> socket.socket | None:
    """A connection to the keeper of this state directory (``None``: none
    listens); :class:`PermissionError` when another user listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(f"/proc/self/fd/{dir_fd}/{KEEPER_SOCKET}")
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    if not _peer_is_ours(sock):
        sock.close()
        raise PermissionError(errno.EPERM, f"{KEEPER_SOCKET} is another user's")
    return sock


class KeeperCopies(Copies):
    """The copies in the keeper process."""

    name = "keeper"
    kind = LuodCopies.KEEPER
    deltas = True

    def __init__(self, sock: socket.socket, pid: int, writer: str = "") -> None:
        super().__init__(writer)
        self.sock = sock
        self.pid = pid

    def fetch(self) -> tuple[bytes | None, dict[str, int]]:
        """Everything the keeper holds: the state (``None``: none yet) and its
        fds by name (the caller's to close)."""
        from liveupdate.server.fdstore import read_memfd

        files: dict[str, int] = {}
        state: bytes | None = None
        deltas: list[bytes] = []
        send(self.sock, {"op": "fetch"})
        try:
            while True:
                message = receive(self.sock)
                if message is None:
                    raise OSError(errno.ECONNRESET, "the keeper hung up")
                header, fds = message
                if header.get("op") == "state":
                    pid = header.get("pid")
                    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
                        self.pid = pid
                    for fd in fds:
                        state = read_memfd(fd)
                        os.close(fd)
                elif header.get("op") == "delta":
                    line = header.get("line")
                    if fds or not isinstance(line, str) or "\n" in line:
                        for fd in fds:
                            os.close(fd)
                        raise OSError(errno.EPROTO, "the keeper sent a bad delta")
                    deltas.append(line.encode())
                elif header.get("op") == "fds":
                    names = header.get("names")
                    if not isinstance(names, list) or len(names) != len(fds):
                        for fd in fds:
                            os.close(fd)
                        raise OSError(errno.EPROTO, "the keeper sent names that do not match")
                    files.update(zip((str(n) for n in names), fds, strict=True))
                elif header.get("op") == "end":
                    if state is not None and deltas:
                        # The snapshot, then its delta log (fdstore._parse).
                        state += b"".join(line + b"\n" for line in deltas)[:-1]
                    return state, files
        except BaseException:
            for fd in files.values():
                os.close(fd)
            raise

    def capacity(self, limits: Limits) -> tuple[int, str] | None:
        """The keeper's own ``RLIMIT_NOFILE`` (its hard limit: it raises its
        soft one to it), less the reserve luod keeps in its own table, read
        from ``/proc`` at the keeper's pid: a keeper that outlived a crash may
        run under another limit than the luod started again. ``None`` while
        its pid is not known (``SO_PEERCRED`` names whoever bound the socket:
        luod, not the keeper)."""
        if self.pid <= 0 or not is_keeper(self.pid):
            return None
        try:
            limit = nofile_hard_limit(self.pid)
        except OSError:
            return None
        if limit is None:
            return None
        return limit - fd_reserve(limits, limit), f"the keeper's RLIMIT_NOFILE of {limit}"

    def _send(self, adds: dict[str, int], state: bytes, removes: list[str], full: bool) -> None:
        if full:
            send(self.sock, {"op": "begin"})
        items = list(adds.items())
        for start in range(0, len(items), MAX_FDS):
            batch = items[start : start + MAX_FDS]
            send(self.sock, {"op": "add", "names": [n for n, _ in batch]}, [fd for _, fd in batch])
        memfd = sealed_memfd(state, STATE_MEMFD_NAME)
        try:
            send(self.sock, {"op": "commit"}, [memfd])
        finally:
            os.close(memfd)
        for start in range(0, len(removes), 1000):
            send(self.sock, {"op": "remove", "names": removes[start : start + 1000]})

    def _send_delta(self, adds: dict[str, int], line: bytes, removes: list[str]) -> None:
        items = list(adds.items())
        last = max(0, len(items) - MAX_FDS)  # the last fds travel with the delta
        for start in range(0, last, MAX_FDS):
            batch = items[start : min(start + MAX_FDS, last)]
            send(self.sock, {"op": "add", "names": [n for n, _ in batch]}, [fd for _, fd in batch])
        batch = items[last:]
        header: dict[str, object] = {"op": "delta", "line": line.decode()}
        if batch:
            header["names"] = [n for n, _ in batch]
        if len(removes) <= 1000:
            header["removes"] = removes
        send(self.sock, header, [fd for _, fd in batch])
        if len(removes) > 1000:
            for start in range(0, len(removes), 1000):
                send(self.sock, {"op": "remove", "names": removes[start : start + 1000]})

    def stop(self) -> None:
        try:
            send(self.sock, {"op": "stop"})
            self.sock.settimeout(5)
            receive(self.sock)
        except (OSError, ValueError):
            pass
        self.sock.close()
        try:
            os.waitpid(self.pid, 0)  # our child, unless a live update came between
        except ChildProcessError:
            pass

    def close(self) -> None:
        self.sock.close()


if __name__ == "__main__":
    sys.exit(keeper_main(sys.argv[1:]))
