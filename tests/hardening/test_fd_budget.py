"""The fd budget (issue 11, item 1): with the crash copies on, every preserved
file costs two fds, one in luod and one in the copies, and luod accepts no
file the copies could not hold.

systemd drops, and only logs, an fd beyond ``FileDescriptorStoreMax=``; a
keeper that outlived a crash may run under a smaller ``RLIMIT_NOFILE`` than the
luod started again. Either way a file luod accepted would have no copy and a
crash would lose it without a word, so PRESERVE_FD answers ``ENOSPC`` at the
copies' limit (root included), says which limit, and GET_STATE says what a file
costs.
"""

from __future__ import annotations

import array
import os
import resource
import signal
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

import liveupdate
from luodtest import Luod, events, memfd, state, wait_for

pytestmark = pytest.mark.luod_only

#: ``FileDescriptorStoreMax=`` of the tiny store: two slots for the state, four files.
STORE_MAX = 6


class TinyFdStore:
    """The service manager's fd store, as small as a unit may make it: keeps the
    fds sent with ``FDSTORE=1`` under their ``FDNAME=``, drops those of a name
    on ``FDSTOREREMOVE=1``, and refuses (closes, counts) any beyond ``STORE_MAX``,
    as systemd does."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind("\0" + address[1:])
        self.sock.settimeout(0.05)
        self.lock = threading.Lock()
        self.store: dict[str, list[int]] = {}
        self.refused = 0
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def held(self) -> int:
        with self.lock:
            return sum(len(fds) for fds in self.store.values())

    def _serve(self) -> None:
        room = socket.CMSG_SPACE(253 * 4)
        while not self._stop.is_set():
            try:
                data, ancdata, _flags, _ = self.sock.recvmsg(65536, room, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            lines = data.decode(errors="replace").split("\n")
            fields = dict(line.split("=", 1) for line in lines if "=" in line)
            name = fields.get("FDNAME", "stored")
            with self.lock:
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(name, []):
                        os.close(fd)
                for fd in fds:
                    if fields.get("FDSTORE") == "1" and self.held_locked() < STORE_MAX:
                        self.store.setdefault(name, []).append(fd)
                    else:
                        self.refused += fields.get("FDSTORE") == "1"
                        os.close(fd)
                self.most = max(self.most, self.held_locked())

    def held_locked(self) -> int:
        return sum(len(fds) for fds in self.store.values())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)


@pytest.fixture
def fd_store(tmp_path: object) -> Iterator[TinyFdStore]:
    store = TinyFdStore(f"@luod-fd-budget-{os.getpid()}-{id(tmp_path)}")
    yield store
    store.close()


def test_luod_accepts_no_file_beyond_what_the_fd_store_holds(
    luod_factory: Callable[..., Luod], fd_store: TinyFdStore
) -> None:
    daemon = luod_factory(start=False)
    daemon.env.update(NOTIFY_SOCKET=fd_store.address, FDSTORE=str(STORE_MAX))
    daemon.start()
    info = state(daemon)
    assert (info.copies, info.copies_error, info.fds_per_file) == ("fdstore", 0, 2)
    files = STORE_MAX - 2
    with daemon.open() as dev:
        session = dev.create_session("budget")
    for token in range(files):
        fd = memfd(b"x")
        session.preserve(fd, token)
        os.close(fd)
    fd = memfd(b"one too many")
    with pytest.raises(liveupdate.NoSpaceError) as refused:
        session.preserve(fd, files)
    assert "crash copies" in str(refused.value)
    (full,) = events(daemon, "copies-full")
    assert full["files"] == STORE_MAX - 2 and "FileDescriptorStoreMax=6" in full["bound"]
    # Room again once a file goes: the budget follows what is held.
    session.unpreserve(0)
    session.preserve(fd, files)
    os.close(fd)
    # Every file luod holds has its copy; the store never had to refuse one.
    wait_for(lambda: fd_store.held() == STORE_MAX - 1, "the copies", daemon=daemon)
    assert fd_store.refused == 0 and fd_store.most <= STORE_MAX
    assert state(daemon).copies_error == 0
    session.close()


def test_a_keeper_left_with_a_smaller_limit_bounds_what_luod_accepts(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    (keeper,) = daemon.keeper_pids()
    daemon.stop(signal.SIGKILL)  # a crash: the keeper stays, holding the copies
    limit = 100
    resource.prlimit(keeper, resource.RLIMIT_NOFILE, (limit, limit))
    daemon.log = daemon.state_dir / "restarted.log"
    daemon.start()  # reconnects to that keeper
    assert daemon.keeper_pids() == [keeper]
    info = state(daemon)
    assert info.fd_limit > limit and info.copies == "keeper"
    room = limit - min(64, limit // 4)
    with daemon.open() as dev:
        session = dev.create_session("budget")
    for token in range(room):
        fd = memfd(b"x")
        session.preserve(fd, token)
        os.close(fd)
    fd = memfd(b"one too many")
    with pytest.raises(liveupdate.NoSpaceError):
        session.preserve(fd, room)
    os.close(fd)
    (full,) = events(daemon, "copies-full")
    assert full["files"] == room and f"RLIMIT_NOFILE of {limit}" in full["bound"]
    # What was accepted, the keeper holds: no copy failed.
    wait_for(lambda: state(daemon).copies_error == 0, "healthy copies", daemon=daemon)
    session.close()


def test_without_copies_there_is_no_copy_budget(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory("--keeper", "off")
    info = state(daemon)
    assert (info.copies, info.fds_per_file) == ("off", 1)
    with daemon.open() as dev:
        session = dev.create_session("budget")
    for token in range(STORE_MAX + 10):
        fd = memfd(b"x")
        session.preserve(fd, token)
        os.close(fd)
    assert state(daemon).preserved_files == STORE_MAX + 10
    session.close()
