"""The reboot's steps in-process: freeze with rollback, the state machine, and
image round trips (freeze -> encode -> decode -> restore with the same fds)."""

from __future__ import annotations

import errno
import os

import pytest
from corelib import ALICE, ROOT, Rig, content, struct

from liveupdate import uapi
from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry
from liveupdate.core.luo import LuoState, Orchestrator
from liveupdate.handover_codec import decode_image, encode_image


def test_a_failing_freeze_unfreezes_every_frozen_file_last_first(rig: Rig) -> None:
    a, b = rig.create(b"a"), rig.create(b"b")
    rig.preserve(a, 1)
    rig.preserve(a, 2)
    rig.preserve(b, 3)
    rig.preserve(b, 4)
    rig.handler.fail_freeze.add(4)
    rig.handler.calls.clear()
    with pytest.raises(OSError) as info:
        reboot.freeze(rig.luo)
    assert info.value.errno == errno.EPERM
    assert rig.handler.calls == [
        ("freeze", 1),
        ("freeze", 2),
        ("freeze", 3),
        ("unfreeze", 3),
        ("unfreeze", 2),
        ("unfreeze", 1),
    ]


def test_a_failed_reboot_thaws_aborts_and_keeps_the_state_with_the_reason(rig: Rig) -> None:
    session = rig.create(b"a")
    rig.preserve(session, 1)
    rig.preserve(session, 2)
    rig.handler.fail_freeze.add(2)
    arg = struct(uapi.SET_EVENT, event=uapi.LuodEvent.REBOOT, flags=uapi.LUOD_REBOOT_NO_EXEC)
    assert rig.device(uapi.SET_EVENT, arg).ret == -errno.EPERM
    assert rig.host.steps == ["begin", "frozen 1", "abort"]
    assert rig.luo.state == LuoState.NORMAL and rig.states == [LuoState.FROZEN, LuoState.NORMAL]
    assert ("unfreeze", 1) in rig.handler.calls
    state = struct(uapi.GET_STATE)
    reply = rig.device(uapi.GET_STATE, state)
    out = uapi.luod_get_state.from_buffer_copy(reply.out.ljust(uapi.GET_STATE.sizeof, b"\0"))
    assert b"token 2 refuses to freeze" in bytes(out.last_error)


def test_a_reboot_after_prepare_skips_the_preflight_unless_something_changed(rig: Rig) -> None:
    rig.preserve(rig.create(b"a"), 1)
    reboot.prepare(rig.luo, rig.host)
    assert rig.luo.state == LuoState.PREPARED
    rig.create(b"b")  # a change the pre-flight did not see
    reboot.start_reboot(rig.luo, rig.host, no_exec=False)
    assert rig.host.steps == ["preflight", "begin", "preflight", "frozen 1", "commit"]
    assert rig.luo.state == LuoState.FROZEN


def test_a_failed_preflight_leaves_normal_with_its_reason(rig: Rig) -> None:
    rig.host.preflight_error = OSError(errno.EIO, "pre-flight failed: no such handler")
    arg = struct(uapi.SET_EVENT, event=uapi.LuodEvent.PREPARE)
    assert rig.device(uapi.SET_EVENT, arg).ret == -errno.EIO
    assert rig.luo.state == LuoState.NORMAL
    assert rig.luo.last_error == "pre-flight failed: no such handler"


def test_state_events_from_an_unprivileged_caller_are_refused(rig: Rig) -> None:
    arg = struct(uapi.SET_EVENT, event=uapi.LuodEvent.PREPARE)
    assert rig.device(uapi.SET_EVENT, arg, owner=ALICE).ret == -errno.EACCES
    assert rig.host.steps == []


def test_an_image_round_trip_restores_every_session_on_the_same_fds(
    make_rig: object,
) -> None:
    assert callable(make_rig)
    old: Rig = make_rig()
    db = old.create(b"db", ALICE)
    fds = [old.preserve(db, 1, b"first"), old.preserve(db, 2, b"second")]
    old.luo.sessions.set_flags(db, uapi.LUOD_SESSION_KEEP_ON_CLOSE)
    waiting = old.create(b"svc")
    fds.append(old.preserve(waiting, 9, b"waits"))
    old.luo.sessions.hand_over(waiting)  # handed over, not retrieved: it waits
    reboot.start_reboot(old.luo, old.host, no_exec=True)
    assert old.host.committed is not None
    image = decode_image(encode_image(old.host.committed))
    assert reboot.preserved_fds(old.luo) == fds

    new: Rig = make_rig()
    luo = reboot.restore(image, new.registry, hooks=new.hooks)
    assert luo.generation == old.luo.generation + 1
    assert luo.state == LuoState.UPDATED and new.states == [LuoState.UPDATED]
    restored = luo.sessions.incoming[b"db"]
    assert restored.owner.uid == ALICE.uid and restored.created == db.created
    assert restored.flags == uapi.LUOD_SESSION_KEEP_ON_CLOSE and not restored.handed_over
    assert [f.fd for f in restored.files.values()] == fds[:2]
    assert luo.sessions.incoming[b"svc"].waiting
    assert not os.get_inheritable(fds[0])
    luo.retrieve_session(b"db", ALICE)
    fd = luo.sessions.retrieve_file(restored, 2)
    assert content(fd) == b"second"
    os.close(fd)
    # As luod's in-process reboot does: the ending generation drops its
    # incoming sessions and is forgotten (its fds are the new one's now).
    old.luo.sessions.drop_incoming()
    old.luo = Orchestrator(old.registry)
    new.luo = luo


def test_a_restore_that_does_not_fit_is_eio_and_closes_nothing(rig: Rig) -> None:
    session = rig.create(b"db")
    fd = rig.preserve(session, 1, b"data")
    image = reboot.freeze(rig.luo)
    with pytest.raises(OSError) as unknown:
        reboot.restore(decode_image(encode_image(image)), HandlerRegistry())
    assert unknown.value.errno == errno.EIO
    assert "session 'db' token 0x1: no handler 'note-v1'" in str(unknown.value)
    os.pwrite(fd, b"DATA", 0)  # the file changed after its freeze
    with pytest.raises(OSError) as changed:
        reboot.restore(image, rig.registry)
    assert changed.value.errno == errno.EIO and "cannot restore" in str(changed.value)
    assert content(fd) == b"DATA" and os.fstat(fd)
    rig.luo.sessions.thaw()


def test_unfinished_incoming_sessions_are_not_handed_on_by_a_reboot(rig: Rig) -> None:
    svc = rig.create(b"svc")
    rig.preserve(svc, 1)
    rig.luo.sessions.hand_over(svc)
    rig.luo.retrieve_session(b"svc", ROOT)  # retrieved: no longer waiting
    image = reboot.snapshot(rig.luo)
    assert image.sessions == []
    rig.luo.sessions.drop_incoming()
    assert not rig.luo.sessions.incoming
