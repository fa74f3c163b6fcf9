"""The v2 state machine: GET_STATE and SET_EVENT (device extensions).

The reviewed LUO series drove an update with a global state machine and one
"set event" ioctl; luod keeps it for orchestrating its own live update::

    NORMAL --PREPARE--> PREPARED --REBOOT--> FROZEN --(next generation)--> UPDATED
       ^                  |                                                  |
       +-----CANCEL-------+                     last incoming session finished
       +-------------------------------------------------------------------+

REBOOT is also accepted from NORMAL (the pre-flight then runs implicitly) and
from UPDATED (unfinished incoming sessions are released, as in Linux).

The orchestrator decides; the *host* (luod's server) provides what needs
the outside world: running the pre-flight child, writing the image,
starting the next generation once the reply has been sent.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Protocol

from liveupdate import uapi
from liveupdate.core import reboot
from liveupdate.core.file import PreservedFile
from liveupdate.core.luo import DeviceCall, Orchestrator, is_privileged
from liveupdate.core.session import Owner, finish_session
from liveupdate.dispatch import IoctlOp
from liveupdate.handover_abi import HandoverImage

__all__ = ["STATE_OPS", "RebootHost", "finish_all", "prepare", "start_reboot"]

State = uapi.LuodState
Event = uapi.LuodEvent


class RebootHost(Protocol):
    """What the orchestrator needs from its host to update itself."""

    def preflight(self, image: HandoverImage) -> None:
        """Have the code that runs next read ``image``; ``OSError(EIO, why)`` if it cannot."""

    def begin_reboot(self, intent: HandoverImage) -> None:
        """Record what is about to be handed over (read back only after a crash)."""

    def freeze_hook(self, file: PreservedFile) -> None:
        """Called after each file's freeze (tests inject faults here)."""

    def abort_reboot(self) -> None:
        """The reboot failed before it was committed: forget the intent."""

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        """Write the final image and start the next generation after this reply."""


def _host(call: DeviceCall) -> RebootHost:
    if call.host is None:
        raise OSError(errno.EOPNOTSUPP, "this transport cannot reboot the orchestrator")
    host: RebootHost = call.host
    return host


def _fail(luo: Orchestrator, exc: OSError) -> OSError:
    luo.last_error = exc.strerror or str(exc)
    return exc


def _dry_run_image(luo: Orchestrator) -> HandoverImage:
    """Freeze and thaw at once: proves every file can freeze, yields the image."""
    image = reboot.freeze(luo)
    reboot.thaw(luo)
    return image


def prepare(luo: Orchestrator, host: RebootHost) -> None:
    """PREPARE: run the pre-flight and move to PREPARED."""
    if luo.state == State.FROZEN:
        raise OSError(errno.EBUSY, "a reboot is in progress")
    try:
        host.preflight(_dry_run_image(luo))
    except OSError as exc:
        raise _fail(luo, exc) from None
    luo.last_error = ""
    luo.prepared_mark = luo.mutations
    luo.set_state(State.PREPARED)


def cancel(luo: Orchestrator) -> None:
    """CANCEL: leave PREPARED."""
    if luo.state != State.PREPARED:
        raise _fail(luo, OSError(errno.EINVAL, "not prepared: nothing to cancel"))
    luo.prepared_mark = None
    luo.set_state(luo.resting_state())


def _check_names(luo: Orchestrator) -> None:
    """The next generation gets one incoming session per name: refuse a clash.

    A handed-over session still waiting for its successor and an outgoing
    session of the same name would both be incoming after the reboot.
    """
    waiting = {s.name for s in reboot.handed_over_sessions(luo) if s.handed_over}
    for name in luo.outgoing:
        # CREATE_SESSION refuses such a name to anyone but the waiting
        # session's owner (and root): only they can be in this situation.
        if name in waiting:
            shown = name.decode(errors="backslashreplace")
            raise OSError(
                errno.EEXIST,
                f"session {shown!r} is both outgoing and handed over waiting for its "
                "successor: retrieve it, or release it with FINISH, before rebooting",
            )


