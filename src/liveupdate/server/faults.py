"""Fault injection: make luod die, stop or fail at a chosen step of a reboot.

The crash-safety promise ("a SIGKILL anywhere in a reboot loses nothing
silently", ``docs/concepts/crash-safety.md``) is only worth what its tests
prove, and they need luod to fail at a precise point of a real reboot. The
test hook is a file named by the environment variable ``LUOD_FAULT_FILE``,
read again at every step, so that a test "fixes" the fault by editing it
between two reboots. One fault per line:

``kill-at STEP``
    luod SIGKILLs itself when it reaches ``STEP`` (a crash).
``stop-at STEP``
    luod SIGSTOPs itself there (a hang: the test decides what happens next).
``freeze-fail ERRNO [TOKEN]``
    the freeze of the file ``TOKEN`` (of every file without one) fails with
    ``ERRNO`` (a name such as ``EBUSY``, or a number).

The steps are :class:`FaultStep`, in the order a reboot reaches them.
Lines that name no known fault or step are ignored, like a missing file: the
hook can only make luod fail where a test asked, never elsewhere.

A running luod reaches these points through :class:`FaultInjector`, which the
re-exec driver (:mod:`liveupdate.server.reexec`) calls.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from liveupdate.core.file import PreservedFile
from liveupdate.events import event

__all__ = [
    "FAULT_ENV",
    "Fault",
    "FaultInjector",
    "FaultStep",
    "FreezeFail",
    "KillAt",
    "StopAt",
    "parse_faults",
]

FAULT_ENV = "LUOD_FAULT_FILE"


class FaultStep(enum.Enum):
    """Where a reboot can be made to fail, in the order it gets there."""

    #: The successor (``luod --successor-fd``), imported, before it says ready.
    SUCCESSOR_STARTED = "successor-started"
    #: After the first file's freeze (the freeze is under way).
    FREEZE = "freeze"
    #: After the final image was written, before the reply went out.
    AFTER_IMAGE = "after-image"
    #: The old generation, frozen and its image written, before the first fd is sent.
    BEFORE_HANDOFF = "before-handoff"
    #: The old generation, every fd sent, before the successor said it restored them.
    AFTER_HANDOFF_SENT = "after-handoff-sent"
    #: The successor, every session restored, before it says so.
    SUCCESSOR_RESTORED = "successor-restored"
    #: The old generation's connections are closed; the successor's takeover
    #: (or, for a re-exec, the exec) is next.
    BEFORE_EXEC = "before-exec"
    #: The successor, told to serve, before it says it does.
    SUCCESSOR_TAKEOVER = "successor-takeover"
    #: A re-executed luod (a SIGHUP retry), before it reads the image.
    AFTER_EXEC = "after-exec"
    #: After the first session was restored (by the successor, or in-process).
    RESTORE = "restore"


@dataclass(frozen=True)
class KillAt:
    """``kill-at STEP``: SIGKILL at ``step``."""

    step: FaultStep


@dataclass(frozen=True)
class StopAt:
    """``stop-at STEP``: SIGSTOP at ``step``."""

    step: FaultStep


@dataclass(frozen=True)
class FreezeFail:
    """``freeze-fail ERRNO [TOKEN]``: the freeze of ``token`` (any if ``None``) fails."""

    errno: int
    token: int | None = None

    def applies_to(self, file: PreservedFile) -> bool:
        return self.token is None or self.token == file.token


Fault = KillAt | StopAt | FreezeFail


def _errno(word: str) -> int | None:
    value = getattr(errno, word, None)
    if isinstance(value, int):
        return value
    try:
        return int(word, 0)
    except ValueError:
        return None


def _parse_line(words: list[str]) -> Fault | None:
    """One line's fault; ``None`` when it is not one (see the module doc)."""
    match words:
        case ["kill-at" | "stop-at" as kind, step] if step in FaultStep._value2member_map_:
            return KillAt(FaultStep(step)) if kind == "kill-at" else StopAt(FaultStep(step))
        case ["freeze-fail", err, *token] if len(token) <= 1:
            number = _errno(err)
            if number is None:
                return None
            try:
                return FreezeFail(number, int(token[0], 0) if token else None)
            except ValueError:
                return None
    return None


def parse_faults(text: str) -> list[Fault]:
    """The faults a fault file asks for, in file order."""
    faults = (_parse_line(line.split()) for line in text.splitlines())
    return [fault for fault in faults if fault is not None]


class FaultInjector:
    """Reads the fault file at each step and does what it asks.

    Args:
        path: The fault file; by default ``$LUOD_FAULT_FILE`` (none: no faults).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(FAULT_ENV)

    def faults(self) -> list[Fault]:
        """What the file asks for now (read every time: tests edit it)."""
        if not self.path:
            return []
        try:
            return parse_faults(Path(self.path).read_text())
        except (OSError, UnicodeDecodeError):
            return []

    def point(self, step: FaultStep) -> None:
        """Die or stop here if the fault file asks for it."""
        for fault in self.faults():
            if isinstance(fault, KillAt) and fault.step is step:
                event("fault-kill", logging.WARNING, step=step.value)
                logging.shutdown()  # the log line must reach the test first
                os.kill(os.getpid(), signal.SIGKILL)
            elif isinstance(fault, StopAt) and fault.step is step:
                event("fault-stop", logging.WARNING, step=step.value)
                os.kill(os.getpid(), signal.SIGSTOP)

    def freeze(self, file: PreservedFile) -> None:
        """Fail this file's freeze if asked (raises the injected ``OSError``)."""
        for fault in self.faults():
            if isinstance(fault, FreezeFail) and fault.applies_to(file):
                raise OSError(fault.errno, f"injected freeze failure of token {file.token:#x}")
