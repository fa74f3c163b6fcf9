"""The fault-injection file (``LUOD_FAULT_FILE``) makes luod fail only where a test asked.

The crash tests (``tests/crash``) use it to kill or stop a real luod at a
step of a reboot. These pin its grammar: every line that is not exactly a
known fault is ignored, so a typo can never make luod fail somewhere else,
and a file that cannot be read asks for nothing.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from liveupdate.core.file import PreservedFile, file_key
from liveupdate.core.handlers import default_registry
from liveupdate.server.faults import (
    FaultInjector,
    FaultStep,
    FreezeFail,
    KillAt,
    StopAt,
    parse_faults,
)

pytestmark = pytest.mark.luod_only


def test_each_kind_of_fault_is_read_with_its_step_errno_and_token() -> None:
    text = "\n".join(
        [
            "kill-at freeze",
            "stop-at successor-takeover",
            "freeze-fail EBUSY",
            "freeze-fail 28 0x1a",
            "freeze-fail 0x5 7",
        ]
    )
    assert parse_faults(text) == [
        KillAt(FaultStep.FREEZE),
        StopAt(FaultStep.SUCCESSOR_TAKEOVER),
        FreezeFail(errno.EBUSY),
        FreezeFail(errno.ENOSPC, 0x1A),
        FreezeFail(errno.EIO, 7),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "kill-at",  # no step
        "kill-at freezing",  # no such step
        "kill-at freeze now",  # a word too many
        "stop-at AFTER-IMAGE",  # steps are lower case
        "freeze-fail",  # no errno
        "freeze-fail ENOTANERRNO",
        "freeze-fail EBUSY token",  # a token is a number
        "freeze-fail EBUSY 1 2",
        "freeze-fail errorcode",  # errno's dict, not an errno
        "crash-at freeze",
        "# kill-at freeze",
        "",
    ],
)
def test_a_line_that_is_not_exactly_a_fault_is_ignored(line: str) -> None:
    assert parse_faults(f"{line}\nkill-at restore\n") == [KillAt(FaultStep.RESTORE)]


def test_no_file_a_missing_file_or_an_unreadable_one_asks_for_nothing(tmp_path: Path) -> None:
    assert FaultInjector("").faults() == []
    assert FaultInjector(str(tmp_path / "missing")).faults() == []
    (tmp_path / "binary").write_bytes(b"kill-at freeze\n\xff\xfe\n")
    assert FaultInjector(str(tmp_path / "binary")).faults() == []
    (tmp_path / "dir").mkdir()
    assert FaultInjector(str(tmp_path / "dir")).faults() == []


def test_the_file_is_read_again_at_every_step(tmp_path: Path) -> None:
    path = tmp_path / "faults"
    injector = FaultInjector(str(path))
    path.write_text("freeze-fail EBUSY\n")
    assert injector.faults() == [FreezeFail(errno.EBUSY)]
    path.write_text("")  # the test "fixes" the fault between two reboots
    assert injector.faults() == []
    injector.point(FaultStep.FREEZE)  # nothing asked: returns


def test_a_freeze_failure_hits_only_the_token_it_names(tmp_path: Path) -> None:
    path = tmp_path / "faults"
    path.write_text("freeze-fail EBUSY 0x1a\n")
    injector = FaultInjector(str(path))
    fds = [os.memfd_create("a"), os.memfd_create("b")]
    handler = default_registry(plugins=False).find(fds[0], os.fstat(fds[0]))
    try:
        named = PreservedFile(0x1A, handler, fds[0], file_key(fds[0], os.fstat(fds[0])))
        other = PreservedFile(0x1B, handler, fds[1], file_key(fds[1], os.fstat(fds[1])))
        injector.freeze(other)  # not this one
        with pytest.raises(OSError) as info:
            injector.freeze(named)
        assert info.value.errno == errno.EBUSY
        assert "token 0x1a" in str(info.value)
    finally:
        for fd in fds:
            os.close(fd)
