"""Crash safety of the hand-over to the successor (docs/concepts/crash-safety.md).

PREPARE starts the next generation as a waiting *successor* process; REBOOT
hands it the image and every fd. Who holds the files at each step decides
what a SIGKILL does, and each test here kills one side, the other, or both,
at each step of the hand-over, and checks that nothing is lost silently:

* the old generation killed once the successor has every fd: the successor
  serves the complete next generation;
* the successor killed (or failing) before it restored everything: the
  reboot rolls back and the old generation serves on, saying why;
* the successor killed at its takeover: the old generation restores
  in-process;
* both killed: the next cold start reports every session.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from test_reboot_crash import (
    SESSIONS,
    Held,
    assert_inspect_lists,
    assert_reported_lost,
    cold_restart,
    content,
    held,
)

import liveupdate
from liveupdate import uapi
from luodtest import Luod, events, luoctl, running, wait_for

pytestmark = pytest.mark.luod_only

__all__ = ["held"]  # the fixture, shared with test_reboot_crash


def successor_pids(daemon: Luod) -> list[int]:
    return [e["successor"] for e in events(daemon, "successor-started")]


def arm(tmp_path: Path, *lines: str) -> dict[str, str]:
    faults = tmp_path / "faults"
    faults.write_text("".join(f"{line}\n" for line in lines))
    return {"LUOD_FAULT_FILE": str(faults)}


def wait_generation(daemon: Luod, generation: int) -> liveupdate.StateInfo:
    found: list[liveupdate.StateInfo] = []

    def answered() -> bool:
        with contextlib.suppress(OSError, liveupdate.LiveUpdateError), daemon.open(1) as dev:
            found.append(dev.get_state())
            return found[-1].generation >= generation
        return False

    wait_for(answered, timeout=20, what=f"generation {generation}")
    return found[-1]


def assert_everything_retrievable(daemon: Luod, held: Held) -> None:
    with daemon.open() as dev:
        for name, tokens in SESSIONS.items():
            with dev.retrieve_session(name) as session:
                for token in tokens:
                    fd = session.retrieve(token)
                    try:
                        expected = content(name, token)
                        assert os.pread(fd, len(expected) + 1, 0) == expected
                    finally:
                        os.close(fd)
    assert not events(daemon, "session-lost")


@pytest.mark.parametrize("step", ["after-handoff-sent", "before-exec"])
def test_old_generation_killed_after_the_handoff_leaves_the_successor_serving(
    step: str, luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    daemon = luod_factory(env=arm(tmp_path, f"kill-at {step}"))
    held.fill(daemon)
    luoctl(daemon.socket, "reboot", "--wait", "10", timeout=30)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    assert events(daemon, "fault-kill", step=step)
    info = wait_generation(daemon, 2)
    assert info.incoming_sessions == len(SESSIONS)
    assert daemon.pid in successor_pids(daemon)
    assert_everything_retrievable(daemon, held)
    assert (daemon.state_dir / "last-handover.dtb").exists()
    assert not (daemon.state_dir / "handover.dtb").exists()
    assert not (daemon.state_dir / "reboot-in-progress").exists()


@pytest.mark.parametrize("step", ["successor-restored", "restore"])
def test_successor_killed_before_it_restored_changes_nothing(
    step: str, luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    env = arm(tmp_path, f"kill-at {step}")
    daemon = luod_factory(env=env)
    held.fill(daemon)
    result = luoctl(daemon.socket, "reboot", "--wait", "10", timeout=30)
    assert result.returncode == 1, result
    assert "(EIO)" in result.stderr and "next generation failed" in result.stderr
    assert daemon.alive() and daemon.pid == daemon.proc.pid  # type: ignore[union-attr]
    assert events(daemon, "fault-kill", step=step)
    (successor,) = successor_pids(daemon)
    assert not running(successor)
    with daemon.open() as dev:
        info = dev.get_state()
        assert info.generation == 1
        # luoctl's own PREPARE is cancelled: luod is left as it was found,
        # and the failure stays on record.
        assert info.state == uapi.LuodState.NORMAL
        assert info.outgoing_sessions == len(SESSIONS)
        assert info.last_reboot_error == errno.EIO
        assert "next generation failed" in info.last_error  # kept by the CANCEL
    assert held.sessions["db"].get_name() == b"db"  # the old session fds still work
    assert not (daemon.state_dir / "handover.dtb").exists()

    Path(env["LUOD_FAULT_FILE"]).write_text("")
    assert luoctl(daemon.socket, "reboot", "--wait", "10").returncode == 0
    assert wait_generation(daemon, 2).incoming_sessions == len(SESSIONS)
    assert_everything_retrievable(daemon, held)


def test_successor_killed_at_its_takeover_leaves_the_old_one_restoring(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    daemon = luod_factory(env=arm(tmp_path, "kill-at successor-takeover"))
    held.fill(daemon)
    luoctl(daemon.socket, "reboot", "--wait", "10", timeout=30)
    info = wait_generation(daemon, 2)
    assert info.incoming_sessions == len(SESSIONS)
    assert daemon.pid == daemon.proc.pid  # type: ignore[union-attr]
    assert events(daemon, "reboot-complete", exec=False)
    assert_everything_retrievable(daemon, held)


@pytest.mark.parametrize(
    "old_step,successor_step",
    [("after-handoff-sent", "successor-restored"), ("before-exec", "successor-takeover")],
)
def test_both_generations_killed_is_reported(
    old_step: str,
    successor_step: str,
    luod_factory: Callable[..., Luod],
    held: Held,
    tmp_path: Path,
) -> None:
    daemon = luod_factory(env=arm(tmp_path, f"kill-at {old_step}", f"kill-at {successor_step}"))
    held.fill(daemon)
    luoctl(daemon.socket, "reboot", "--wait", "5", timeout=30)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: len(events(daemon, "fault-kill")) == 2, what="both kills")
    wait_for(lambda: not any(map(running, successor_pids(daemon))), what="the successor")
    cold_restart(daemon)
    assert_inspect_lists(assert_reported_lost(daemon, held))


def test_successor_that_fails_to_start_fails_prepare(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    wrapper = tmp_path / "luod-broken"
    wrapper.write_text("#!/bin/sh\necho 'broken install' >&2\nexit 3\n")
    wrapper.chmod(0o755)
    daemon = luod_factory("--exec", str(wrapper))
    held.fill(daemon)
    result = luoctl(daemon.socket, "prepare")
    assert result.returncode == 1
    with daemon.open() as dev:
        info = dev.get_state()
    assert info.state == uapi.LuodState.NORMAL
    assert "exited with status 3" in info.last_error
    result = luoctl(daemon.socket, "reboot", "--wait", "5")
    assert result.returncode == 1  # a REBOOT from NORMAL starts one too: same failure
    with daemon.open() as dev:
        assert dev.get_state().outgoing_sessions == len(SESSIONS)
    assert held.sessions["db"].get_name() == b"db"


def test_successor_killed_while_starting_fails_prepare(
    luod_factory: Callable[..., Luod], held: Held, tmp_path: Path
) -> None:
    daemon = luod_factory(env=arm(tmp_path, "kill-at successor-started"))
    held.fill(daemon)
    assert luoctl(daemon.socket, "prepare").returncode == 1
    with daemon.open() as dev:
        info = dev.get_state()
    assert info.state == uapi.LuodState.NORMAL
    assert "pre-flight failed" in info.last_error
    assert daemon.alive()


def test_cancel_stops_the_successor(luod_factory: Callable[..., Luod], held: Held) -> None:
    daemon = luod_factory()
    held.fill(daemon)
    assert luoctl(daemon.socket, "prepare").returncode == 0
    (successor,) = successor_pids(daemon)
    assert running(successor)
    assert luoctl(daemon.socket, "cancel").returncode == 0
    assert not running(successor)
    assert not Path(f"/proc/{successor}").exists()  # reaped, not a zombie


def test_prepare_then_a_session_change_then_reboot(
    luod_factory: Callable[..., Luod], held: Held
) -> None:
    daemon = luod_factory()
    held.fill(daemon, {"db": (0x0, 0x1A), "cache": (2**64 - 1,)})
    assert luoctl(daemon.socket, "prepare").returncode == 0
    held.fill(daemon, {"idle": ()})  # after PREPARE: the reboot checks it again
    assert luoctl(daemon.socket, "reboot", "--wait", "10").returncode == 0
    assert wait_generation(daemon, 2).incoming_sessions == len(SESSIONS)
    assert len(successor_pids(daemon)) == 1  # the prepared successor did it
    assert len(events(daemon, "preflight-passed")) == 2
    assert_everything_retrievable(daemon, held)


def test_scale_through_a_handoff(luod_factory: Callable[..., Luod]) -> None:
    """2000 sessions, 500 files in some, 15,000 files in all, RLIMIT_NOFILE hard 20,000."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 20000:
        pytest.skip(f"RLIMIT_NOFILE hard is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    daemon = luod_factory(
        "--max-sessions", "2000", "--max-files", "500", "--max-sessions-per-uid", "0",
        "--max-files-per-uid", "0", "--max-memfd-bytes-per-uid", "0",
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        with daemon.open(timeout=30) as dev:
            sessions = [stack.enter_context(dev.create_session(f"s{i}")) for i in range(2000)]
        for session in sessions[:30]:
            for token in range(500):
                fd = os.memfd_create("scale")
                session.preserve(fd, token)
                os.close(fd)
        result = luoctl(daemon.socket, "reboot", "--wait", "120", timeout=300)
        assert result.returncode == 0, result.stderr
    info = wait_generation(daemon, 2)
    assert (info.incoming_sessions, info.preserved_files) == (2000, 15000)


@pytest.fixture
def luod_factory(luod_factory: Callable[..., Luod]) -> Callable[..., Luod]:
    """These tests pin what a luod without copies reports (``--keeper off``);
    tests/crash/test_luod_crash_survival.py pins the recovery with them."""

    def make(*args: str, **kwargs: object) -> Luod:
        return luod_factory("--keeper", "off", *args, **kwargs)

    return make
