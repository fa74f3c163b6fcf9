"""The per-uid usage counters follow every change to the held sessions.

The quotas and the fd reserve read counters the session set keeps as
sessions and files change (O(1) per call) instead of walking every session.
These tests walk the set through every kind of change, failing ones
included, and compare the counters with a count made from scratch each time.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable

import pytest
from corelib import ALICE, BOB, ROOT, Rig

from liveupdate import uapi
from liveupdate.core.policy import Limits, Usage
from liveupdate.core.session import Session

UIDS = (ROOT.uid, ALICE.uid, BOB.uid)


def counted_from_scratch(rig: Rig, uid: int) -> Usage:
    usage = Usage()
    for session in rig.luo.sessions.held():
        if session.owner.uid == uid:
            usage.sessions += 1
            usage.files += len(session.files)
            usage.memfd_bytes += sum(f.charge for f in session.files.values())
    return usage


def assert_counters_match(rig: Rig) -> None:
    sessions = rig.luo.sessions
    for uid in UIDS:
        assert sessions.usage(uid) == counted_from_scratch(rig, uid), f"uid {uid}"
    assert sessions.file_count == sum(len(s.files) for s in sessions.held())


def test_counters_follow_a_random_walk_of_every_kind_of_change(
    make_rig: Callable[..., Rig],
) -> None:
    rig = make_rig(Limits(max_sessions=64, max_files=8))
    sessions = rig.luo.sessions
    walk = random.Random(1234)
    names = iter(range(1_000_000))

    def outgoing() -> Session | None:
        return walk.choice(list(sessions.outgoing.values())) if sessions.outgoing else None

    def incoming() -> Session | None:
        pending = [s for s in sessions.incoming.values() if not s.finished]
        return walk.choice(pending) if pending else None

    for _ in range(600):
        step = walk.randrange(9)
        try:
            if step == 0:
                owner = walk.choice((ROOT, ALICE, BOB))
                rig.create(b"s%d" % next(names), owner)
            elif step == 1 and (session := outgoing()) is not None:
                rig.preserve(session, walk.randrange(10), b"x" * walk.randrange(1, 50))
            elif step == 2 and (session := outgoing()) is not None and session.files:
                token = walk.choice(list(session.files))
                if walk.random() < 0.3:
                    rig.handler.fail_unpreserve.add(token)  # fails, yet lets go
                sessions.unpreserve_file(session, token)
            elif step == 3 and (session := outgoing()) is not None:
                if walk.random() < 0.5:
                    session.flags = uapi.LUOD_SESSION_KEEP_ON_CLOSE  # handed over instead
                rig.luo.release_session(session)
            elif step == 4 and (session := outgoing()) is not None:
                sessions.hand_over(session)
            elif step == 5 and (session := incoming()) is not None:
                if not session.retrieved:
                    sessions.retrieve(session.name, session.owner)
                for token in list(session.files)[:1]:
                    os.close(sessions.retrieve_file(session, token))
            elif step == 6 and (session := incoming()) is not None:
                if session.files and walk.random() < 0.3:
                    rig.handler.refuse_finish.add(next(iter(session.files)))  # EBUSY
                sessions.finish(session)
            elif step == 7 and (session := incoming()) is not None:
                rig.luo.release_session(session)
            elif step == 8 and walk.random() < 0.1:
                sessions.finish_incoming(walk.choice((None, ALICE)))
        except OSError as exc:
            assert exc.errno in (errno.EEXIST, errno.ENOSPC, errno.EBUSY, errno.EIO, errno.EINVAL)
        finally:
            rig.handler.fail_unpreserve.clear()
            rig.handler.refuse_finish.clear()
        assert_counters_match(rig)
    sessions.drop_incoming()
    assert_counters_match(rig)
    sessions.close()
    assert_counters_match(rig)
    assert all(sessions.usage(uid) == Usage() for uid in UIDS)


@pytest.mark.parametrize("uid", UIDS)
def test_a_uid_that_holds_nothing_has_zero_usage(rig: Rig, uid: int) -> None:
    assert rig.luo.sessions.usage(uid) == Usage()
    session = rig.create(b"gone", ALICE)
    rig.preserve(session, 1, b"abc")
    rig.luo.release_session(session)
    assert rig.luo.sessions.usage(uid) == Usage()
