"""A reboot goes through, or is retried, whatever goes wrong around it.

A state file luod cannot write never blocks a reboot; a next generation that
fails to restore in-process keeps every file, and SIGHUP retries it. Each
test runs against a real luod; each pins a behaviour that once broke.
"""

from __future__ import annotations

import errno
import os
import signal
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import (
    Luod,
    assert_retrieves,
    events,
    luoctl_reboot,
    preserved_session,
    state,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.luod_only

#: Loaded by every Python of the daemon's environment: the first luod (only)
#: fails to restore memfds, as a buggy handler would. The variable is removed
#: at once, so the luod that SIGHUP re-executes restores normally.
_FAIL_FIRST_MEMFD_RESTORE = textwrap.dedent(
    """
    import os

    if os.environ.pop("REGRESSION_FAIL_MEMFD_RESTORE", None):
        import errno

        from liveupdate.core.handlers import memfd

        def _restore(self, file):
            raise OSError(errno.EINVAL, "injected in-process restore failure")

        memfd.MemfdHandler.restore = _restore
    """
)


def test_sighup_retry_after_a_failed_in_process_restore_keeps_the_files(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    """After a failed in-process restore, SIGHUP re-executes luod and restores every file.

    Broke once (review finding H4): the SIGHUP retry did not hand the files
    on to the re-executed luod.
    """
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_FAIL_FIRST_MEMFD_RESTORE)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    daemon = luod_factory(env={"PYTHONPATH": path, "REGRESSION_FAIL_MEMFD_RESTORE": "1"})

    session = preserved_session(daemon, "held", b"precious")
    with daemon.open() as dev:
        dev.set_event(uapi.LuodEvent.REBOOT, uapi.LUOD_REBOOT_NO_EXEC)
    session.close()
    wait_for(lambda: bool(events(daemon, "restore-failed")), "the injected restore failure")
    with pytest.raises(liveupdate.LiveUpdateError) as exc:
        daemon.open(timeout=1.0).close()
    assert exc.value.errno == errno.EIO

    pid = daemon.pid
    os.kill(pid, signal.SIGHUP)  # retry: re-execute luod on the same image and fds
    opened: list[liveupdate.Device] = []

    def opens() -> bool:
        try:
            opened.append(daemon.open(timeout=1.0))
        except liveupdate.LiveUpdateError:
            return False
        return True

    assert wait_until(opens, timeout=20), f"no working luod after SIGHUP:\n{daemon.log_text()}"
    assert daemon.pid == pid and daemon.alive()
    with opened[0] as dev:
        held = dev.retrieve_session("held")
    with held:
        assert_retrieves(held, 1, b"precious")
        held.finish()
    # The retry restored: the injected failure is the only one (no inherited
    # fd missing on the way).
    assert len(events(daemon, "restore-failed")) == 1
    assert events(daemon, "restored")


@pytest.mark.parametrize("no_exec", [False, True], ids=["exec", "no-exec"])
def test_an_unwritable_state_file_never_blocks_a_reboot(
    luod_factory: Callable[..., Luod], tmp_path: Path, no_exec: bool
) -> None:
    """The state file's path unusable (a directory): the reboot goes on, with a warning.

    Broke once (review finding H6): an unusable state-file path blocked the
    reboot.
    """
    blocker = tmp_path / "state-is-a-directory"
    blocker.mkdir()
    daemon = luod_factory("--state-file", str(blocker))
    session = preserved_session(daemon, "kept", b"kept")

    luoctl_reboot(daemon, *(["--no-exec"] if no_exec else []))
    session.close()
    info = state(daemon)
    assert info.generation == 2
    assert info.state != uapi.LuodState.FROZEN
    assert events(daemon, "state-file-failed")
    assert blocker.is_dir()
    with daemon.open() as dev:
        incoming = dev.retrieve_session("kept")
        dev.create_session("kept").close()
    with incoming:
        assert_retrieves(incoming, 1, b"kept")
        incoming.finish()
    assert state(daemon).state == uapi.LuodState.NORMAL
    assert daemon.alive()
