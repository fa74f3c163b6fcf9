"""``luoctl``: the operator's tool for luod.

Every command talks to the device through the client library (so it works
over luod's socket, and the upstream parts against a kernel too), except
``inspect``, which only decodes a handover image file with the ABI modules
(``handover_codec``, ``handler_abi``). luoctl imports no core or server code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import click
from rich.table import Table

import liveupdate
from liveupdate import uapi
from liveupdate.cli.context import Context, complete_sessions, console, count, err_console, fail
from liveupdate.cli.image import inspect
from liveupdate.cli.progress import Steps
from liveupdate.cli.status import state_dict, state_rows, status, watch_state
from liveupdate.cli.units import install_units
from liveupdate.client.control import Control
from liveupdate.client.device import StateInfo
from liveupdate.client.errors import error_from_errno
from liveupdate.client.listing import FileInfo, ParticipantInfo, SessionInfo
from liveupdate.client.service import direction_name

__all__ = ["main"]


def _session_error(exc: liveupdate.LiveUpdateError, name: str, hint: str) -> OSError:
    """``exc`` said of the session ``name`` (ENOENT, EACCES), else unchanged."""
    if exc.errno == errno.ENOENT:
        return error_from_errno(exc.errno, f"session {name!r}", "no such session", hint)
    if exc.errno == errno.EACCES:
        return error_from_errno(
            exc.errno,
            f"session {name!r}",
            "it belongs to another user",
            "run luoctl as its owner or as root",
        )
    return exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket",
    default=None,
    metavar="PATH",
    help="Device to talk to [default: $LIVEUPDATE_DEVICE, /dev/liveupdate, luod's default socket].",
)
@click.option(
    "--control-socket",
    "control",
    default=None,
    metavar="PATH",
    help="luod's control socket, used by status, state, prepare, cancel, reboot, finish "
    "and sessions [default: 'control' next to the device socket if it exists, else the device].",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=10.0,
    show_default=True,
    help="Seconds to wait while the device is busy (another opener).",
)
@click.version_option(liveupdate.__version__, prog_name="luoctl")
@click.pass_context
def main(
    ctx: click.Context, socket: str | None, control: str | None, as_json: bool, timeout: float
) -> None:
    """Operate the Live Update Orchestrator daemon (luod)."""
    ctx.obj = Context(socket, as_json, timeout, control)


@main.command()
@click.option("--watch", is_flag=True, help="Print each change of the state until interrupted.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    metavar="SECONDS",
    default=0.2,
    show_default=True,
    help="Seconds between two looks with --watch.",
)
@click.pass_obj
def state(obj: Context, watch: bool, interval: float) -> None:
    """Show the state machine, the generation, counts and limits."""
    if watch:
        watch_state(obj, interval)
        return
    try:
        with obj.open_state() as dev:
            info = dev.get_state()
            participants = _participants(dev)
    except OSError as exc:
        fail(exc)
    data = state_dict(info)
    if participants:  # the key only when some take part: GET_STATE's fields stay as they were
        data["participants"] = [_participant_summary(p) for p in participants]
    if obj.json:
        obj.emit(data, "")
        return
    table = Table(show_header=False, box=None)
    for key, value in state_rows(data, time.time()):
        table.add_row(key, value)
    console.print(table)
    if participants:
        _print_participants(participants)


def _participants(dev: liveupdate.Device | Control) -> tuple[ParticipantInfo, ...] | None:
    """The participants luod lists; ``None`` where there is no listing (a kernel,
    or another user's view refused): the state alone is still worth showing."""
    try:
        return dev.list_sessions(files=False).participants
    except liveupdate.LiveUpdateError:
        return None


def _participant_summary(part: ParticipantInfo) -> dict[str, object]:
    """A participant in ``luoctl --json state``: its name, phase and last answer."""
    return {
        "name": part.name,
        "pid": part.pid,
        "phase": part.phase,
        "last": None if part.last is None else part.last.to_dict(),
    }


def _print_participants(participants: tuple[ParticipantInfo, ...]) -> None:
    """The participants' table of ``luoctl state`` and ``luoctl sessions``."""
    table = Table("participant", "owner", "pid", "phase", "data", "carried", "last answer")
    for part in participants:
        last = "-"
        if part.last is not None:
            outcome = part.last.error or "ok"
            last = f"{part.last.event}: {outcome}"
            if part.last.reason:
                last += f" ({part.last.reason})"
        table.add_row(
            part.name,
            f"{part.uid}:{part.gid}",
            str(part.pid),
            part.phase,
            f"{part.data_len} B",
            f"{part.carried} B",
            last,
        )
    console.print(table)


def _with_reason(dev: liveupdate.Device | Control, exc: OSError) -> OSError:
    """``exc`` with luod's explanation (GET_STATE's last_error) when it has one."""
    try:
        reason = dev.get_state().last_error
    except OSError:
        return exc  # luod is gone too: the original error says more
    return type(exc)(exc.errno, reason) if reason else exc


def _event(obj: Context, event: uapi.LuodEvent, done: str, step: str = "") -> None:
    """Send ``event``; ``step`` names it on the progress display while luod works."""
    try:
        with obj.open_state() as dev, Steps(err_console) as steps:
            if step:
                steps.step(step.format(generation=dev.get_state().generation))
            try:
                generation = dev.set_event(event)
            except OSError as exc:
                raise _with_reason(dev, exc) from None
    except OSError as exc:
        fail(exc)
    obj.emit({"event": event.name.lower(), "generation": generation}, done)


@main.command()
@click.pass_obj
def prepare(obj: Context) -> None:
    """Run the pre-flight of a live update (NORMAL -> PREPARED)."""
    _event(
        obj,
        uapi.LuodEvent.PREPARE,
        "prepared: the installed luod can read this generation",
        "pre-flight: the installed luod reads a dry-run image of generation {generation}",
    )


@main.command()
@click.pass_obj
def cancel(obj: Context) -> None:
    """Leave PREPARED."""
    _event(obj, uapi.LuodEvent.CANCEL, "cancelled")


@main.command()
@click.pass_obj
def finish(obj: Context) -> None:
    """Finish every incoming session (UPDATED -> NORMAL)."""
    _event(
        obj,
        uapi.LuodEvent.FINISH,
        "finished every incoming session",
        "finishing the incoming sessions of generation {generation}",
    )


@main.command()
@click.option("--no-exec", is_flag=True, help="Start the next generation in-process (no exec).")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=120.0,
    show_default=True,
    help="Seconds to wait for the next generation to serve.",
)
@click.option(
    "--no-prepare",
    is_flag=True,
    help="From NORMAL, REBOOT at once: the next generation starts inside the blackout.",
)
@click.pass_obj
def reboot(obj: Context, no_exec: bool, wait: float, no_prepare: bool) -> None:
    """Live-update luod; returns once the next generation serves.

    From NORMAL it first PREPAREs, as a kexec is loaded before the jump: the
    next generation starts and checks this one's image while this one still
    serves, which takes its start-up out of the blackout.
    """
    flags = uapi.LUOD_REBOOT_NO_EXEC if no_exec else 0
    start = time.monotonic()
    try:
        with Steps(err_console) as steps:
            with obj.open_state() as dev:
                before = dev.get_state()
                old = before.generation
                sessions = count(before.outgoing_sessions, "session")
                files = count(before.preserved_files, "file")
                ahead = not (no_exec or no_prepare) and before.state == uapi.LuodState.NORMAL
                if ahead:
                    steps.step(f"pre-flight: generation {old + 1} starting ahead (PREPARE)")
                    try:
                        dev.set_event(uapi.LuodEvent.PREPARE)
                    except OSError as exc:
                        raise _with_reason(dev, exc) from None
                checks = "freeze" if no_exec or ahead else "pre-flight and freeze"
                steps.step(f"{checks} of generation {old}: {sessions}, {files}")
                try:
                    dev.set_event(uapi.LuodEvent.REBOOT, flags)
                except OSError as exc:
                    failure = _with_reason(dev, exc)
                    if ahead:
                        # Leave luod as it was found: the PREPARE was ours.
                        with contextlib.suppress(OSError):
                            dev.set_event(uapi.LuodEvent.CANCEL)
                    raise failure from None
            steps.step(f"generation {old + 1} starting: restoring {sessions}, {files}")
            new = _wait_generation(obj, old + 1, start + wait)
    except OSError as exc:
        fail(exc)
    elapsed = time.monotonic() - start
    obj.emit(
        {"old_generation": old, "new_generation": new.generation, "seconds": elapsed,
         "state": new.state.name.lower(), "incoming_sessions": new.incoming_sessions},
        f"rebooted: generation {old} -> {new.generation} in {elapsed:.3f} s "
        f"({count(new.incoming_sessions, 'incoming session')})",
    )  # fmt: skip


