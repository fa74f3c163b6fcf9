"""``luoctl``: the operator's tool for luod.

Every command talks to the device through the client library (so it works
over luod's socket, and the upstream parts against a kernel too), except
``inspect``, which only decodes a handover image file.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

import liveupdate
from liveupdate import uapi
from liveupdate.client.device import StateInfo
from liveupdate.client.errors import error_from_errno, file_kind

__all__ = ["main"]

console = Console()
err_console = Console(stderr=True)


class Context:
    def __init__(self, socket: str | None, as_json: bool, timeout: float) -> None:
        self.socket = socket
        self.json = as_json
        self.timeout = timeout

    def open(self, timeout: float | None = None) -> liveupdate.Device:
        return liveupdate.open_device(
            self.socket, timeout=self.timeout if timeout is None else timeout
        )

    def emit(self, data: dict[str, Any], text: str) -> None:
        if self.json:
            click.echo(json.dumps(data, sort_keys=True))
        else:
            console.print(text, highlight=False)


def _fail(exc: OSError, status: int = 1) -> NoReturn:
    """One line on stderr: what failed and why, the errno, what to do; then exit."""
    name = errno.errorcode.get(exc.errno or 0, "?")
    message = str(exc.strerror or exc)
    hint = getattr(exc, "hint", "")
    if hint and message.endswith(f"; {hint}"):
        message = message[: -len(hint) - 2]
    # click.echo, not rich: a message must never be wrapped, nor read as markup.
    click.echo(f"luoctl: {message} ({name})" + (f"; {hint}" if hint else ""), err=True)
    sys.exit(status)


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


def _state_dict(info: StateInfo) -> dict[str, Any]:
    return {
        "state": info.state.name.lower(),
        "generation": info.generation,
        "outgoing_sessions": info.outgoing_sessions,
        "incoming_sessions": info.incoming_sessions,
        "preserved_files": info.preserved_files,
        "max_sessions": info.max_sessions,
        "max_files": info.max_files,
        "lost_sessions": info.lost_sessions,
        "lost_incomplete": info.lost_incomplete,
        "last_error": info.last_error,
        "journal_error": errno.errorcode.get(info.journal_error, str(info.journal_error))
        if info.journal_error
        else "",
    }


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket",
    default=None,
    metavar="PATH",
    help="Device to talk to [default: $LIVEUPDATE_DEVICE, /dev/liveupdate, luod's default socket].",
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
def main(ctx: click.Context, socket: str | None, as_json: bool, timeout: float) -> None:
    """Operate the Live Update Orchestrator daemon (luod)."""
    ctx.obj = Context(socket, as_json, timeout)


@main.command()
@click.pass_obj
def state(obj: Context) -> None:
    """Show the state machine, the generation, counts and limits."""
    try:
        with obj.open() as dev:
            info = dev.get_state()
    except OSError as exc:
        _fail(exc)
    data = _state_dict(info)
    if obj.json:
        obj.emit(data, "")
        return
    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if key in ("last_error", "journal_error", "lost_incomplete") and not value:
            continue
        if key == "journal_error":
            value = f"{value}: cannot be written; if luod dies now, what it holds is lost"
        elif key == "lost_incomplete":
            value = "yes: the previous luod's journal was out of date, more may have been lost"
        table.add_row(key.replace("_", " "), str(value))
    console.print(table)


def _with_reason(dev: liveupdate.Device, exc: OSError) -> OSError:
    """``exc`` with luod's explanation (GET_STATE's last_error) when it has one."""
    try:
        reason = dev.get_state().last_error
    except OSError:
        return exc  # luod is gone too: the original error says more
    return type(exc)(exc.errno, reason) if reason else exc


def _event(obj: Context, event: uapi.LuodEvent, done: str) -> None:
    try:
        with obj.open() as dev:
            try:
                generation = dev.set_event(event)
            except OSError as exc:
                raise _with_reason(dev, exc) from None
    except OSError as exc:
        _fail(exc)
    obj.emit({"event": event.name.lower(), "generation": generation}, done)


@main.command()
@click.pass_obj
def prepare(obj: Context) -> None:
    """Run the pre-flight of a live update (NORMAL -> PREPARED)."""
    _event(obj, uapi.LuodEvent.PREPARE, "prepared: the installed luod can read this generation")


@main.command()
@click.pass_obj
def cancel(obj: Context) -> None:
    """Leave PREPARED."""
    _event(obj, uapi.LuodEvent.CANCEL, "cancelled")


@main.command()
@click.pass_obj
def finish(obj: Context) -> None:
    """Finish every incoming session (UPDATED -> NORMAL)."""
    _event(obj, uapi.LuodEvent.FINISH, "finished every incoming session")


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
@click.pass_obj
def reboot(obj: Context, no_exec: bool, wait: float) -> None:
    """Live-update luod; returns once the next generation serves."""
    flags = uapi.LUOD_REBOOT_NO_EXEC if no_exec else 0
    start = time.monotonic()
    try:
        with obj.open() as dev:
            old = dev.get_state().generation
            try:
                dev.set_event(uapi.LuodEvent.REBOOT, flags)
            except OSError as exc:
                raise _with_reason(dev, exc) from None
        new = _wait_generation(obj, old + 1, start + wait)
    except OSError as exc:
        _fail(exc)
    elapsed = time.monotonic() - start
    obj.emit(
        {"old_generation": old, "new_generation": new.generation, "seconds": elapsed,
         "state": new.state.name.lower(), "incoming_sessions": new.incoming_sessions},
        f"rebooted: generation {old} -> {new.generation} in {elapsed:.3f} s "
        f"({new.incoming_sessions} incoming sessions)",
    )  # fmt: skip


def _wait_generation(obj: Context, generation: int, deadline: float) -> StateInfo:
    """Open the device until the generation ``generation`` answers."""
    while True:
        remaining = deadline - time.monotonic()
        try:
            # A timeout of 0 would mean "no retry, unbounded open": keep a bound.
            with obj.open(timeout=max(0.001, remaining)) as dev:
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
@click.option("--session", "name", required=True, help="The session holding the service's state.")
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
    restart: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND with its state kept in session NAME across updates and crashes.

    COMMAND gets the session fd in LIVEUPDATE_SESSION_FD (with
    LIVEUPDATE_SESSION_NAME and LIVEUPDATE_SESSION_STATE=incoming|outgoing;
    LIVEUPDATE_NEXT_SESSION_FD when incoming): see liveupdate.inherited_session().
    SIGHUP or `luoctl update NAME` updates it: stop, hand over, start again.
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
        restart=restart,
        open_timeout=obj.timeout,
    )
    try:
        sys.exit(supervisor.run())
    except CommandError as exc:
        _fail(exc, exc.status)
    except OSError as exc:
        _fail(exc)


def _outgoing_entry(dev: liveupdate.Device, name: str) -> dict[str, Any]:
    start = f"start its service with 'luoctl run --session {name} -- COMMAND'"
    try:
        entries: list[dict[str, Any]] = dev.list_sessions(name, files=False)["sessions"]
    except liveupdate.LiveUpdateError as exc:
        raise _session_error(exc, name, start) from None
    for entry in entries:
        if entry["direction"] == "outgoing":
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


@main.command()
@click.argument("name")
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

    Sends SIGHUP to its supervisor and returns once the supervisor has stopped
    the service, handed the session over and re-acquired it (the new service
    is started right after).
    """
    try:
        with obj.open() as dev:
            entry = _outgoing_entry(dev, name)
        pid = int(entry["pid"])
        if not _is_supervisor(pid, name):
            raise error_from_errno(
                errno.ESRCH,
                f"session {name!r}",
                "not held by a `luoctl run` supervisor",
                "`luoctl update` only updates services that `luoctl run` supervises",
            )
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + wait
        while True:
            time.sleep(0.02)
            try:
                with obj.open() as dev:
                    now = _outgoing_entry(dev, name)
                if now["created"] != entry["created"]:
                    break
            except liveupdate.NotFoundError:
                pass
            if time.monotonic() > deadline:
                raise liveupdate.LiveUpdateError(errno.ETIMEDOUT, f"{name!r} was not updated")
    except OSError as exc:
        _fail(exc)
    obj.emit({"session": name, "supervisor": pid}, f"updated {name!r} (supervisor pid {pid})")


