"""``luod --compat=linux``: a real luod answering as Linux 7.3's /dev/liveupdate.

Each test pins one switched behaviour (docs/guides/linux-mode.md) against a
real luod child process, through the client library and real files; the
answers are those the kernel gave in ``../shared/kernel-vm``. The C programs'
line-by-line comparison with the kernel itself is
``tests/shim/test_conformance_compat.py``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from liveupdate.client.control import open_control
from liveupdate.paths import control_path_for
from luodtest import (
    REPO,
    TEST_COMPAT_ENV,
    TEST_DEVICE_ENV,
    Luod,
    errno_of,
    events,
    luoctl,
    luoctl_reboot,
    memfd,
    read_all,
    wait_until,
)

pytestmark = pytest.mark.luod_only

F_ADD_SEALS, F_GET_SEALS = 1033, 1034
F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE = 1, 2, 4, 8
SIZE_LOCK = F_SEAL_SHRINK | F_SEAL_GROW
#: What /proc shows for the memfd a Linux-exact luod hands back (Linux: "/ (deleted)").
RETRIEVED_LINK = "/memfd: (deleted)"


@pytest.fixture
def linux_luod(luod_factory: Callable[..., Luod]) -> Luod:
    return luod_factory("--compat", "linux")


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds the test opens, closed at teardown."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass


def seals(fd: int) -> int:
    return int(fcntl.fcntl(fd, F_GET_SEALS))


def sealable(data: bytes, fds: list[int]) -> int:
    fd = os.memfd_create("sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fds.append(fd)
    os.write(fd, data)
    return fd


def preserve_errno(session: liveupdate.Session, fd: int) -> int:
    """PRESERVE_FD's errno for ``fd`` (token: the fd's number)."""
    return errno_of(lambda: session.preserve(fd, fd))


def raw_ioctl(target: liveupdate.Device | liveupdate.Session, cmd: int) -> int:
    """The errno of ``cmd`` with a 72-byte argument whose ``size`` is 72."""
    buf = bytearray(72)
    buf[0] = 72
    return errno_of(lambda: target.ioctl(cmd, buf))


def test_the_started_event_names_the_mode(linux_luod: Luod, luod: Luod) -> None:
    assert [e["compat"] for e in events(linux_luod) if e["event"] == "started"] == ["linux"]
    assert [e["compat"] for e in events(luod) if e["event"] == "started"] == ["luod"]


def test_numbers_outside_linuxs_table_are_einval_inside_it_enotty(linux_luod: Luod) -> None:
    with linux_luod.open() as dev, dev.create_session("a7") as session:
        assert [raw_ioctl(dev, cmd) for cmd in (0xBA02, 0xBA7F, 0xBA40, 0xBB02)] == [
            errno.EINVAL
        ] * 4
        assert raw_ioctl(dev, 0xBB00) == errno.ENOTTY
        assert [raw_ioctl(session, cmd) for cmd in (0xBA44, 0xBA3F, 0xBA00)] == [errno.EINVAL] * 3
        assert raw_ioctl(session, 0xBB40) == errno.ENOTTY


def test_luods_extensions_are_einval_on_the_device_and_sessions(
    linux_luod: Luod, fds: list[int]
) -> None:
    with linux_luod.open() as dev, dev.create_session("ext") as session:
        assert errno_of(dev.get_state) == errno.EINVAL
        assert errno_of(dev.list_sessions) == errno.EINVAL
        assert errno_of(lambda: dev.set_event(uapi.LuodEvent.PREPARE)) == errno.EINVAL
        fd = memfd(b"kept")
        fds.append(fd)
        session.preserve(fd, 1)
        assert errno_of(lambda: session.set_flags(uapi.LUOD_SESSION_KEEP_ON_CLOSE)) == errno.EINVAL
        assert errno_of(lambda: session.unpreserve(1)) == errno.EINVAL
        assert errno_of(session.update) == errno.EINVAL
        assert errno_of(lambda: session.set_service(os.getpid())) == errno.EINVAL
        # Nothing the refused calls asked for happened: the file is still there.
        assert session.get_name() == b"ext"


def test_the_control_socket_keeps_the_extensions_for_luoctl(
    linux_luod: Luod, fds: list[int]
) -> None:
    with open_control(control_path_for(linux_luod.socket), 5.0) as control:
        assert control.get_state().state is uapi.LuodState.NORMAL
        names = [s.name for s in control.list_sessions().sessions]
    assert names == []
    result = luoctl(linux_luod.socket, "state")
    assert result.returncode == 0 and "normal" in result.stdout, result.stderr
    with linux_luod.open() as dev, dev.create_session("listed") as session:
        fd = memfd(b"x")
        fds.append(fd)
        session.preserve(fd, 7)
        result = luoctl(linux_luod.socket, "sessions")
        assert result.returncode == 0 and "listed" in result.stdout, result.stderr


def test_only_unlinked_shmem_files_are_preserved_the_rest_is_enoent(
    linux_luod: Luod, tmp_path: Path, fds: list[int]
) -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    a, b = (s.detach() for s in socket.socketpair())
    disk = os.open(tmp_path / "on-disk", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    fds.extend([r, w, a, b, disk, null, efd])
    refused = {"pipe": r, "socket": a, "file on disk": disk, "/dev/null": null, "eventfd": efd}
    accepted = {"memfd": memfd(b"m")}
    fds.append(accepted["memfd"])
    if os.path.isdir("/dev/shm"):  # tmpfs: Linux takes it once unlinked (i_nlink == 0)
        path = f"/dev/shm/luodtest-compat-{os.getpid()}"
        named = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fds.append(named)
        try:
            with linux_luod.open() as dev, dev.create_session("named") as session:
                assert preserve_errno(session, named) == errno.ENOENT
        finally:
            os.unlink(path)
        accepted["unlinked tmpfs file"] = named
        tmpfile = os.open("/dev/shm", os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        fds.append(tmpfile)
        accepted["O_TMPFILE on tmpfs"] = tmpfile
    with linux_luod.open() as dev, dev.create_session("kinds") as session:
        answers = {what: preserve_errno(session, fd) for what, fd in refused.items()}
        assert answers == {what: errno.ENOENT for what in refused}
        answers = {what: preserve_errno(session, fd) for what, fd in accepted.items()}
        assert answers == {what: 0 for what in accepted}


def test_a_preserved_sealable_memfd_cannot_change_size(linux_luod: Luod, fds: list[int]) -> None:
    fd = sealable(b"x" * 100, fds)
    with linux_luod.open() as dev, dev.create_session("lock") as session:
        session.preserve(fd, 1)
        assert errno_of(lambda: os.ftruncate(fd, 200)) == errno.EPERM
        assert errno_of(lambda: os.ftruncate(fd, 10)) == errno.EPERM
        assert errno_of(lambda: os.pwrite(fd, b"past", 100)) == errno.EPERM
        assert errno_of(lambda: os.posix_fallocate(fd, 90, 20)) == errno.EPERM
        assert os.pwrite(fd, b"inside", 10) == 6
        # The lock is visible as seals (Linux shows none: documented).
        assert seals(fd) == SIZE_LOCK


def test_a_memfd_that_forbids_seals_is_preserved_without_a_size_lock(
    linux_luod: Luod, fds: list[int]
) -> None:
    """What userspace cannot reproduce, pinned as documented."""
    fd = memfd(b"y" * 10)
    fds.append(fd)
    assert seals(fd) == F_SEAL_SEAL  # memfd_create without MFD_ALLOW_SEALING
    with linux_luod.open() as dev, dev.create_session("unlocked") as session:
        session.preserve(fd, 1)
        os.ftruncate(fd, 20)  # Linux: EPERM
    assert os.fstat(fd).st_size == 20


def test_the_size_lock_outlives_the_session_that_set_it(linux_luod: Luod, fds: list[int]) -> None:
    """Seals are permanent (Linux lifts its lock when the session closes): documented."""
    fd = sealable(b"z" * 10, fds)
    with linux_luod.open() as dev:
        with dev.create_session("gone") as session:
            session.preserve(fd, 1)
        again = dev.create_session("again")
        # Released once luod read the close: the file can be preserved again.
        assert wait_until(lambda: errno_of(lambda: again.preserve(fd, 2)) == 0)
        again.close()
    assert errno_of(lambda: os.ftruncate(fd, 20)) == errno.EPERM


def test_retrieved_memfds_are_new_unnamed_files_with_the_position_and_seals_of_preserve(
    linux_luod: Luod, fds: list[int]
) -> None:
    first = sealable(b"sealable memfd " * 100, fds)
    os.lseek(first, 7, os.SEEK_SET)
    plain = memfd(b"plain memfd")
    fds.append(plain)
    sealed = sealable(b"write-sealed", fds)
    fcntl.fcntl(sealed, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW)
    originals = {1: first, 2: plain, 3: sealed}
    contents = {token: read_all(fd) for token, fd in originals.items()}
    with linux_luod.open() as dev:
        session = dev.create_session("handed")
    with session:
        for token, fd in originals.items():
            session.preserve(fd, token)
        luoctl_reboot(linux_luod)
    with linux_luod.open() as dev, dev.retrieve_session("handed") as incoming:
        got = {token: incoming.retrieve(token) for token in originals}
        fds.extend(got.values())
        again = incoming.retrieve(1)
        fds.append(again)
        for token, fd in got.items():
            assert os.readlink(f"/proc/self/fd/{fd}") == RETRIEVED_LINK, token
            assert read_all(fd) == contents[token], token
            assert os.fstat(fd).st_ino != os.fstat(originals[token]).st_ino, token
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
            assert os.get_inheritable(fd) is False
        assert {token: seals(fd) for token, fd in got.items()} == {
            1: 0,
            2: F_SEAL_SEAL,
            3: F_SEAL_WRITE | F_SEAL_GROW,
        }
        assert os.lseek(got[1], 0, os.SEEK_CUR) == 7
        # RETRIEVE_FD again: the same open file (shared position).
        os.lseek(again, 3, os.SEEK_SET)
        assert os.lseek(got[1], 0, os.SEEK_CUR) == 3
        # No size lock once retrieved (Linux's new file has none).
        os.ftruncate(got[1], 1 << 16)
        # Still counts as preserved until FINISH (C21), by the new file's identity.
        with dev.create_session("c21") as other:
            assert errno_of(lambda: other.preserve(got[1], 9)) == errno.EBUSY
            incoming.finish()
            other.preserve(got[1], 9)


def test_a_sparse_memfd_comes_back_sparse(linux_luod: Luod, fds: list[int]) -> None:
    size, offset = 64 << 20, 32 << 20
    fd = sealable(b"", fds)
    os.ftruncate(fd, size)
    os.pwrite(fd, b"the only page of data", offset)
    with linux_luod.open() as dev:
        session = dev.create_session("sparse")
    with session:
        session.preserve(fd, 1)
        luoctl_reboot(linux_luod)
    with linux_luod.open() as dev, dev.retrieve_session("sparse") as incoming:
        got = incoming.retrieve(1)
        fds.append(got)
        assert os.fstat(got).st_size == size
        assert os.pread(got, 21, offset) == b"the only page of data"
        assert os.pread(got, 16, offset - 16) == bytes(16)
        assert os.fstat(got).st_blocks * 512 < 1 << 20  # not 64 MiB of zeros
        incoming.finish()


def test_the_mode_is_kept_across_live_updates(linux_luod: Luod, fds: list[int]) -> None:
    for _ in range(2):
        luoctl_reboot(linux_luod)
    r, w = os.pipe2(os.O_CLOEXEC)
    fds.extend([r, w])
    with linux_luod.open() as dev, dev.create_session("later") as session:
        assert raw_ioctl(dev, 0xBA02) == errno.EINVAL
        assert errno_of(dev.get_state) == errno.EINVAL
        assert errno_of(lambda: session.preserve(r, 1)) == errno.ENOENT


def test_luods_own_mode_keeps_its_contract(luod: Luod, fds: list[int]) -> None:
    """The same calls without ``--compat``: the contract's answers, files unlocked."""
    r, w = os.pipe2(os.O_CLOEXEC)
    fd = sealable(b"free", fds)
    fds.extend([r, w])
    with ExitStack() as stack:
        dev = stack.enter_context(luod.open())
        session = stack.enter_context(dev.create_session("own"))
        assert raw_ioctl(dev, 0xBA02) == errno.ENOTTY
        session.preserve(r, 1)
        session.preserve(fd, 2)
        os.ftruncate(fd, 100)
        assert seals(fd) == 0
        assert dev.get_state().state is uapi.LuodState.NORMAL


def test_the_option_is_handed_to_the_next_generation() -> None:
    from liveupdate.server.config import Config

    config = Config(socket_path="/run/x/device", compat="linux")
    assert config.linux_exact
    args = config.to_args()
    assert args[args.index("--compat") + 1] == "linux"
    assert Config.from_fields(config.to_fields()).linux_exact
    assert not Config(socket_path="/run/x/device").linux_exact


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: luod's sockets live below it
    (``sun_path`` holds 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="luoc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(600)
def test_the_python_conformance_suite_expects_linuxs_answers_from_linux_mode(
    short_tmp: Path,
) -> None:
    """``tests/conformance`` with ``LIVEUPDATE_TEST_COMPAT=linux``: every
    scenario that is not luod-only, each expecting what a kernel answers."""
    env = {k: v for k, v in os.environ.items() if k != TEST_DEVICE_ENV}
    env[TEST_COMPAT_ENV] = "linux"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not vm",
         "--basetemp", str(short_tmp / "t"), "tests/conformance"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
        check=False,
    )  # fmt: skip
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
