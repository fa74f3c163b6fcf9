"""The live update of the orchestrator: the order of its steps, and the
state machine's device ioctls (GET_STATE, SET_EVENT).

The analog of LUO's reboot path in ``kernel/liveupdate/luo_core.c`` (the
reboot notifier calling ``luo_session_serialize``, then KHO), plus the v2
series' global state machine that luod keeps for its own update::

    NORMAL --PREPARE--> PREPARED --REBOOT--> FROZEN --(next generation)--> UPDATED
       ^                  |                                                  |
       +-----CANCEL-------+                     last incoming session finished
       +-------------------------------------------------------------------+

REBOOT is also accepted from NORMAL (the pre-flight then runs implicitly) and
from UPDATED (unfinished incoming sessions are released, as in Linux).

This module only *orders* the steps; each piece of state is changed by its
owner. A reboot:

1. writes the intent (what is about to be handed over) through the host;
2. runs the pre-flight unless PREPARE's still covers every change;
3. freezes every outgoing session (:meth:`SessionSet.freeze`, rolled back
   when a file fails) and commits the image through the host, which then
   re-executes (``luod``) with every preserved fd inherited, or stays
   in-process (``--no-exec``);
4. :func:`restore` builds the next :class:`Orchestrator` from the image and
   the inherited fds. A failure leaves nothing half-restored: the caller
   keeps the old fds and the image, and every open answers ``EIO``.

The orchestrator decides; the *host* (:class:`RebootHost`, luod's re-exec
driver) does what needs the outside world.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import time
from collections.abc import Callable

from liveupdate import uapi
from liveupdate.core.file import FreezeHook, HandlerRegistry
from liveupdate.core.luo import DeviceCall, Hooks, Orchestrator, RebootHost, RebootTimes
from liveupdate.core.policy import Limits, Owner, fd_reserve, fds_open, is_privileged
from liveupdate.core.session import Session
from liveupdate.dispatch import IoctlOp
from liveupdate.handover_abi import HandoverImage

__all__ = [
    "STATE_OPS",
    "RebootHost",
    "cancel",
    "finish_all",
    "freeze",
    "prepare",
    "preserved_fds",
    "restore",
    "snapshot",
    "start_reboot",
]

State = uapi.LuodState
Event = uapi.LuodEvent


def snapshot(luo: Orchestrator, writer: str = "") -> HandoverImage:
    """The image of what would be handed over, as it is, without freezing.

    Written before the freeze starts so that a holder killed mid-reboot
    leaves a record of what it held (the next cold start reports it lost).
    """
    return HandoverImage(
        luo.generation,
        luo.sessions.records(),
        writer=writer,
        cold_started_ns=luo.cold_started_ns,
        participants=luo.participants.records(),
    )


def freeze(luo: Orchestrator, hook: FreezeHook | None = None) -> HandoverImage:
    """Freeze every outgoing session and return the handover image; on
    failure nothing changed and the handler's error propagates."""
    luo.sessions.freeze(hook)
    return snapshot(luo)


def preserved_fds(luo: Orchestrator) -> list[int]:
    """Every fd the next generation must inherit, in image order."""
    return [fd for s in luo.sessions.handed_over() for fd in s.files.fds()]


def _fail(luo: Orchestrator, exc: OSError) -> OSError:
    luo.last_error = exc.strerror or str(exc)
    return exc


def _dry_run_image(luo: Orchestrator) -> HandoverImage:
    """Freeze and thaw at once: proves every file can freeze, yields the image."""
    image = freeze(luo)
    luo.sessions.thaw()
    return image


def prepare(luo: Orchestrator, host: RebootHost) -> None:
    """PREPARE: ask the participants, run the pre-flight and move to PREPARED.

    The participants first: a refusal costs no pre-flight, and the data they
    set at PREPARE is in the image the pre-flight checks. On any failure
    every participant that accepted gets CANCEL and the state is unchanged.
    """
    if luo.state == State.FROZEN:
        raise OSError(errno.EBUSY, "a reboot is in progress")
    try:
        luo.participants.prepare()
        host.preflight(_dry_run_image(luo))
    except OSError as exc:
        luo.participants.cancel()
        raise _fail(luo, exc) from None
    luo.last_error = ""
    luo.prepared_mark = luo.sessions.mutations
    luo.set_state(State.PREPARED)