def _describe_file(file: dict[str, Any]) -> str:
    skip = {"token", "handler", "type"}
    return " ".join(f"{k}={v}" for k, v in file.items() if k not in skip)


@main.command()
@click.argument("name", required=False)
@click.pass_obj
def sessions(obj: Context, name: str | None) -> None:
    """List sessions (yours, or every one as root) and their files."""
    try:
        with obj.open() as dev:
            try:
                doc = dev.list_sessions(name)
            except liveupdate.LiveUpdateError as exc:
                if name is None:
                    raise
                raise _session_error(exc, name, "see 'luoctl sessions'") from None
    except OSError as exc:
        _fail(exc)
    if obj.json:
        click.echo(json.dumps(doc, sort_keys=True, indent=2))
        return
    now = time.time()
    table = Table("session", "direction", "owner", "age", "token", "type", "handler", "details")
    for entry in doc["sessions"]:
        age = f"{now - entry['created']:.0f}s"
        flags = " keep-on-close" if entry.get("keep_on_close") else ""
        head = [entry["name"], entry["direction"] + flags, f"{entry['uid']}:{entry['gid']}", age]
        files = entry.get("files", [])
        if not files:
            table.add_row(*head, "-", "-", "-", "")
        for i, file in enumerate(files):
            cells = head if i == 0 else ["", "", "", ""]
            table.add_row(
                *cells,
                f"{file['token']:#x}",
                str(file.get("type", "?")),
                file["handler"],
                _describe_file(file),
            )
    console.print(
        f"generation {doc['generation']}, {doc['state']}, {len(doc['sessions'])} sessions"
        + (f" ({doc['hidden']} of other users hidden)" if doc.get("hidden") else ""),
        highlight=False,
    )
    console.print(table)