def _wait_generation(obj: Context, generation: int, deadline: float) -> StateInfo:
    """Open the device until the generation ``generation`` answers."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            # A timeout of 0 would mean "no retry, unbounded open": keep a bound.
            with obj.open_state(timeout=max(0.001, remaining)) as dev:
                info = dev.get_state()
            if info.generation >= generation:
                return info
        except liveupdate.StaleGenerationError:
            pass  # opened just before the old generation closed its connections
        except liveupdate.NotFoundError:
            pass  # socket momentarily absent
        except liveupdate.LiveUpdateError as exc:
            if exc.errno != errno.ETIMEDOUT:
                raise
        if time.monotonic() >= deadline:
            raise liveupdate.LiveUpdateError(
                errno.ETIMEDOUT, f"generation {generation} did not start serving"
            )
        time.sleep(0.005)


@main.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--session",
    "name",
    required=True,
    shell_complete=complete_sessions,
    help="The session holding the service's state.",
)
@click.option(
    "--keep-on-close",
    is_flag=True,
    help="If this supervisor dies, luod keeps the session for the next `luoctl run`.",
)
@click.option(
    "--stop-signal",
    default="SIGTERM",
    show_default=True,
    help="Signal that asks the service to stop before an update.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=10.0,
    show_default=True,
    help="Seconds to wait for the service to stop before SIGKILL.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=30.0,
    show_default=True,
    help="Seconds a version started ahead of an update has to report ready.",
)
@click.option(
    "--restart",
    type=click.Choice(["on-failure", "no"]),
    default="on-failure",
    show_default=True,
    help="Restart a crashed service with its state handed over.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run(
    obj: Context,
    name: str,
    keep_on_close: bool,
    stop_signal: str,
    stop_timeout: float,
    ready_timeout: float,
    restart: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with its state kept in session NAME across updates and crashes.

    COMMAND gets the session fd in LIVEUPDATE_SESSION_FD (with
    LIVEUPDATE_SESSION_NAME and LIVEUPDATE_SESSION_STATE=incoming|outgoing;
    LIVEUPDATE_NEXT_SESSION_FD when incoming): see liveupdate.inherited_session().
    SIGHUP or `luoctl update NAME` updates it: stop, hand over, start again;
    a service that watches svc.freeze_fd() gets its next version started first,
    and frozen only once that one is ready.
    """
    from liveupdate.cli.supervisor import CommandError, Supervisor

    try:
        sig = signal.Signals[stop_signal if stop_signal.startswith("SIG") else "SIG" + stop_signal]
    except KeyError:
        raise click.BadParameter(
            f"unknown signal {stop_signal}", param_hint="--stop-signal"
        ) from None
    supervisor = Supervisor(
        obj.socket,
        name,
        command,
        keep_on_close=keep_on_close,
        stop_signal=sig,
        stop_timeout=stop_timeout,
        ready_timeout=ready_timeout,
        restart=restart,
        open_timeout=obj.timeout,
    )
    try:
        sys.exit(supervisor.run())
    except CommandError as exc:
        fail(exc, exc.status)
    except OSError as exc:
        fail(exc)