def start_reboot(luo: Orchestrator, host: RebootHost, no_exec: bool) -> None:
    """REBOOT: pre-flight if needed, freeze everything, commit the image.

    The next generation starts after the reply (the host's business). On
    any failure (of any kind: a third-party handler may raise anything) the
    frozen files are thawed, the intent is dropped and the state restored.
    """
    if luo.state == State.FROZEN:
        raise OSError(errno.EBUSY, "a reboot is in progress")
    try:
        _check_names(luo)
    except OSError as exc:
        raise _fail(luo, exc) from None
    previous = luo.state
    # The intent goes to disk first: a holder killed from here on (even in
    # the pre-flight) leaves a record of what it held.
    host.begin_reboot(reboot.snapshot(luo))
    frozen = False
    try:
        checked = previous == State.PREPARED and luo.prepared_mark == luo.mutations
        if not checked and not no_exec:
            host.preflight(_dry_run_image(luo))
        luo.set_state(State.FROZEN)
        image = reboot.freeze(luo, hook=host.freeze_hook)
        frozen = True
        host.commit_reboot(image, no_exec)
    except Exception as exc:
        if frozen:
            reboot.thaw(luo)
        host.abort_reboot()
        luo.set_state(previous)
        if not isinstance(exc, OSError):
            exc = OSError(errno.EIO, f"reboot failed: {type(exc).__name__}: {exc}")
        raise _fail(luo, exc) from None
    luo.last_error = ""


def finish_all(luo: Orchestrator, owner: Owner | None = None) -> None:
    """FINISH: finish every incoming session; all-or-nothing on refusals.

    With ``owner`` (an unprivileged caller), only the incoming sessions that
    ``owner``'s uid owns: nobody discards another user's state.
    Sessions never retrieved are released at once (their names then give
    ENOENT); retrieved ones stay until their fd closes, finished.
    """
    sessions = [
        s
        for s in luo.incoming.values()
        if not s.finished and (owner is None or s.owner.uid == owner.uid)
    ]
    for session in sessions:
        for file in session.files.values():
            if not file.handler.can_finish(file):
                raise _fail(
                    luo,
                    OSError(
                        errno.EBUSY,
                        f"session {session.display_name!r} file {file.token:#x} cannot finish yet",
                    ),
                )
    for session in sessions:
        finish_session(luo, session, force=True)
        if not session.retrieved:
            del luo.incoming[session.name]
    if luo.state != State.PREPARED:  # a prepared update stays prepared
        luo.set_state(luo.resting_state())


# -- ioctl handlers -------------------------------------------------------------


def _get_state(call: DeviceCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_get_state)
    luo = call.luo
    arg.state = luo.state
    arg.generation = luo.generation
    arg.outgoing_sessions = len(luo.outgoing)
    arg.incoming_sessions = len(luo.incoming)
    arg.preserved_files = luo.file_count
    arg.max_sessions = luo.limits.max_sessions
    arg.max_files = luo.limits.max_files
    arg.lost_sessions = luo.lost_sessions
    arg.journal_error = luo.journal_error
    arg.flags = uapi.LUOD_STATE_LOST_INCOMPLETE if luo.lost_incomplete else 0
    text = luo.last_error.encode(errors="replace")[: uapi.LUOD_ERROR_LENGTH - 1]
    ctypes.memmove(arg.last_error, text, len(text))


def _set_event(call: DeviceCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_set_event)
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    if arg.event not in Event.__members__.values():
        raise OSError(errno.EOPNOTSUPP, f"unknown event {arg.event}")
    if arg.flags & ~uapi.LUOD_SET_EVENT_FLAGS:
        raise OSError(errno.EOPNOTSUPP, f"unknown flags {arg.flags:#x}")
    event = Event(arg.event)
    if arg.flags and event != Event.REBOOT:
        raise OSError(errno.EINVAL, "flags are only valid with REBOOT")
    luo = call.luo
    privileged = is_privileged(call.owner, luo.limits)
    if event != Event.FINISH and not privileged:
        # Checked before last_error is touched: a refused caller changes nothing.
        raise OSError(
            errno.EACCES,
            f"uid {call.owner.uid} may not {event.name.lower()} a live update "
            "(root, luod's user or its --admin-group only)",
        )
    luo.last_error = ""  # the reason of *this* event's failure, if any
    arg.generation = luo.generation
    if event == Event.PREPARE:
        prepare(luo, _host(call))
    elif event == Event.CANCEL:
        cancel(luo)
    elif event == Event.REBOOT:
        start_reboot(luo, _host(call), bool(arg.flags & uapi.LUOD_REBOOT_NO_EXEC))
    else:
        finish_all(luo, None if privileged else call.owner)


#: The state machine's device ioctls.
STATE_OPS: list[IoctlOp[DeviceCall]] = [
    IoctlOp(uapi.GET_STATE, _get_state),
    IoctlOp(uapi.SET_EVENT, _set_event),
]