def _decoded(compatible: str, data: bytes) -> dict[str, Any] | None:
    from liveupdate.core.handlers import describe_data

    try:
        return describe_data(compatible, data)
    except ValueError:
        return None


def _data_text(compatible: str, data: bytes) -> str:
    decoded = _decoded(compatible, data)
    if decoded is not None:
        return " ".join(f"{k}={v}" for k, v in decoded.items())
    return data.hex() if len(data) <= 32 else f"{len(data)} bytes"


#: The largest image ``inspect`` reads unless told otherwise. A handover
#: image of the default limits (4,096 sessions of small records) is a few
#: MiB; anything far larger is not an image, or is better refused than read.
INSPECT_MAX_SIZE = 64 << 20


def _read_image(image: Path, max_size: int) -> bytes:
    """The bytes of the regular file ``image``, at most ``max_size`` of them.

    Anything else is refused before it is read: a device would be read
    forever (``/dev/zero``), a FIFO would block. Symbolic links are followed:
    luoctl runs with its caller's rights, and an operator may well name an
    image through one. The type is checked on the path, so that no device is
    even opened, then again on the opened fd, so that a file swapped in
    between is caught; ``O_NONBLOCK`` keeps a FIFO swapped in from blocking
    the open.
    """
    what = str(image)
    try:
        mode = os.stat(image).st_mode
        if not stat.S_ISREG(mode):
            raise error_from_errno(
                errno.EINVAL, what, f"not a regular file ({file_kind(mode)})", _INSPECT_HINT
            )
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except liveupdate.LiveUpdateError:
        raise
    except OSError as exc:
        raise error_from_errno(exc.errno or errno.EIO, what) from None
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error_from_errno(
                errno.EINVAL, what, f"not a regular file ({file_kind(st.st_mode)})", _INSPECT_HINT
            )
        # Read one byte more than allowed: a file that grew since fstat is caught too.
        data = file.read(max_size + 1) if st.st_size <= max_size else b""
        if st.st_size > max_size or len(data) > max_size:
            raise error_from_errno(
                errno.EFBIG,
                what,
                f"{max(st.st_size, len(data))} bytes is larger than --max-size {max_size}",
                "a handover image is far smaller; raise --max-size to read it anyway",
            )
    return data


_INSPECT_HINT = "give a handover image file, e.g. STATE_DIR/last-handover.dtb"


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=INSPECT_MAX_SIZE,
    show_default=True,
    metavar="BYTES",
    help="Refuse an IMAGE larger than this.",
)
@click.pass_obj
def inspect(obj: Context, image: Path, max_size: int) -> None:
    """Decode a handover IMAGE file (e.g. STATE_DIR/last-handover.dtb)."""
    # The one command that reads a core format directly: an image is a file,
    # not a device, and decoding it must work with no luod running.
    from liveupdate.handover_abi import HandoverError
    from liveupdate.handover_codec import decode_image, image_to_dict

    try:
        raw = _read_image(image, max_size)
    except OSError as exc:
        _fail(exc)
    try:
        decoded = decode_image(raw)
    except HandoverError as exc:
        click.echo(f"luoctl: {image}: {exc}", err=True)
        sys.exit(1)
    data = image_to_dict(decoded)
    # Each handler decodes its own freeze state (what it recorded at the reboot).
    for session_dict, session in zip(data["sessions"], decoded.sessions, strict=True):
        for file_dict, file in zip(session_dict["files"], session.files, strict=True):
            file_dict["decoded"] = _decoded(file.compatible, file.data)
    if obj.json:
        click.echo(json.dumps(data, sort_keys=True, indent=2))
        return
    console.print(
        f"handover image v{decoded.version}, liveupdate-number {decoded.liveupdate_number}, "
        f"{len(decoded.sessions)} sessions"
        + (f", written by {decoded.writer}" if decoded.writer else ""),
        highlight=False,
    )
    table = Table("session", "owner uid:gid (pid)", "created", "token", "handler", "fd", "data")
    for session in decoded.sessions:
        name = session.name.decode(errors="backslashreplace")
        owner = f"{session.uid}:{session.gid} ({session.pid})"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(session.created))
        if not session.files:
            table.add_row(name, owner, created, "-", "-", "-", "-")
        for i, file in enumerate(session.files):
            table.add_row(
                name if i == 0 else "",
                owner if i == 0 else "",
                created if i == 0 else "",
                f"{file.token:#x}",
                file.compatible,
                str(file.fd),
                _data_text(file.compatible, file.data),
            )
    console.print(table)


if __name__ == "__main__":
    main()
