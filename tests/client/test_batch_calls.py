"""``Session.retrieve_many`` and ``Session.preserve_many``: pipelined batches.

Over luod's socket a batch sends its requests ahead of the replies and reads
the replies in order; these tests pin that it answers what the single calls
answer, that a failure in the middle raises the single call's exception
without leaking an fd or putting the stream out of step, and that a batch
far larger than the socket's buffer neither deadlocks nor loses a reply.
Everything runs against a real luod (the preserve tests also against a
kernel's device when ``LIVEUPDATE_TEST_DEVICE`` is set).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

import pytest

import liveupdate
from liveupdate.client.transport import BATCH_WINDOW, KernelTransport
from luodtest import Luod, memfd, read_all

#: More requests than luod's socket buffers hold at once (a few hundred
#: replies with an fd each): sent without a window, the batch would deadlock.
LARGE_BATCH = 1000


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """The test ends with exactly the fds it started with (its own closed)."""
    before = _open_fds()
    yield
    # listdir's own fd is gone by the time it returns: the sets compare directly.
    assert _open_fds() == before


def _handed_over(luod: Luod, name: str, contents: dict[int, bytes]) -> liveupdate.Session:
    """An incoming session ``name`` holding a memfd per ``{token: content}``."""
    with luod.open() as dev:
        outgoing = dev.create_session(name)
    for token, data in contents.items():
        fd = memfd(data)
        try:
            outgoing.preserve(fd, token)
        finally:
            os.close(fd)
    outgoing.update()  # hands the session over: it is incoming under the same name
    with luod.open() as dev:
        return dev.retrieve_session(name)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)


@pytest.mark.luod_only
def test_retrieve_many_gives_the_files_retrieve_gives(luod: Luod, no_fd_leak: None) -> None:
    contents = {token: f"file {token}".encode() for token in (3, 1, 7, 2**64 - 1)}
    with _handed_over(luod, "batch-retrieve", contents) as session:
        fds = session.retrieve_many(contents)
        try:
            assert list(fds) == list(contents)  # in the order asked
            assert {token: read_all(fd) for token, fd in fds.items()} == contents
            assert all(not os.get_inheritable(fd) for fd in fds.values())
            single = session.retrieve(7)
            try:
                assert os.path.samestat(os.fstat(single), os.fstat(fds[7]))
            finally:
                os.close(single)
        finally:
            _close_all(fds)
        assert session.retrieve_many([]) == {}


@pytest.mark.luod_only
def test_an_unknown_token_mid_batch_raises_not_found_and_closes_every_fd(
    luod: Luod, no_fd_leak: None
) -> None:
    contents = {1: b"one", 2: b"two", 3: b"three"}
    with _handed_over(luod, "batch-unknown", contents) as session:
        with pytest.raises(liveupdate.NotFoundError) as raised:
            session.retrieve_many([1, 99, 2, 98, 3])
        assert raised.value.errno == errno.ENOENT
        assert list(raised.value.failures) == [99, 98]
        assert all(e.errno == errno.ENOENT for e in raised.value.failures.values())
        # The stream is still in step: the next calls get their own answers.
        assert session.get_name() == b"batch-unknown"
        fds = session.retrieve_many([3, 2, 1])
        try:
            assert {token: read_all(fd) for token, fd in fds.items()} == contents
        finally:
            _close_all(fds)


@pytest.mark.luod_only
def test_retrieve_many_refuses_a_repeated_or_invalid_token_before_sending(
    luod: Luod, no_fd_leak: None
) -> None:
    with _handed_over(luod, "batch-checks", {1: b"x"}) as session:
        with pytest.raises(ValueError, match="twice"):
            session.retrieve_many([1, 1])
        with pytest.raises(ValueError, match="out of range"):
            session.retrieve_many([1, -1])
        with pytest.raises(TypeError):
            session.retrieve_many([1, True])
        assert session.get_name() == b"batch-checks"  # nothing was sent


def test_preserve_many_preserves_what_preserve_would(
    open_dev: Callable[..., liveupdate.Device], no_fd_leak: None
) -> None:
    with open_dev() as dev:
        session = dev.create_session("batch-preserve")
    files = {token: memfd(f"data {token}".encode()) for token in range(1, 6)}
    try:
        with session:
            session.preserve_many([(fd, token) for token, fd in files.items()])
            with pytest.raises(liveupdate.AlreadyExistsError):
                session.preserve(files[1], 1)  # as if preserved one by one
            fresh = memfd()
            try:
                with pytest.raises(liveupdate.AlreadyExistsError):
                    session.preserve(fresh, 3)
                session.preserve(fresh, 6)
            finally:
                os.close(fresh)
    finally:
        _close_all(files)


def test_a_duplicate_token_mid_batch_raises_already_exists_and_keeps_the_others(
    open_dev: Callable[..., liveupdate.Device], no_fd_leak: None
) -> None:
    with open_dev() as dev:
        session = dev.create_session("batch-duplicate")
    files = [memfd(b"a"), memfd(b"b"), memfd(b"c")]
    try:
        with session:
            session.preserve(files[0], 10)
            with pytest.raises(liveupdate.AlreadyExistsError) as raised:
                session.preserve_many([(files[1], 11), (files[2], 10), (files[2], 12)])
            assert raised.value.errno == errno.EEXIST
            assert list(raised.value.failures) == [10]
            # 11 and 12 went in despite the failure between them; the stream is in step.
            files.append(memfd(b"fresh"))
            for token in (11, 12):
                with pytest.raises(liveupdate.AlreadyExistsError):
                    session.preserve(files[-1], token)
            session.preserve(files[-1], 13)
    finally:
        for fd in files:
            os.close(fd)


def test_preserve_many_reports_a_bad_fd_as_preserve_does(
    open_dev: Callable[..., liveupdate.Device], no_fd_leak: None
) -> None:
    with open_dev() as dev:
        session = dev.create_session("batch-badfd")
    first, last = memfd(b"first"), memfd(b"last")
    closed = memfd()
    os.close(closed)  # a number that is no open fd
    try:
        with session:
            with pytest.raises(liveupdate.BadFileError) as raised:
                session.preserve_many([(first, 1), (closed, 2), (last, 3)])
            assert list(raised.value.failures) == [2]
            with pytest.raises(liveupdate.DeviceBusyError):
                session.preserve(last, 4)  # preserved already (under 3)
    finally:
        os.close(first)
        os.close(last)


@pytest.mark.luod_only
def test_a_batch_larger_than_the_socket_buffer_goes_through_whole(
    luod: Luod, no_fd_leak: None
) -> None:
    assert LARGE_BATCH > 4 * BATCH_WINDOW
    with luod.open() as dev:
        outgoing = dev.create_session("batch-large")
    sources = [memfd(str(token).encode()) for token in range(LARGE_BATCH)]
    try:
        outgoing.preserve_many([(fd, token) for token, fd in enumerate(sources)])
    finally:
        for fd in sources:
            os.close(fd)
    outgoing.update()
    with luod.open() as dev, dev.retrieve_session("batch-large") as session:
        tokens = list(range(LARGE_BATCH - 1, -1, -1))
        fds = session.retrieve_many(tokens)
        try:
            assert list(fds) == tokens
            assert all(read_all(fd) == str(token).encode() for token, fd in fds.items())
        finally:
            _close_all(fds)
        # A failure at the very end of a large batch still closes all that came before.
        with pytest.raises(liveupdate.NotFoundError):
            session.retrieve_many([*tokens, LARGE_BATCH])
        assert session.get_name() == b"batch-large"


def test_the_kernel_transport_loops_over_the_single_call(no_fd_leak: None) -> None:
    """Not a LUO device (no kernel here): each call fails on its own, all are made.

    ``/dev/null`` answers every ioctl ENOTTY, which is what the loop must
    report per call, exactly as ``ioctl()`` raises it.
    """
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        session = liveupdate.Session(fd, KernelTransport())
        with pytest.raises(liveupdate.NotSupportedError) as raised:
            session.retrieve_many([1, 2, 3])
        assert list(raised.value.failures) == [1, 2, 3]
        with pytest.raises(liveupdate.NotSupportedError) as raised:
            session.preserve_many([(fd, 5), (fd, 6)])
        assert list(raised.value.failures) == [5, 6]
        assert session.retrieve_many([]) == {}
    finally:
        os.close(fd)
