"""A full disk during a reboot, or under the journal, is answered and reported, never silent.

The state directory is a real tmpfs of a few pages, mounted for the test
and filled with a real file: ``write`` then fails with ``ENOSPC`` where a
real disk would.

* A reboot that fails after the intent was written (``--journal-interval
  0``: the intent is an image) leaves no image, no marker and no temporary
  file: the next clean start reports nothing lost.
* A journal that cannot be written shows in ``GET_STATE`` (``journal_error``)
  and ``luoctl state``; a luod killed meanwhile leaves a marker, and the next
  start reports its loss report as incomplete.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import Luod, events, luoctl, wait_for

pytestmark = pytest.mark.luod_only

PAGE = os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32-page tmpfs (mode 0700, root's) as the state directory."""
    mnt = tmp_path / "state"
    mnt.mkdir(mode=0o700)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={32 * PAGE},mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root and mount rights): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(fs: Path, leave_pages: int) -> Path:
    """Fill ``fs`` with one file, leaving exactly ``leave_pages`` free pages."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\xff" * PAGE
        try:
            while True:
                os.write(fd, chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        size = os.fstat(fd).st_size // PAGE * PAGE
        os.ftruncate(fd, max(0, size - leave_pages * PAGE))
    finally:
        os.close(fd)
    return filler


def start(tmp_path: Path, state: Path, *args: str, name: str = "luod") -> Luod:
    sock_dir = tmp_path / f"sock-{name}"
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    daemon = Luod(
        str(sock_dir / "device"),
        state,
        tmp_path / f"{name}.log",  # outside the tiny filesystem
        ["--state-dir", str(state), *args],
        env,
    )
    return daemon.start()


def hold_one_session(daemon: Luod, name: str = "db") -> liveupdate.Session:
    with daemon.open() as dev:
        session = dev.create_session(name)
    fd = os.memfd_create(name)
    os.write(fd, b"held")
    session.preserve(fd, 1)
    os.close(fd)
    return session


def leftovers(state: Path) -> list[str]:
    return sorted(p.name for p in state.iterdir() if p.name.endswith(".tmp") or "dtb" in p.name)


def state_info(daemon: Luod) -> liveupdate.StateInfo:
    with daemon.open() as dev:
        return dev.get_state()


@pytest.mark.parametrize("free_pages", [1, 0], ids=["after-the-intent", "at-the-intent"])
def test_a_reboot_failing_on_a_full_disk_leaves_no_intent_and_no_temporary_file(
    tmp_path: Path, tiny_fs: Path, free_pages: int
) -> None:
    daemon = start(tmp_path, tiny_fs, "--journal-interval", "0")
    try:
        session = hold_one_session(daemon)
        filler = fill(tiny_fs, free_pages)

        result = luoctl(daemon.socket, "reboot", "--no-prepare")  # the REBOOT writes the intent

        assert result.returncode != 0
        assert "ENOSPC" in result.stderr, result.stderr
        assert leftovers(tiny_fs) == []
        assert not (tiny_fs / "reboot-in-progress").exists()
        info = state_info(daemon)
        assert info.state == uapi.LuodState.NORMAL and info.generation == 1
        assert info.preserved_files == 1
        # The disk is freed: the same sessions reboot fine.
        filler.unlink()
        session.close()
    finally:
        assert daemon.stop() == 0
    again = start(tmp_path, tiny_fs, "--journal-interval", "0", name="again")
    try:
        assert state_info(again).lost_sessions == 0
        assert not events(again, "session-lost")
    finally:
        again.stop()


def test_a_preflight_on_a_full_disk_leaves_no_temporary_file(tmp_path: Path, tiny_fs: Path) -> None:
    daemon = start(tmp_path, tiny_fs)
    try:
        hold_one_session(daemon)
        fill(tiny_fs, 0)
        result = luoctl(daemon.socket, "prepare")
        assert result.returncode != 0 and "ENOSPC" in result.stderr, result.stderr
        assert leftovers(tiny_fs) == []
        assert state_info(daemon).state == uapi.LuodState.NORMAL
    finally:
        daemon.stop()


def _wait(predicate: Callable[[], bool], what: str, daemon: Luod) -> None:
    wait_for(predicate, what, timeout=20, daemon=daemon)


def test_an_unwritable_journal_is_reported_by_state_and_by_the_next_loss_report(
    tmp_path: Path, tiny_fs: Path
) -> None:
    daemon = start(tmp_path, tiny_fs, "--journal-interval", "0.05", "--keeper", "off")
    hold_one_session(daemon, "journaled")
    _wait(lambda: (tiny_fs / "journal.dtb").exists(), "journal never written", daemon)
    filler = fill(tiny_fs, 0)
    hold_one_session(daemon, "unjournaled")
    _wait(lambda: state_info(daemon).journal_error == errno.ENOSPC, "no journal_error", daemon)

    shown = luoctl(daemon.socket, "state")
    assert "journal error" in shown.stdout and "ENOSPC" in shown.stdout, shown.stdout
    as_json = json.loads(luoctl(daemon.socket, "--json", "state").stdout)
    assert as_json["journal_error"] == "ENOSPC"
    assert events(daemon, "journal-failed")

    daemon.stop(signal.SIGKILL)  # the journal still says one session: the other is unrecorded
    filler.unlink()
    again = start(tmp_path, tiny_fs, "--keeper", "off", name="again")
    try:
        info = state_info(again)
        assert info.lost_sessions == 1  # what the journal recorded
        assert info.lost_incomplete  # ... and that more may have been lost
        assert info.journal_error == 0
        assert events(again, "lost-report-incomplete")
        shown = luoctl(again.socket, "state")
        assert "lost incomplete" in shown.stdout, shown.stdout
        assert not (tiny_fs / "journal-stale").exists()
    finally:
        again.stop()


def test_the_journal_error_clears_once_the_journal_is_written_again(
    tmp_path: Path, tiny_fs: Path
) -> None:
    daemon = start(tmp_path, tiny_fs, "--journal-interval", "0.05")
    try:
        filler = fill(tiny_fs, 0)
        hold_one_session(daemon)
        _wait(lambda: state_info(daemon).journal_error == errno.ENOSPC, "no error", daemon)
        assert (tiny_fs / "journal-stale").exists()
        filler.unlink()
        _wait(lambda: state_info(daemon).journal_error == 0, "error never cleared", daemon)
        assert (tiny_fs / "journal.dtb").is_file()
        assert not (tiny_fs / "journal-stale").exists()
        assert "journal error" not in luoctl(daemon.socket, "state").stdout
    finally:
        daemon.stop()
