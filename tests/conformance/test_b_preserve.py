"""Conformance section B: preserving files, in one generation.

Every scenario of ``conformance.md`` section B is one test here, named after
its id. They use the client library only, with real memfds and pipes, so they
run unchanged against luod and against a kernel's ``/dev/liveupdate``
(``LIVEUPDATE_TEST_DEVICE``). Memfd data is always written *before* the file
is preserved: Linux locks a preserved memfd's size (EPERM on growth).

Documented differences (``semantics.md``):

* B9 needs a reboot to show the file is still held; here only the daemon's
  side is checked (its ``/proc/PID/fd``), so it is ``luod_only``.
* B11: Linux has no per-session file limit: ``luod_only`` (``--max-files 8``).
* B12: the daemon's fd count is luod's; on a kernel only the sessions count.
* B15: Linux has no handler for pipes (ENOENT); luod preserves them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator

import pytest
from _env import (
    Fds,
    RawConn,
    assert_errno,
    daemon_fds,
    ename,
    errno_of,
    on_kernel,
    read_all,
    struct_buffer,
)

import liveupdate
from liveupdate import uapi, wire
from luodtest import Luod, wait_until

OpenDev = Callable[..., liveupdate.Device]
Names = Callable[[str], str]


@pytest.fixture
def session(open_dev: OpenDev, stack: contextlib.ExitStack, names: Names) -> liveupdate.Session:
    """One outgoing session (the device is closed again at once, as a service would)."""
    with open_dev() as dev:
        return stack.enter_context(dev.create_session(names("s")))


def preserve(session: liveupdate.Session, fd: int, token: int) -> int:
    """PRESERVE_FD through ``Session.ioctl``: the ioctl's return value, or its errno."""
    arg = struct_buffer(uapi.PRESERVE_FD, fd=fd, token=token)
    try:
        ret = session.ioctl(uapi.LIVEUPDATE_SESSION_PRESERVE_FD, arg)
    except OSError as exc:
        assert exc.errno is not None
        return exc.errno
    # The 16-byte struct comes back unchanged.
    assert arg == struct_buffer(uapi.PRESERVE_FD, fd=fd, token=token)
    return ret


