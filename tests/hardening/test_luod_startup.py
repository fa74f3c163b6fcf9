"""luod's start on bad input: one line saying what is wrong, never a traceback.

Values that work but open the device to others are accepted and said out
loud; values that make no sense are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from luodtest import LUOCTL, Luod, event_names, events

pytestmark = pytest.mark.luod_only

LUOD = [sys.executable, "-m", "liveupdate.server.luod"]


def refuse(*args: str) -> str:
    """Start luod with ``args``; it must exit non-zero with one ``luod: ...`` line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    result = subprocess.run(
        [*LUOD, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("luod: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write to, root included: a read-only tmpfs."""
    mnt = tmp_path / "ro"
    mnt.mkdir(mode=0o755)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,mode=0755,size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_socket_in_proc_is_refused_in_one_line() -> None:
    line = refuse("--socket", "/proc/device")
    assert "/proc" in line


def test_an_empty_socket_path_is_refused_in_one_line() -> None:
    line = refuse("--socket", "")
    assert "--socket" in line and "empty" in line


def test_a_socket_in_an_unwritable_directory_is_refused_in_one_line(read_only_dir: Path) -> None:
    line = refuse("--socket", str(read_only_dir / "sub" / "device"))
    assert str(read_only_dir) in line and "Read-only file system" in line


def test_a_state_dir_on_a_read_only_filesystem_is_refused_in_one_line(
    tmp_path: Path, read_only_dir: Path
) -> None:
    line = refuse("--socket", str(tmp_path / "device"), "--state-dir", str(read_only_dir))
    assert "Read-only file system" in line


def test_an_unknown_socket_group_is_refused_in_one_line(tmp_path: Path) -> None:
    line = refuse("--socket", str(tmp_path / "device"), "--socket-group", "nosuchgroup")
    assert "nosuchgroup" in line and "no such group" in line


def test_a_socket_mode_beyond_permission_bits_is_refused(tmp_path: Path) -> None:
    line = refuse("--socket", str(tmp_path / "device"), "--socket-mode", "4777")
    assert "--socket-mode 4777" in line


@pytest.mark.parametrize(
    ("mode", "warning", "who"),
    [
        ("0777", "socket-open-to-everyone", "any user of this machine"),
        ("0606", "socket-open-to-everyone", "any user of this machine"),
        ("0660", "socket-open-to-group", "every member of the group"),
    ],
)
def test_a_socket_mode_open_to_others_is_accepted_with_a_warning(
    luod_factory: Callable[..., Luod], mode: str, warning: str, who: str
) -> None:
    daemon = luod_factory("--socket-mode", mode)
    assert os.stat(daemon.socket).st_mode & 0o777 == int(mode, 8)
    (warned,) = events(daemon, warning)
    assert warned["level"] == "warning" and warned["mode"] == mode, warned
    assert who in warned["consequence"], warned
    with daemon.open() as dev:
        dev.get_state()


def test_a_private_socket_mode_gives_no_warning(luod: Luod) -> None:
    assert not {"socket-open-to-everyone", "socket-open-to-group"} & set(event_names(luod))


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "-1", "state"],
        ["run", "--stop-timeout", "-1", "--", "true"],
    ],
    ids=["timeout", "stop-timeout"],
)
def test_negative_timeouts_are_refused(tmp_path: Path, args: list[str]) -> None:
    if args[0] == "run":
        args = ["run", "svc", *args[1:]]
    result = subprocess.run(
        [*LUOCTL, "--socket", str(tmp_path / "none"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "-1" in result.stderr and ">=0" in result.stderr.replace(" ", ""), result.stderr


def test_a_negative_journal_interval_is_refused(tmp_path: Path) -> None:
    result = subprocess.run(
        [*LUOD, "--socket", str(tmp_path / "device"), "--journal-interval", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "device").exists()
