"""libluoshim.so: unmodified C programs' open() and ioctl() against a real luod.

Each test runs tests/shim/shimprobe.c under LD_PRELOAD and reads what the
program saw, one ``step: result`` line per call.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cprograms import lines_of

from luodtest import Luod

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).resolve().parent


@pytest.fixture
def probe(shim_env: dict[str, str], build_c: Callable[[Path], Path]) -> Callable[..., list[str]]:
    program = build_c(HERE / "shimprobe.c")

    def run(*args: str) -> list[str]:
        return lines_of(program, shim_env, *args, timeout=30)

    return run


def test_errnos_are_the_kernels_in_the_dispatch_order(probe: Callable[..., list[str]]) -> None:
    assert probe("errors") == [
        "open: ok",
        "second_open: EBUSY",
        "null_arg: EFAULT",
        "bad_pointer: EFAULT",
        "null_arg_unknown_nr: ENOTTY",  # ENOTTY before any argument byte is read
        "size_zero: EINVAL",
        "wrong_type: ENOTTY",
        "direction_bits: ENOTTY",
        "terminal_ioctl: ENOTTY",  # a socket would answer FIONREAD; the device does not
        "session_cmd_on_device: ENOTTY",
        "create: ok",
        "finish_outgoing: EINVAL",
        "fioclex: ok",
        "cloexec_after_fionclex: 0",
        "fioclex: ok",
        "cloexec_after_fioclex: 1",
    ]


def test_forked_child_uses_the_inherited_session_fd(probe: Callable[..., list[str]]) -> None:
    assert probe("fork") == [
        "open: ok",
        "create: ok",
        "get_name: forked",  # the child
        "get_name: forked",  # the parent, after it
    ]


def test_execd_program_recognises_inherited_fds_without_state(
    probe: Callable[..., list[str]],
) -> None:
    assert probe("exec") == [
        "open: ok",
        "create: ok",
        "get_name: execed",  # the session fd, recognised by its peer (luod)
        "create: ok",  # the device fd, recognised by the socket it is connected to
    ]


def test_dup2_over_a_device_fd_makes_it_what_was_duplicated(
    probe: Callable[..., list[str]],
) -> None:
    assert probe("dup2") == [
        "open: ok",
        "create: ok",
        "dup2: ok",
        "get_name: duplicated",
        "create_on_session: ENOTTY",
        "dup2_file: ok",
        "fionread_on_file: ok",
        "fionread_bytes: some",
    ]


def test_reused_fd_number_is_not_mistaken_for_a_session(
    probe: Callable[..., list[str]], tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(b"12345")
    assert probe("reuse", str(plain)) == [
        "open: ok",
        "create: ok",
        "fionread_on_session: ENOTTY",
        "same_number: yes",
        "fionread_on_file: ok",  # libc's answer for a regular file
        "fionread_bytes: 5",
        "get_name: ENOTTY",  # the kernel's, for a regular file: nothing reached luod
    ]


@pytest.mark.parametrize("mode", ["gone", "gone-exec"])
def test_calls_fail_with_enodev_once_luod_went_away(
    luod: Luod, shim_env: dict[str, str], build_c: Callable[[Path], Path], mode: str
) -> None:
    # gone-exec: the fds were inherited across exec and first used after
    # luod died, when their peer can no longer be named.
    program = build_c(HERE / "shimprobe.c")
    proc = subprocess.Popen(
        [str(program), mode],
        env=shim_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert [proc.stdout.readline() for _ in range(3)] == [
            "open: ok\n",
            "create: ok\n",
            "ready\n",
        ]
        luod.stop()
        proc.stdin.close()
        assert proc.stdout.read().splitlines() == ["get_name: ENODEV", "create: ENODEV"]
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_numbers_of_other_shapes_get_linux_answers_from_a_linux_exact_luod(
    luod_factory: Callable[..., Luod], shim_so: Path, build_c: Callable[[Path], Path]
) -> None:
    # The shim passes them to luod (with the size word alone), and
    # --compat=linux answers as Linux 7.3 did in the VM (linux-mode.md):
    # EINVAL for an nr outside the table whatever the rest of the number,
    # ENOTTY for an nr inside it once the size could be read.
    compat = luod_factory("--compat", "linux")
    env = {**os.environ, "LD_PRELOAD": str(shim_so), "LIVEUPDATE_DEVICE": compat.socket}
    lines = lines_of(build_c(HERE / "shimprobe.c"), env, "errors", timeout=30)
    assert lines[4:10] == [
        "null_arg_unknown_nr: EINVAL",
        "size_zero: EINVAL",
        "wrong_type: ENOTTY",
        "direction_bits: ENOTTY",
        "terminal_ioctl: EINVAL",
        "session_cmd_on_device: EINVAL",
    ]