@contextlib.contextmanager
def nofile_at_least(n: int) -> Iterator[None]:
    """Raise this process's RLIMIT_NOFILE soft limit for a test that holds many fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs {n} fds, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------------------


def test_b1_preserved_memfd_keeps_its_data(session: liveupdate.Session, fds: Fds) -> None:
    fd = fds.memfd(b"hello liveupdate")
    assert preserve(session, fd, 0x1234) == 0
    # The caller's fd stays valid and usable while preserved...
    assert read_all(fd) == b"hello liveupdate"
    session.close()
    # ...and after the session (and its reference) is gone.
    assert read_all(fd) == b"hello liveupdate"


def test_b2_two_memfds_in_one_session(session: liveupdate.Session, fds: Fds) -> None:
    a = fds.memfd(b"first file: " + b"A" * 100)
    b = fds.memfd(b"second file: " + b"B" * 5000)
    assert preserve(session, a, 0xAAAA) == 0
    assert preserve(session, b, 0xBBBB) == 0
    assert read_all(a) == b"first file: " + b"A" * 100
    assert read_all(b) == b"second file: " + b"B" * 5000
    session.close()
    assert read_all(a) == b"first file: " + b"A" * 100
    assert read_all(b) == b"second file: " + b"B" * 5000


def test_b3_two_sessions_with_data_and_empty_memfds(
    open_dev: OpenDev, stack: contextlib.ExitStack, fds: Fds, names: Names
) -> None:
    with open_dev() as dev:
        s1 = stack.enter_context(dev.create_session(names("one")))
        s2 = stack.enter_context(dev.create_session(names("two")))
    files = {
        (s1, 0x10): fds.memfd(b"session one data"),
        (s1, 0x11): fds.memfd(),
        (s2, 0x20): fds.memfd(b"session two data"),
        (s2, 0x21): fds.memfd(),
    }
    results = [preserve(s, fd, token) for (s, token), fd in files.items()]
    assert results == [0, 0, 0, 0]
    assert read_all(files[(s1, 0x10)]) == b"session one data"
    assert read_all(files[(s2, 0x20)]) == b"session two data"
    assert os.fstat(files[(s1, 0x11)]).st_size == os.fstat(files[(s2, 0x21)]).st_size == 0


def test_b4_dev_null_has_no_handler(session: liveupdate.Session, fds: Fds) -> None:
    fd = fds.open("/dev/null", os.O_RDWR)
    assert preserve(session, fd, 0xDEAD) == errno.ENOENT
    # Nothing was taken: the token is still free.
    assert preserve(session, fds.memfd(b"x"), 0xDEAD) == 0


def test_b5_a_file_is_preserved_once(
    open_dev: OpenDev, stack: contextlib.ExitStack, fds: Fds, names: Names
) -> None:
    with open_dev() as dev:
        s1 = stack.enter_context(dev.create_session(names("one")))
        s2 = stack.enter_context(dev.create_session(names("two")))
    fd = fds.memfd(b"only once")
    assert preserve(s1, fd, 0x1111) == 0
    assert preserve(s2, fd, 0x2222) == errno.EBUSY
    assert preserve(s1, fd, 0x3333) == errno.EBUSY
    # "The same file" is the inode, whatever fd names it.
    dup = fds.add(os.dup(fd))
    assert preserve(s2, dup, 0x4444) == errno.EBUSY


# Closing a session fd travels to luod as an EOF it reads later, while Linux's
# close is synchronous. Before answering EEXIST or EBUSY because of a session,
# luod checks whether its fd was closed meanwhile and releases it first
# (Orchestrator.released_meanwhile): the tests below pin the order with SIGSTOP.


def test_b5_closing_a_session_releases_its_file_and_name_at_once(
    open_dev: OpenDev, stack: contextlib.ExitStack, fds: Fds, names: Names
) -> None:
    # semantics.md: closing an outgoing session unpreserves its files and
    # frees its name; the next call must see that, as with Linux's close().
    with open_dev() as dev:
        keeper = stack.enter_context(dev.create_session(names("keeper")))
        for round_ in range(50):
            fd = fds.memfd(b"round %d" % round_)
            session = dev.create_session(names("again"))
            session.preserve(fd, 1)
            session.close()
            assert preserve(keeper, fd, 0x1000 + round_) == 0, f"round {round_}: EBUSY"
            fds.close(fd)
            again = errno_of(lambda: dev.create_session(names("again")).close())
            assert again == 0, f"round {round_}: {ename(again)} right after close"


@contextlib.contextmanager
def stopped(daemon: Luod) -> Iterator[None]:
    """Freeze luod while requests and closes pile up, to fix the order it sees them in.

    luod's loop serves the endpoints epoll reports, in the order they became
    ready, and reads each one dry; so a request queued on a connection that
    was already readable is answered before a close that came after it. The
    last call before the stop must be on the connection written to first:
    luod may still be reading that one when it is stopped.
    """
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(daemon.pid, signal.SIGCONT)


@pytest.mark.luod_only
def test_b5_luod_name_is_free_right_after_close(luod: Luod, names: Names) -> None:
    create = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
    with RawConn.open_device(luod.socket) as dev:
        session = dev.create_session(names("n"))
        with stopped(luod):
            dev.send(wire.encode_request(0xBA02, b""))  # the device is readable first
            session.close()  # then the close...
            dev.send(
                wire.encode_request(create, struct_buffer(uapi.CREATE_SESSION, name=names("n")))
            )
        assert dev.reply()[0] == -errno.ENOTTY
        ret, _out, got = dev.reply()
        wire.close_fds(got)
        assert ret == 0, f"CREATE_SESSION right after the close of that name: {ename(-ret)}"


@pytest.mark.luod_only
def test_b5_luod_file_is_free_right_after_close(luod: Luod, fds: Fds, names: Names) -> None:
    get_name = uapi.LIVEUPDATE_SESSION_GET_NAME
    preserve_fd = uapi.LIVEUPDATE_SESSION_PRESERVE_FD
    with RawConn.open_device(luod.socket) as dev, dev.create_session(names("keep")) as keeper:
        fd = fds.memfd(b"moves from one session to the other")
        first = dev.create_session(names("first"))
        arg = struct_buffer(uapi.PRESERVE_FD, fd=fd, token=1)
        assert first.call(preserve_fd, arg, [fd]) == (0, bytes(arg))
        # Last call before the stop on `keeper`: luod is idle or still reading it.
        assert keeper.call(get_name, struct_buffer(uapi.GET_NAME))[0] == 0
        with stopped(luod):
            keeper.send(wire.encode_request(get_name, struct_buffer(uapi.GET_NAME)))
            first.close()
            keeper.send(wire.encode_request(preserve_fd, arg), [fd])
        assert keeper.reply()[0] == 0
        ret = keeper.reply()[0]
        assert ret == 0, f"PRESERVE_FD right after the close of its session: {ename(-ret)}"


def test_b6_duplicate_token_in_a_session_is_eexist(session: liveupdate.Session, fds: Fds) -> None:
    a, b = fds.memfd(b"a"), fds.memfd(b"b")
    assert preserve(session, a, 0x66) == 0
    assert preserve(session, b, 0x66) == errno.EEXIST
    # The token check comes first, even before the fd is looked at.
    assert preserve(session, -1, 0x66) == errno.EEXIST
    assert preserve(session, b, 0x67) == 0


def test_b7_same_token_in_two_sessions(
    open_dev: OpenDev, stack: contextlib.ExitStack, fds: Fds, names: Names
) -> None:
    with open_dev() as dev:
        s1 = stack.enter_context(dev.create_session(names("one")))
        s2 = stack.enter_context(dev.create_session(names("two")))
    assert preserve(s1, fds.memfd(b"1"), 0x77) == 0
    assert preserve(s2, fds.memfd(b"2"), 0x77) == 0


def test_b8_extreme_tokens(session: liveupdate.Session, fds: Fds) -> None:
    assert preserve(session, fds.memfd(b"zero"), 0) == 0
    assert preserve(session, fds.memfd(b"max"), 2**64 - 1) == 0
    # Through the high-level API as well.
    session.preserve(fds.memfd(b"max-1"), 2**64 - 2)


@pytest.mark.luod_only
def test_b9_orchestrator_holds_its_own_reference(luod: Luod, fds: Fds, names: Names) -> None:
    marker = f"b9-held-{os.getpid()}"
    with luod.open() as dev, dev.create_session(names("s")) as session:
        fd = fds.memfd(b"still here", name=marker)
        session.preserve(fd, 0xB9)

        def held() -> list[str]:
            return [t for t in daemon_fds(luod.pid).values() if marker in t]

        assert len(held()) == 1
        count = luod.fd_count()
        fds.close(fd)  # the caller's own fd
        time.sleep(0.05)
        assert luod.fd_count() == count
        assert len(held()) == 1, "luod dropped the file when the caller closed its fd"
        # (That it is still there after a reboot is a section C scenario.)
    # Closing the session is what releases it.
    assert wait_until(lambda: not held())


def test_b10_retrieve_or_finish_on_an_outgoing_session_is_einval(
    session: liveupdate.Session, fds: Fds
) -> None:
    session.preserve(fds.memfd(b"x"), 1)
    assert_errno(lambda: session.retrieve(1), errno.EINVAL)
    assert_errno(lambda: session.retrieve(0x404), errno.EINVAL)
    assert_errno(session.finish, errno.EINVAL)
    # The session is unharmed.
    session.preserve(fds.memfd(b"y"), 2)


@pytest.mark.luod_only
def test_b11_session_file_limit_is_enospc(
    luod_factory: Callable[..., Luod], fds: Fds, names: Names
) -> None:
    daemon = luod_factory("--max-files", "8")
    with liveupdate.open_device(daemon.socket, timeout=5) as dev:
        full = dev.create_session(names("full"))
        other = dev.create_session(names("other"))
    with full, other:
        for token in range(8):
            assert preserve(full, fds.memfd(b"%d" % token), token) == 0
        assert preserve(full, fds.memfd(b"one too many"), 8) == errno.ENOSPC
        # The check order of semantics.md: a used token is EEXIST before ENOSPC.
        assert preserve(full, fds.memfd(b"dup"), 3) == errno.EEXIST
        # The limit is per session.
        assert preserve(other, fds.memfd(b"elsewhere"), 8) == 0


def test_b12_two_thousand_sessions(
    open_dev: OpenDev, names: Names, request: pytest.FixtureRequest
) -> None:
    daemon: Luod | None = None if on_kernel() else request.getfixturevalue("luod")
    baseline = daemon.fd_count() if daemon is not None else 0
    sessions: list[liveupdate.Session] = []
    with nofile_at_least(2300), contextlib.ExitStack() as stack:
        with open_dev() as dev:
            for i in range(2000):
                sessions.append(stack.enter_context(dev.create_session(names(f"{i}"))))
        assert len({s.fileno() for s in sessions}) == 2000
        assert sessions[1999].get_name() == names("1999").encode()
        if daemon is not None:
            assert daemon.fd_count() >= baseline + 2000
    if daemon is not None:
        # luod handles the closes asynchronously (see test_b5_closing_...).
        assert wait_until(lambda: daemon.fd_count() == baseline), (
            f"luod holds {daemon.fd_count()} fds, {baseline} before"
        )
    # All closed: every name is free again.
    with open_dev() as dev:
        for i in (0, 999, 1999):
            dev.create_session(names(f"{i}")).close()


def test_b13_five_hundred_memfds_in_one_session(session: liveupdate.Session, fds: Fds) -> None:
    with nofile_at_least(800):
        files = [fds.memfd(b"file-data-%d" % n) for n in range(500)]
        results = [preserve(session, fd, n) for n, fd in enumerate(files)]
        assert results == [0] * 500
        session.close()
        assert [read_all(fd) for fd in files] == [b"file-data-%d" % n for n in range(500)]
        fds.close_all()


def test_b14_o_path_fd_is_ebadf(session: liveupdate.Session, fds: Fds) -> None:
    memfd = fds.memfd(b"reachable by O_PATH")
    path_fd = fds.open(f"/proc/self/fd/{memfd}", os.O_PATH)
    assert preserve(session, path_fd, 0x14) == errno.EBADF
    # No fd at all is EBADF too.
    assert preserve(session, -1, 0x14) == errno.EBADF
    # The file itself is fine: it is the O_PATH fd that is unusable.
    assert preserve(session, memfd, 0x14) == 0


def test_b15_pipe_ends_are_two_files(session: liveupdate.Session, fds: Fds) -> None:
    r, w = fds.pipe()
    results = [preserve(session, r, 0x150), preserve(session, w, 0x151)]
    again = preserve(session, r, 0x152)
    if on_kernel():
        # Linux has no handler for pipes.
        assert (results, again) == ([errno.ENOENT, errno.ENOENT], errno.ENOENT)
    else:
        assert (results, again) == ([0, 0], errno.EBUSY)
        # Both ends still work for the caller.
        os.write(w, b"through the pipe")
        assert os.read(r, 100) == b"through the pipe"