def cancel(luo: Orchestrator) -> None:
    """CANCEL: leave PREPARED."""
    if luo.state != State.PREPARED:
        raise _fail(luo, OSError(errno.EINVAL, "not prepared: nothing to cancel"))
    luo.participants.cancel()
    luo.prepared_mark = None
    luo.set_state(luo.resting_state())


def _check_names(luo: Orchestrator) -> None:
    """The next generation gets one incoming session per name: refuse a clash.

    A handed-over session still waiting for its successor and an outgoing
    session of the same name would both be incoming after the reboot.
    CREATE_SESSION refuses such a name to anyone but the waiting session's
    owner (and root): only they can be in this situation.
    """
    waiting = {s.name for s in luo.sessions.incoming.values() if s.waiting}
    for name in luo.sessions.outgoing:
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
    # From here on no other call is served until the next generation serves.
    started_ns = time.time_ns()
    try:
        _check_names(luo)
    except OSError as exc:
        raise _fail(luo, exc) from None
    previous = luo.state
    # The intent goes to disk first: a holder killed from here on (even in
    # the pre-flight) leaves a record of what it held.
    host.begin_reboot(snapshot(luo))
    frozen = False
    try:
        # Participants registered since PREPARE (or all, without one) are
        # asked to PREPARE first: none is ever frozen unprepared.
        luo.participants.prepare()
        checked = previous == State.PREPARED and luo.prepared_mark == luo.sessions.mutations
        if not checked and not no_exec:
            host.preflight(_dry_run_image(luo))
        # FROZEN first: the state file tells every session holder watching it;
        # then the participants stop (a VMM pauses, a cache stops writes), and
        # only then are the files frozen, so what they capture is final.
        luo.set_state(State.FROZEN)
        frozen_ns = time.time_ns()
        luo.participants.freeze()
        image = freeze(luo, host.freeze_hook)
        frozen = True
        # Stamped, not compared: the image is still the one the pre-flight checked.
        image.reboot_started_ns, image.frozen_ns = started_ns, frozen_ns
        host.commit_reboot(image, no_exec)
    except Exception as exc:
        # Thawed in the reverse order: the files, then the participants
        # (CANCEL, last registered first) resume on files that are live again.
        if frozen:
            luo.sessions.thaw()
        luo.participants.cancel()
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
    """
    try:
        luo.sessions.finish_incoming(owner)
    except OSError as exc:
        raise _fail(luo, exc) from None
    # Then the participants' data of the previous generation, with a FINISH
    # to each participant that got it back; this cannot fail.
    luo.participants.finish(owner)
    if luo.state != State.PREPARED:  # a prepared update stays prepared
        luo.set_state(luo.resting_state())


def restore(
    image: HandoverImage,
    registry: HandlerRegistry,
    limits: Limits | None = None,
    hooks: Hooks | None = None,
    on_session: Callable[[Session], None] | None = None,
) -> Orchestrator:
    """Build the next generation from ``image`` and the inherited fds it names.

    Raises :class:`OSError` (``EIO``) with the reason when anything does not
    fit; nothing is closed in that case, so a fixed version can try again
    with the same fds. ``on_session`` is called after each restored session
    (fault injection).
    """
    luo = Orchestrator(registry, limits, generation=image.liveupdate_number + 1, hooks=hooks)
    # The participants' data first: the sessions' restore settles the state,
    # which stays UPDATED while that data waits for FINISH.
    luo.participants.restore(image.participants)
    luo.sessions.restore(image.sessions, on_session)
    luo.cold_started_ns = image.cold_started_ns
    luo.arrival = RebootTimes(image.reboot_started_ns, image.frozen_ns)
    return luo


# -- the state machine's device ioctls ----------------------------------------------


def _get_state(call: DeviceCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_get_state)
    luo = call.luo
    arg.state = luo.state
    arg.generation = luo.generation
    arg.outgoing_sessions = len(luo.sessions.outgoing)
    arg.incoming_sessions = len(luo.sessions.incoming)
    arg.preserved_files = luo.sessions.file_count
    arg.max_sessions = luo.limits.max_sessions
    arg.max_files = luo.limits.max_files
    arg.lost_sessions = luo.lost_sessions
    arg.journal_error = luo.journal_error
    arg.flags = uapi.LUOD_STATE_LOST_INCOMPLETE if luo.lost_incomplete else 0
    text = luo.last_error.encode(errors="replace")[: uapi.LUOD_ERROR_LENGTH - 1]
    ctypes.memmove(arg.last_error, text, len(text))
    # What the operator reads first (``luoctl status``): computed here, when
    # asked, never on the path of the other calls.
    budget = luo.hooks.budget
    arg.pid = os.getpid()
    arg.copies = budget.copies
    arg.copies_error = luo.hooks.copies_error()
    arg.last_reboot_error = luo.last_reboot_error
    arg.recovered_sessions = luo.recovered_sessions
    arg.recovered_files = luo.recovered_files
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    arg.fd_limit = min(soft, _U32_MAX) if soft != resource.RLIM_INFINITY else _U32_MAX
    try:
        arg.fds_open = fds_open()
    except OSError:  # not even one fd free to list them: the table is full
        arg.fds_open = arg.fd_limit
    arg.fd_reserve = min(fd_reserve(luo.limits, soft), _U32_MAX)
    arg.fds_per_file = budget.fds_per_file
    arg.started_ns = luo.started_ns
    arg.cold_started_ns = luo.cold_started_ns
    arg.last_reboot_ns = luo.last_reboot_ns
    arg.last_reboot_blackout_ns = luo.reboot_blackout_ns


_U32_MAX = 0xFFFF_FFFF


def _host(call: DeviceCall) -> RebootHost:
    if call.host is None:
        raise OSError(errno.EOPNOTSUPP, "this transport cannot reboot the orchestrator")
    return call.host


def _parse_event(arg: uapi.luod_set_event) -> Event:
    """The event asked for, after the checks every caller gets."""
    if arg.reserved:
        raise OSError(errno.EINVAL, "reserved must be 0")
    if arg.event not in Event.__members__.values():
        raise OSError(errno.EOPNOTSUPP, f"unknown event {arg.event}")
    if arg.flags & ~uapi.LUOD_SET_EVENT_FLAGS:
        raise OSError(errno.EOPNOTSUPP, f"unknown flags {arg.flags:#x}")
    event = Event(arg.event)
    if arg.flags and event != Event.REBOOT:
        raise OSError(errno.EINVAL, "flags are only valid with REBOOT")
    return event


def _set_event(call: DeviceCall, arg: ctypes.Structure) -> None:
    assert isinstance(arg, uapi.luod_set_event)
    event = _parse_event(arg)
    luo = call.luo
    privileged = is_privileged(call.owner, luo.limits)
    if event != Event.FINISH and not privileged:
        # Checked before last_error is touched: a refused caller changes nothing.
        raise OSError(
            errno.EACCES,
            f"uid {call.owner.uid} may not {event.name.lower()} a live update "
            "(root, luod's user or its --admin-group only)",
        )
    if event != Event.CANCEL:
        # The reason of *this* event's failure, if any. A CANCEL keeps the
        # last one: it is how a failed update is undone (luoctl reboot's own
        # PREPARE), and the operator still wants to read why it failed.
        luo.last_error = ""
    arg.generation = luo.generation
    if event == Event.PREPARE:
        prepare(luo, _host(call))
    elif event == Event.CANCEL:
        cancel(luo)
    elif event == Event.REBOOT:
        try:
            start_reboot(luo, _host(call), bool(arg.flags & uapi.LUOD_REBOOT_NO_EXEC))
        except OSError as exc:
            luo.last_reboot_error = exc.errno or errno.EIO
            raise
    else:
        finish_all(luo, None if privileged else call.owner)


#: The state machine's device ioctls; :func:`liveupdate.core.tables.device_table`
#: adds them to the device's own.
STATE_OPS: list[IoctlOp[DeviceCall]] = [
    IoctlOp(uapi.GET_STATE, _get_state),
    IoctlOp(uapi.SET_EVENT, _set_event),
]
