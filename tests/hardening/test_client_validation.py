"""The client library refuses tokens and names the ABI cannot carry (issue 8, finding 10).

A token is a u64 and a name is text or bytes. ctypes would silently wrap an
out-of-range integer (``2**64`` became token 0) and ``bytes(5)`` is five NUL
bytes, so the library checks before anything is sent: a refused call leaves
the session exactly as it was, which each test verifies against a real luod.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

import liveupdate
from luodtest import Luod

pytestmark = pytest.mark.luod_only

OUT_OF_RANGE = [2**64, 2**64 + 5, -1, 2**100, -(2**64)]


@pytest.fixture
def session(luod: Luod) -> Iterator[liveupdate.Session]:
    with luod.open() as dev:
        created = dev.create_session("validation")
    with created:
        yield created


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("validation")
    os.write(fd, b"data")
    try:
        yield fd
    finally:
        os.close(fd)


def tokens_held(luod: Luod) -> list[int]:
    with luod.open() as dev:
        (entry,) = dev.list_sessions("validation").sessions
    return [f.token for f in entry.files or ()]


@pytest.mark.parametrize("token", OUT_OF_RANGE)
def test_preserve_refuses_a_token_outside_u64_and_stores_nothing(
    luod: Luod, session: liveupdate.Session, memfd: int, token: int
) -> None:
    with pytest.raises(ValueError, match=str(token)):
        session.preserve(memfd, token)
    assert tokens_held(luod) == []
    # The wrapped value it used to become is still free, and the session works.
    session.preserve(memfd, token % 2**64)
    assert tokens_held(luod) == [token % 2**64]


def test_the_u64_bounds_themselves_are_valid_tokens(
    luod: Luod, session: liveupdate.Session
) -> None:
    fds = [os.memfd_create("low"), os.memfd_create("high")]
    try:
        session.preserve(fds[0], 0)
        session.preserve(fds[1], 2**64 - 1)
    finally:
        for fd in fds:
            os.close(fd)
    assert sorted(tokens_held(luod)) == [0, 2**64 - 1]


@pytest.mark.parametrize("call", ["retrieve", "unpreserve"])
def test_other_token_calls_refuse_out_of_range_tokens(
    luod: Luod, session: liveupdate.Session, memfd: int, call: str
) -> None:
    session.preserve(memfd, 0)
    method: Callable[[int], object] = getattr(session, call)
    with pytest.raises(ValueError, match=str(2**64)):
        method(2**64)  # would have been token 0
    assert tokens_held(luod) == [0]


@pytest.mark.parametrize("token", [1.0, "1", None, True])
def test_a_token_that_is_not_an_int_is_a_type_error(
    luod: Luod, session: liveupdate.Session, memfd: int, token: object
) -> None:
    with pytest.raises(TypeError, match="token"):
        session.preserve(memfd, token)  # type: ignore[arg-type]
    assert tokens_held(luod) == []


@pytest.mark.parametrize("name", [5, 0, None, 3.5, ["a"]])
def test_a_session_name_that_is_neither_str_nor_bytes_is_a_type_error(
    luod: Luod, name: object
) -> None:
    with luod.open() as dev:
        with pytest.raises(TypeError, match="name"):
            dev.create_session(name)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="name"):
            dev.retrieve_session(name)  # type: ignore[arg-type]
        if name is not None:  # list_sessions(None) lists every session
            with pytest.raises(TypeError, match="name"):
                dev.list_sessions(name)  # type: ignore[arg-type]
        assert dev.list_sessions().sessions == ()


def test_str_and_bytes_names_still_work(luod: Luod) -> None:
    with luod.open() as dev:
        text = dev.create_session("by-text")
        raw = dev.create_session(b"by-bytes")
    with text, raw:
        assert (text.get_name(), raw.get_name()) == (b"by-text", b"by-bytes")
