"""Issue 8, findings 11, 12 (luoctl) and 13: one clear line per mistake, nothing read or lost.

Every command runs as a real ``luoctl`` process against a real ``luod``.
Each error must be a single line on stderr naming the object (the file,
the session, the command, the socket), the errno, and what to do.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate.handover_abi import FileRecord, HandoverImage, SessionRecord
from liveupdate.handover_codec import encode_image
from luodtest import LUOCTL, Luod, luoctl

pytestmark = pytest.mark.luod_only

#: luoctl may not grow past this: an ``inspect`` that reads a device whole dies instead.
_MEMORY_CAP = 1 << 30


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_CAP, _MEMORY_CAP))


def run_luoctl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``luoctl ARGS`` with its memory capped (a runaway read fails instead of swapping)."""
    return subprocess.run(
        [*LUOCTL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "80"},
        preexec_fn=_capped,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr; fails on a traceback or a wrapped message."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("luoctl: "), result.stderr
    return lines[0]


def _image(path: Path, sessions: int = 1) -> Path:
    image = HandoverImage(
        liveupdate_number=3,
        sessions=[
            SessionRecord(
                name=f"s{n}".encode(),
                uid=0,
                gid=0,
                pid=1,
                created=1.0,
                files=[FileRecord(token=n, compatible="memfd-v1", fd=10 + n, data=bytes(40))],
            )
            for n in range(sessions)
        ],
    )
    path.write_bytes(encode_image(image))
    return path


# -- finding 11: inspect reads regular files only, and not without bound ------------------


def test_inspect_refuses_a_character_device_without_reading_it() -> None:
    result = run_luoctl("inspect", "/dev/zero")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("luoctl: /dev/zero: not a regular file (character device) (EINVAL)")


def test_inspect_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = run_luoctl("inspect", str(fifo), timeout=30)  # a blocked open would time out
    assert result.returncode == 1
    assert f"luoctl: {fifo}: not a regular file (FIFO) (EINVAL)" in one_line(result)


def test_inspect_refuses_a_socket_in_one_line(luod: Luod) -> None:
    result = run_luoctl("inspect", luod.socket)
    assert result.returncode == 1
    assert f"luoctl: {luod.socket}: not a regular file (socket) (EINVAL)" in one_line(result)


def test_inspect_refuses_a_directory(tmp_path: Path) -> None:
    result = run_luoctl("inspect", str(tmp_path))
    assert result.returncode == 1
    assert "not a regular file (directory)" in one_line(result)


def test_inspect_of_a_missing_file_names_it(tmp_path: Path) -> None:
    result = run_luoctl("inspect", str(tmp_path / "missing.dtb"))
    assert result.returncode == 1
    assert f"{tmp_path / 'missing.dtb'}:" in one_line(result)
    assert "(ENOENT)" in result.stderr


def test_inspect_refuses_an_image_over_max_size_and_reads_it_under(tmp_path: Path) -> None:
    image = _image(tmp_path / "big.dtb", sessions=20)
    size = image.stat().st_size
    refused = run_luoctl("inspect", "--max-size", str(size - 1), str(image))
    assert refused.returncode == 1
    line = one_line(refused)
    assert f"{size} bytes is larger than --max-size {size - 1} (EFBIG)" in line
    assert "raise --max-size" in line
    read = run_luoctl("--json", "inspect", "--max-size", str(size), str(image))
    assert read.returncode == 0, read.stderr
    assert '"liveupdate_number": 3' in read.stdout


def test_inspect_follows_a_symlink_to_an_image(tmp_path: Path) -> None:
    image = _image(tmp_path / "real.dtb")
    link = tmp_path / "link.dtb"
    link.symlink_to(image)
    result = run_luoctl("inspect", str(link))
    assert result.returncode == 0, result.stderr
    assert "liveupdate-number 3, 1 session" in result.stdout


def test_inspect_max_size_must_be_positive(tmp_path: Path) -> None:
    result = run_luoctl("inspect", "--max-size", "0", str(_image(tmp_path / "i.dtb")))
    assert result.returncode == 2
    assert "--max-size" in result.stderr


# -- finding 12 (luoctl): the socket, and values that make no sense -------------------------


def test_socket_that_is_a_regular_file_is_named_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("")
    result = run_luoctl("--socket", str(path), "state")
    assert result.returncode == 1
    line = one_line(result)
    assert f"open {path}: not a socket but a regular file (ECONNREFUSED)" in line
    assert "Connection refused" not in line
    assert "--socket" in line


def test_socket_that_does_not_exist_says_luod_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "nothing"
    result = run_luoctl("--socket", str(path), "state")
    assert result.returncode == 1
    assert f"luod is not running at {path} (ENOENT); start luod" in one_line(result)


def test_socket_left_behind_by_a_stopped_luod_says_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale"
    left = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    left.bind(str(path))  # bound, never listening: what a killed luod leaves
    try:
        result = run_luoctl("--socket", str(path), "state")
    finally:
        left.close()
    assert result.returncode == 1
    assert "nothing listens on this socket" in one_line(result)
    assert "(ECONNREFUSED)" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--timeout", "-1", "state"),
        ("reboot", "--wait", "-0.5"),
        ("update", "--wait", "-1", "echo"),
        ("run", "--session", "s", "--stop-timeout", "-3", "--", "true"),
    ],
    ids=["timeout", "reboot-wait", "update-wait", "stop-timeout"],
)
def test_negative_durations_are_usage_errors(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = run_luoctl("--socket", str(tmp_path / "unused"), *args)
    assert result.returncode == 2, result.stderr
    assert "is not in the range x>=0" in result.stderr


# -- finding 13: errors name the object, not the ioctl ---------------------------------------


def test_sessions_of_an_unknown_name_names_the_session(luod: Luod) -> None:
    result = luoctl(luod.socket, "sessions", "nosuch")
    assert result.returncode == 1
    line = one_line(result)
    assert line == "luoctl: session 'nosuch': no such session (ENOENT); see 'luoctl sessions'"


def test_update_without_a_supervisor_names_the_session(luod: Luod) -> None:
    result = luoctl(luod.socket, "update", "echo")
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("luoctl: session 'echo': no such session (ENOENT); ")
    assert "luoctl run --session echo" in line
    assert "LUOD_IOCTL" not in line


def test_update_of_a_session_no_supervisor_holds_says_so(luod: Luod) -> None:
    with luod.open() as dev:
        session = dev.create_session("plain")
    with session:
        result = luoctl(luod.socket, "update", "plain")
    assert result.returncode == 1
    assert "session 'plain': not held by a `luoctl run` supervisor (ESRCH)" in one_line(result)


def test_run_of_a_missing_command_names_it_and_leaves_the_session_alone(luod: Luod) -> None:
    # State handed over by a predecessor: a typo in COMMAND must not finish it.
    memfd = os.memfd_create("handed-over", os.MFD_CLOEXEC)
    os.write(memfd, b"state")
    with luod.open() as dev:
        session = dev.create_session("svc")
    session.preserve(memfd, 7)
    os.close(memfd)
    session.update()
    result = luoctl(luod.socket, "run", "--session", "svc", "--", "/nonexistent/cmd", "-x")
    assert result.returncode == 127
    line = one_line(result)
    assert line == (
        "luoctl: command '/nonexistent/cmd': no such file (ENOENT); check COMMAND's path"
    )
    with luod.open() as dev, dev.retrieve_session("svc") as incoming:
        fd = incoming.retrieve(7)
        assert os.pread(fd, 5, 0) == b"state"
        os.close(fd)


def test_run_of_a_command_not_in_path_says_so(luod: Luod) -> None:
    result = luoctl(luod.socket, "run", "--session", "svc", "--", "no-such-command-x9")
    assert result.returncode == 127
    assert "command 'no-such-command-x9': not found in PATH (ENOENT)" in one_line(result)


def test_run_of_a_file_that_cannot_be_executed_says_so(luod: Luod, tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    result = luoctl(luod.socket, "run", "--session", "svc", "--", str(script))
    assert result.returncode == 126
    line = one_line(result)
    assert f"command '{script}'" in line and "(EACCES)" in line


def test_preserving_dev_null_says_no_handler_takes_character_devices(
    open_dev: Callable[..., liveupdate.Device],
) -> None:
    with open_dev() as dev:
        session = dev.create_session(f"devnull-{os.getpid()}")
    with (
        session,
        open("/dev/null", "rb") as null,
        pytest.raises(liveupdate.NotFoundError) as caught,
    ):
        session.preserve(null, 0x2A)
    assert caught.value.errno == errno.ENOENT
    message = str(caught.value.strerror)
    assert "no handler preserves character devices" in message
    assert "/dev/null" in message and "token 0x2a" in message


def test_library_errors_name_the_session_they_are_about(
    open_dev: Callable[..., liveupdate.Device],
) -> None:
    with open_dev() as dev, pytest.raises(liveupdate.NotFoundError) as caught:
        dev.retrieve_session("never-handed-over")
    assert caught.value.errno == errno.ENOENT
    assert "session 'never-handed-over': no incoming session of this name" in str(caught.value)
