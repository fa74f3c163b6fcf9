"""Limits and per-uid quotas in-process; root and luod's own uid are exempt."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

import pytest
from corelib import ALICE, BOB, ROOT, Rig, memfd

from liveupdate.core.policy import Limits, Owner, is_privileged, may_access


def _errno(call: object) -> int:
    assert callable(call)
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno or 0


@pytest.fixture
def tight(make_rig: Callable[..., Rig]) -> Rig:
    return make_rig(
        Limits(
            max_sessions=3,
            max_files=2,
            max_sessions_per_uid=2,
            max_files_per_uid=3,
            max_memfd_bytes_per_uid=10,
        )
    )


def test_the_session_limit_is_enomem_for_everyone(tight: Rig) -> None:
    for name in (b"a", b"b", b"c"):
        tight.create(name, ROOT)
    assert _errno(lambda: tight.luo.create_session(b"d", ROOT)) == errno.ENOMEM


def test_the_per_uid_session_quota_is_enomem_and_other_uids_are_not_charged(tight: Rig) -> None:
    tight.create(b"a1", ALICE)
    tight.create(b"a2", ALICE)
    assert _errno(lambda: tight.luo.create_session(b"a3", ALICE)) == errno.ENOMEM
    tight.create(b"b1", BOB)
    assert tight.luo.sessions.usage(ALICE.uid).sessions == 2


def test_a_session_closed_meanwhile_no_longer_counts_against_the_quota(tight: Rig) -> None:
    first = tight.create(b"a1", ALICE)
    tight.create(b"a2", ALICE)
    tight.closed.add(id(first))
    tight.create(b"a3", ALICE)
    assert set(tight.luo.sessions.outgoing) == {b"a2", b"a3"}


def test_a_session_holds_at_most_max_files(tight: Rig) -> None:
    session = tight.create(b"db", ROOT)
    tight.preserve(session, 1)
    tight.preserve(session, 2)
    fd = memfd()
    try:
        assert _errno(lambda: tight.luo.sessions.preserve_file(session, 3, [fd])) == errno.ENOSPC
    finally:
        os.close(fd)


def test_the_per_uid_file_quota_is_enospc_across_sessions(tight: Rig) -> None:
    one, two = tight.create(b"one", ALICE), tight.create(b"two", ALICE)
    tight.preserve(one, 1, b"")
    tight.preserve(one, 2, b"")
    tight.preserve(two, 1, b"")
    fd = memfd()
    try:
        assert _errno(lambda: tight.luo.sessions.preserve_file(two, 2, [fd])) == errno.ENOSPC
    finally:
        os.close(fd)


def test_the_memfd_byte_quota_is_enospc_and_root_is_exempt(tight: Rig) -> None:
    mine = tight.create(b"mine", ALICE)
    tight.preserve(mine, 1, b"123456")
    fd = memfd(b"12345")
    try:
        assert _errno(lambda: tight.luo.sessions.preserve_file(mine, 2, [fd])) == errno.ENOSPC
    finally:
        os.close(fd)
    roots = tight.create(b"roots", ROOT)
    tight.preserve(roots, 1, b"x" * 100)
    assert tight.luo.sessions.usage(ALICE.uid).memfd_bytes == 6


def test_only_root_and_the_owner_may_access_a_session() -> None:
    assert may_access(ALICE, ALICE) and may_access(ALICE, ROOT)
    assert not may_access(ALICE, BOB) and not may_access(ALICE, None)


def test_the_admin_group_may_drive_the_state_machine() -> None:
    member = Owner(pid=4, uid=1002, gid=100, groups=(2000,))
    assert not is_privileged(member, Limits())
    assert is_privileged(member, Limits(admin_gid=2000))
    assert is_privileged(ROOT, Limits())