def _outgoing_entry(dev: liveupdate.Device, name: str) -> SessionInfo:
    start = f"start its service with 'luoctl run --session {name} -- COMMAND'"
    try:
        entries = dev.list_sessions(name, files=False).sessions
    except liveupdate.LiveUpdateError as exc:
        raise _session_error(exc, name, start) from None
    for entry in entries:
        if entry.direction == uapi.SessionDirection.OUTGOING:
            return entry
    raise error_from_errno(
        errno.ENOENT, f"session {name!r}", "no outgoing session: no supervisor holds it", start
    )


def _is_supervisor(pid: int, name: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    text = [a.decode(errors="replace") for a in argv]
    return "run" in text and name in text and any("luoctl" in a for a in text[:3])


def _ask_supervisor(pid: int, wait: float) -> str | None:
    """Ask supervisor ``pid`` for an update on its socket; its answer, None if it has none.

    The answer is only taken from ``pid`` itself (SO_PEERCRED): anyone can
    bind an abstract socket name.
    """
    from liveupdate.cli.supervisor import peer_credentials, update_address

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(update_address(pid))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        if peer_credentials(sock)[0] != pid:
            return None
        sock.settimeout(wait)
        sock.sendall(b"update")
        try:
            answer = sock.recv(4096)
        except TimeoutError:
            raise liveupdate.LiveUpdateError(errno.ETIMEDOUT, f"{pid}: no answer") from None
        if not answer:
            raise error_from_errno(errno.ECONNRESET, "the supervisor", "closed without an answer")
        return answer.decode(errors="replace")


@main.command()
@click.argument("name", shell_complete=complete_sessions)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=60.0,
    show_default=True,
    help="Seconds to wait.",
)
@click.pass_obj
def update(obj: Context, name: str, wait: float) -> None:
    """Update the service that `luoctl run --session NAME` supervises.

    Asks its supervisor and returns once the new version took over (or, for a
    supervisor that does not take requests, sends it SIGHUP and returns once
    it handed the session over). Fails, saying why, when the new version did
    not become ready: the old one then keeps serving.
    """
    try:
        with obj.open() as dev:
            entry = _outgoing_entry(dev, name)
        pid = entry.pid
        if not _is_supervisor(pid, name):
            raise error_from_errno(
                errno.ESRCH,
                f"session {name!r}",
                "not held by a `luoctl run` supervisor",
                "`luoctl update` only updates services that `luoctl run` supervises",
            )
        answer = _ask_supervisor(pid, wait)
        if answer is not None:
            outcome, _, text = answer.partition(" ")
            if outcome != "ok":
                raise error_from_errno(errno.ECANCELED, f"update of {name!r}", text or answer)
            obj.emit(
                {"session": name, "supervisor": pid},
                f"updated {name!r} (supervisor pid {pid}): {text}",
            )
            return
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + wait
        while True:
            time.sleep(0.02)
            try:
                with obj.open() as dev:
                    now = _outgoing_entry(dev, name)
                if now.created != entry.created:
                    break
            except liveupdate.NotFoundError:
                pass
            if time.monotonic() > deadline:
                raise liveupdate.LiveUpdateError(errno.ETIMEDOUT, f"{name!r} was not updated")
    except OSError as exc:
        fail(exc)
    obj.emit({"session": name, "supervisor": pid}, f"updated {name!r} (supervisor pid {pid})")


