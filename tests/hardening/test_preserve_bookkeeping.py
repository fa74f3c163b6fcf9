"""A file counts as preserved while anyone holds it (issue 8, finding 7).

``semantics.md``: a file counts as preserved while it is in an outgoing
session, and also once retrieved from an incoming session until that session
is finished. One file can have two such holders at once (preserved again in
the new generation before the old copy was retrieved); the bookkeeping used
to keep one entry per file, so the second holder's departure freed a file
the first still held. Each scenario runs against a real luod and a real
``luoctl reboot``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import liveupdate
from luodtest import Luod, luoctl_reboot

pytestmark = pytest.mark.luod_only


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("bookkeeping")
    os.write(fd, b"M")
    try:
        yield fd
    finally:
        os.close(fd)


def reboot(luod: Luod) -> None:
    luoctl_reboot(luod, wait=30)


def create(luod: Luod, name: str) -> liveupdate.Session:
    with luod.open(timeout=10.0) as dev:
        return dev.create_session(name)


def preserved_over_a_reboot(luod: Luod, memfd: int) -> None:
    """M in A, then A handed to the next generation (our fd of A dies)."""
    a = create(luod, "A")
    a.preserve(memfd, 1)
    reboot(luod)
    a.close()


def test_a_retrieved_file_stays_busy_after_another_holder_lets_go(luod: Luod, memfd: int) -> None:
    preserved_over_a_reboot(luod, memfd)
    with create(luod, "B") as b:
        b.preserve(memfd, 2)  # allowed: A's copy is not retrieved yet
        with luod.open(timeout=10.0) as dev:
            a = dev.retrieve_session("A")
        got = a.retrieve(1)
        try:
            assert os.fstat(got).st_ino == os.fstat(memfd).st_ino
        finally:
            os.close(got)
    # B is closed; A's retrieved copy still counts until A is finished.
    with create(luod, "C") as c:
        with pytest.raises(liveupdate.DeviceBusyError):
            c.preserve(memfd, 3)
        a.finish()
        c.preserve(memfd, 3)  # free now
    a.close()


def test_a_file_preserved_twice_stays_busy_until_both_holders_let_go(
    luod: Luod, memfd: int
) -> None:
    """The other order: A is retrieved before B preserves, A finishes first."""
    preserved_over_a_reboot(luod, memfd)
    with luod.open(timeout=10.0) as dev:
        a = dev.retrieve_session("A")
    os.close(a.retrieve(1))
    with create(luod, "B") as b:
        with pytest.raises(liveupdate.DeviceBusyError):
            b.preserve(memfd, 2)  # retrieved and unfinished: busy
        a.finish()
        b.preserve(memfd, 2)
        with create(luod, "C") as c, pytest.raises(liveupdate.DeviceBusyError):
            c.preserve(memfd, 3)  # B holds it
    a.close()
    with create(luod, "D") as d:
        d.preserve(memfd, 4)  # nobody holds it any more


def test_a_finished_copy_frees_the_file_for_the_next_generation_too(luod: Luod, memfd: int) -> None:
    preserved_over_a_reboot(luod, memfd)
    b = create(luod, "B")
    b.preserve(memfd, 2)
    with luod.open(timeout=10.0) as dev:
        a = dev.retrieve_session("A")
    os.close(a.retrieve(1))
    a.finish()
    a.close()
    reboot(luod)  # B goes over; A is gone
    b.close()
    with luod.open(timeout=10.0) as dev:
        names = [s.name for s in dev.list_sessions(files=False).sessions]
        assert names == ["B"]
        b2 = dev.retrieve_session("B")
    with b2:
        got = b2.retrieve(2)
        os.close(got)
        with create(luod, "C") as c:
            with pytest.raises(liveupdate.DeviceBusyError):
                c.preserve(memfd, 3)
            b2.finish()
            c.preserve(memfd, 3)