def _describe_file(file: FileInfo) -> str:
    return " ".join(f"{k}={v}" for k, v in file.details.items())


@main.command()
@click.argument("name", required=False, shell_complete=complete_sessions)
@click.pass_obj
def sessions(obj: Context, name: str | None) -> None:
    """List sessions (yours, or every one as root) and their files."""
    try:
        with obj.open_state() as dev:
            try:
                listing = dev.list_sessions(name)
            except liveupdate.LiveUpdateError as exc:
                if name is None:
                    raise
                raise _session_error(exc, name, "see 'luoctl sessions'") from None
    except OSError as exc:
        fail(exc)
    if obj.json:
        click.echo(json.dumps(listing.to_dict(), sort_keys=True, indent=2))
        return
    now = time.time()
    table = Table("session", "direction", "owner", "age", "token", "type", "handler", "details")
    for entry in listing.sessions:
        age = f"{now - entry.created:.0f}s"
        direction = direction_name(entry.direction)
        flags = " keep-on-close" if entry.keep_on_close else ""
        head = [entry.name, direction + flags, f"{entry.uid}:{entry.gid}", age]
        files = entry.files or ()
        if not files:
            table.add_row(*head, "-", "-", "-", "")
        for i, file in enumerate(files):
            cells = head if i == 0 else ["", "", "", ""]
            table.add_row(
                *cells,
                f"{file.token:#x}",
                file.type or "?",
                file.handler,
                _describe_file(file),
            )
    state = listing.state.name.lower()
    console.print(
        f"generation {listing.generation}, {state}, {count(len(listing.sessions), 'session')}"
        + (f" ({listing.hidden} of other users hidden)" if listing.hidden else ""),
        highlight=False,
    )
    console.print(table)
    if listing.participants:
        _print_participants(listing.participants)


main.add_command(inspect)
main.add_command(status)
main.add_command(install_units)


if __name__ == "__main__":
    # ``python -m`` would name the program after the interpreter: shell
    # completion (_LUOCTL_COMPLETE) and the usage lines say luoctl.
    main(prog_name="luoctl")
