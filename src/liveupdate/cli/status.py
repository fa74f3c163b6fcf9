"""``luoctl status`` and ``luoctl state --watch``: the operator's first look.

Both read ``LUOD_IOCTL_GET_STATE`` (and ``status`` the session listing)
over luod's control socket, so they work whoever holds the device. The
``status`` screen is built as a JSON document first (:func:`status_document`,
the ``--json`` output) and then drawn from it, so the text and the JSON can
never say different things.
"""

from __future__ import annotations

import errno
import json
import signal
import time
from collections import Counter
from typing import Any

import click
from rich.table import Table
from rich.text import Text

import liveupdate
from liveupdate import paths
from liveupdate.cli.context import Context, console, count, err_console, fail
from liveupdate.client.control import Control
from liveupdate.client.device import StateInfo
from liveupdate.client.listing import SessionListing

__all__ = ["NOT_RUNNING", "state_dict", "status", "status_document", "watch_state"]

#: ``luoctl status``'s exit status when luod is not running (as ``systemctl status``).
NOT_RUNNING = 3

#: errnos meaning "nothing serves there": luod is not running (or not yet again).
_DOWN = (errno.ENOENT, errno.ECONNREFUSED)

#: Fields a luod older than them leaves at 0 (a shorter GET_STATE), and
#: fields whose 0 means "none yet": ``luoctl state`` leaves them out then.
_ZERO_UNSAID = frozenset(
    {
        "pid",
        "started",
        "cold_started",
        "recovered_sessions",
        "recovered_files",
        "last_reboot",
        "last_reboot_blackout",
        "fd_limit",
        "fds_open",
        "fd_reserve",
        "fds_per_file",
    }
)
_ERRNO_FIELDS = ("journal_error", "copies_error", "last_reboot_error")

#: Fields that change without the state changing: ``state --watch`` does
#: not print a line for them alone (every connection moves ``fds_open``).
_VOLATILE = frozenset({"fds_open"})


def errno_name(err: int) -> str:
    """``ENOSPC`` for 28, ``""`` for 0."""
    return errno.errorcode.get(err, str(err)) if err else ""


def state_dict(info: StateInfo) -> dict[str, Any]:
    """``luoctl --json state``: every field of ``info`` (errnos by name), in
    the order ``luoctl state`` shows them."""
    return {
        "state": info.state.name.lower(),
        "generation": info.generation,
        "pid": info.pid,
        "started": info.started,
        "cold_started": info.cold_started,
        "outgoing_sessions": info.outgoing_sessions,
        "incoming_sessions": info.incoming_sessions,
        "preserved_files": info.preserved_files,
        "max_sessions": info.max_sessions,
        "max_files": info.max_files,
        "fd_limit": info.fd_limit,
        "fds_open": info.fds_open,
        "fd_reserve": info.fd_reserve,
        "fds_per_file": info.fds_per_file,
        "lost_sessions": info.lost_sessions,
        "lost_incomplete": info.lost_incomplete,
        "recovered_sessions": info.recovered_sessions,
        "recovered_files": info.recovered_files,
        "copies": info.copies,
        "copies_error": errno_name(info.copies_error),
        "journal_error": errno_name(info.journal_error),
        "last_reboot": info.last_reboot,
        "last_reboot_blackout": info.last_reboot_blackout,
        "last_reboot_error": errno_name(info.last_reboot_error),
        "last_error": info.last_error,
    }


# -- luoctl state: the rows of the text table ----------------------------------------------


def local_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(seconds: float) -> str:
    """``35 ms``, ``12s``, ``3min 4s``, ``2h 5min``, ``3d 2h``: as precise as a reader needs."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}min {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}min"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def when(t: float | None, now: float) -> str:
    """``2026-12-01 12:40:11 (22min ago)``; ``-`` when unknown."""
    if not t:
        return "-"
    return f"{local_time(t)} ({duration(max(0.0, now - t))} ago)"


def state_rows(data: dict[str, Any], now: float) -> list[tuple[str, str]]:
    """``luoctl state``'s table: every field, the empty or unknown ones left out."""
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        if key in ("last_error", "lost_incomplete", *_ERRNO_FIELDS) and not value:
            continue
        if key in _ZERO_UNSAID and not value:
            continue  # not reported by this luod, or none yet
        if key == "journal_error":
            value = f"{value}: cannot be written; if luod dies now, what it holds is lost"
        elif key == "copies_error":
            value = f"{value}: the last crash copy failed; a crash now would lose what it missed"
        elif key == "lost_incomplete":
            value = "yes: the previous luod's journal was out of date, more may have been lost"
        elif key in ("started", "cold_started", "last_reboot"):
            value = when(value, now)
        elif key == "last_reboot_blackout":
            value = duration(value)
        rows.append((key.replace("_", " "), str(value)))
    return rows


# -- luoctl status ---------------------------------------------------------------------------


def _problems(doc: dict[str, Any]) -> tuple[str, list[str]]:
    """The health (``ok``, ``degraded``, ``failing``) and what is wrong, in words."""
    failing: list[str] = []
    degraded: list[str] = []
    if doc["journal"]["error"]:
        failing.append(
            f"journal: cannot be written ({doc['journal']['error']}): if luod dies now, "
            "the report of what it held is incomplete"
        )
    if doc["copies"]["error"]:
        failing.append(
            f"crash copies: the last copy failed ({doc['copies']['error']}): a crash of luod "
            "now would lose what was not copied"
        )
    room, fds = doc["fds"]["room"], doc["fds"]
    if room is not None and fds["per_file"]:
        capacity = max(1, (fds["limit"] - fds["reserve"]) // fds["per_file"])
        if room == 0:
            failing.append("fd budget: exhausted: preserving one more file fails")
        elif room < capacity // 20:
            degraded.append(f"fd budget: room for {count(room, 'more file')} only")
    if doc["sessions"]["lost"]:
        lost = count(doc["sessions"]["lost"], "session")
        degraded.append(
            f"{lost} lost when a previous luod died (luoctl inspect STATE_DIR/lost-*.dtb)"
        )
    if doc["last_reboot"]["error"]:
        degraded.append(f"the last live update failed ({doc['last_reboot']['error']})")
    if doc["last_error"]:
        degraded.append(f"last error: {doc['last_error']}")
    health = "failing" if failing else "degraded" if degraded else "ok"
    return health, failing + degraded


def status_document(
    info: StateInfo,
    listing: SessionListing,
    device: str,
    control: str | None,
    now: float,
) -> dict[str, Any]:
    """``luoctl --json status`` (schema: ``liveupdate.cli.schemas.STATUS``)."""
    raw = state_dict(info)
    by_handler = Counter(f.handler for s in listing.sessions for f in s.files or ())
    room = None
    if raw["fd_limit"] and raw["fds_per_file"]:
        free = raw["fd_limit"] - raw["fd_reserve"] - raw["fds_open"]
        room = max(0, free // raw["fds_per_file"])
    services = []
    for entry in listing.sessions:
        if entry.service is not None:
            services.append(
                {"session": entry.name, "supervisor": entry.pid, **entry.service.to_dict()}
            )
    started = raw["started"] or None
    cold = raw["cold_started"] or None
    doc: dict[str, Any] = {
        "device": device,
        "control_socket": control,
        "pid": raw["pid"] or None,
        "state": raw["state"],
        "generation": raw["generation"],
        "started": started,
        "cold_started": cold,
        "uptime": max(0.0, now - cold) if cold else None,
        "sessions": {
            "outgoing": raw["outgoing_sessions"],
            "incoming": raw["incoming_sessions"],
            "hidden": listing.hidden,
            "recovered": raw["recovered_sessions"],
            "lost": raw["lost_sessions"],
            "lost_incomplete": raw["lost_incomplete"],
        },
        "files": {
            "preserved": raw["preserved_files"],
            "recovered": raw["recovered_files"],
            "by_handler": dict(sorted(by_handler.items())),
        },
        "limits": {"max_sessions": raw["max_sessions"], "max_files": raw["max_files"]},
        "fds": {
            "limit": raw["fd_limit"],
            "open": raw["fds_open"],
            "reserve": raw["fd_reserve"],
            "per_file": raw["fds_per_file"],
            "room": room,
        },
        "last_reboot": {
            "ended": raw["last_reboot"] or None,
            "blackout": raw["last_reboot_blackout"] or None,
            "error": raw["last_reboot_error"],
        },
        "last_error": raw["last_error"],
        "journal": {"ok": not raw["journal_error"], "error": raw["journal_error"]},
        "copies": {
            "mode": raw["copies"],
            "ok": raw["copies"] != "off" and not raw["copies_error"],
            "error": raw["copies_error"],
        },
        "services": sorted(services, key=lambda s: s["session"]),
    }
    doc["health"], doc["problems"] = _problems(doc)
    return doc


_HEALTH_STYLE = {"ok": "green", "degraded": "yellow", "failing": "red"}


def _exit_text(restarts: int, last_exit: int) -> str:
    if last_exit < 0:
        try:
            return signal.Signals(-last_exit).name
        except ValueError:
            return f"signal {-last_exit}"
    if last_exit == 0 and restarts == 0:
        return "-"  # never exited
    return f"exit {last_exit}"


def _files_text(files: dict[str, Any]) -> str:
    text = f"{files['preserved']} preserved"
    if files["by_handler"]:
        text += ": " + ", ".join(f"{n} {h}" for h, n in files["by_handler"].items())
    return text


def _fds_text(fds: dict[str, Any]) -> str:
    if not fds["limit"]:
        return "-"
    text = (
        f"{fds['open']} of {fds['limit']} open, {fds['reserve']} kept free for a reboot, "
        f"{fds['per_file']} per preserved file"
    )
    if fds["room"] is not None:
        text += f": room for {count(fds['room'], 'more file')}"
    return text


def _last_reboot_text(reboot: dict[str, Any], now: float) -> Text:
    if not reboot["ended"] and not reboot["error"]:
        return Text("none since the cold start")
    text = Text(when(reboot["ended"], now) if reboot["ended"] else "")
    if reboot["blackout"]:
        text.append(f"{', ' if text else ''}blackout {duration(reboot['blackout'])}")
    if reboot["error"]:
        text.append(f"{', ' if text else ''}last attempt failed: {reboot['error']}", "red")
    else:
        text.append(", ok", "green")
    return text


class _Lines:
    """``KEY VALUE`` lines, keys aligned right: one line each however long
    (the terminal wraps it), no padding after the value."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, Text | str]] = []

    def add_row(self, key: str, value: Text | str) -> None:
        self.rows.append((key, value))

    def print(self) -> None:
        width = max(len(key) for key, _ in self.rows)
        for key, value in self.rows:
            line = Text(f"{key:>{width}} ", style="bold")
            line.append_text(value if isinstance(value, Text) else Text(value))
            console.print(line, soft_wrap=True, highlight=False)


def print_status(doc: dict[str, Any], now: float) -> None:
    """The ``luoctl status`` screen, drawn from :func:`status_document`'s ``doc``."""
    style = _HEALTH_STYLE[doc["health"]]
    head = Text("● ", style=style)
    head.append("luod", style="bold")
    head.append(f" - Live Update Orchestrator daemon: {doc['health']}")
    console.print(head)
    grid = _Lines()
    state = Text(doc["state"], style="green" if doc["state"] == "normal" else "yellow")
    grid.add_row("state", state)
    grid.add_row("device", doc["device"])
    grid.add_row("control", doc["control_socket"] or "- (none: read through the device)")
    grid.add_row("pid", str(doc["pid"] or "?"))
    if doc["uptime"] is not None:
        grid.add_row(
            "uptime", f"{duration(doc['uptime'])} (cold start {local_time(doc['cold_started'])})"
        )
    grid.add_row("generation", f"{doc['generation']}, serving since {when(doc['started'], now)}")
    sessions = doc["sessions"]
    line = f"{sessions['outgoing']} outgoing, {sessions['incoming']} incoming"
    if sessions["hidden"]:
        line += f" ({sessions['hidden']} of other users not listed)"
    grid.add_row("sessions", line)
    grid.add_row("files", _files_text(doc["files"]))
    limits = doc["limits"]
    grid.add_row(
        "limits",
        f"{limits['max_sessions']} sessions, {limits['max_files']} files per session",
    )
    grid.add_row("fd budget", _fds_text(doc["fds"]))
    grid.add_row("last reboot", _last_reboot_text(doc["last_reboot"], now))
    grid.add_row("last error", Text(doc["last_error"] or "-", "red" if doc["last_error"] else ""))
    journal = doc["journal"]
    grid.add_row(
        "journal",
        Text("ok", "green") if journal["ok"] else Text(f"failing: {journal['error']}", "red"),
    )
    copies = doc["copies"]
    if copies["error"]:
        copies_text = Text(f"{copies['mode']}, failing: {copies['error']}", "red")
    elif copies["mode"] == "off":
        copies_text = Text("off: a crash of luod loses every preserved fd", "yellow")
    else:
        copies_text = Text(f"{copies['mode']}, ok", "green")
    grid.add_row("crash copies", copies_text)
    recovered = (
        f"{count(sessions['recovered'], 'session')}, {count(doc['files']['recovered'], 'file')}"
        f" given back after a crash; {count(sessions['lost'], 'session')} lost"
    )
    if sessions["lost_incomplete"]:
        recovered += " (at least: the previous journal was out of date)"
    grid.add_row("recovered", recovered)
    grid.print()
    if doc["services"]:
        table = Table("service", "supervisor", "pid", "restarts", "last exit", box=None)
        for service in doc["services"]:
            table.add_row(
                service["session"],
                str(service["supervisor"]),
                str(service["pid"]),
                str(service["restarts"]),
                _exit_text(service["restarts"], service["last_exit"]),
            )
        console.print()
        console.print(table)
    for problem in doc["problems"]:
        console.print(Text(f"! {problem}", style=style), highlight=False)


@click.command()
@click.pass_obj
def status(obj: Context) -> None:
    """Show luod at a glance: daemon, generation, sessions, budget, health."""
    try:
        with obj.open_state() as conn:
            info = conn.get_state()
            listing = conn.list_sessions()
            control = conn.path if isinstance(conn, Control) else None
    except OSError as exc:
        fail(exc, NOT_RUNNING if exc.errno in _DOWN else 1)
    now = time.time()
    doc = status_document(info, listing, paths.resolve_device(obj.socket), control, now)
    if obj.json:
        click.echo(json.dumps(doc, sort_keys=True, indent=2))
        return
    print_status(doc, now)


# -- luoctl state --watch -------------------------------------------------------------------


def _watch_line(data: dict[str, Any], changed: list[str], now: float) -> str:
    text = (
        f"{time.strftime('%H:%M:%S', time.localtime(now))} generation {data['generation']} "
        f"{data['state']}: {data['outgoing_sessions']} outgoing, "
        f"{data['incoming_sessions']} incoming, {count(data['preserved_files'], 'file')}"
    )
    if data["last_error"]:
        text += f"; last error: {data['last_error']}"
    if changed:
        text += f" (changed: {', '.join(k.replace('_', ' ') for k in changed)})"
    return text


def watch_state(obj: Context, interval: float) -> None:
    """Print the state, then a line each time it changes, until interrupted (exit 0).

    Polls GET_STATE every ``interval`` seconds on one control connection
    (reconnecting after a live update or a restart of luod); without a
    control socket it opens the device for each poll, so that watching never
    keeps the device from its users (a busy device skips that poll).
    """
    conn: liveupdate.Device | Control | None = None
    last: dict[str, Any] | None = None
    waiting = False
    try:
        while True:
            try:
                if conn is None:
                    conn = obj.open_state(timeout=0.5 if last is not None else None)
                info = conn.get_state()
            except OSError as exc:
                if conn is not None:
                    conn.close()
                    conn = None
                if last is None and exc.errno != errno.EBUSY:
                    fail(exc, NOT_RUNNING if exc.errno in _DOWN else 1)
                # A live update closes this connection and the next generation
                # may take a moment to answer: only a luod gone away is said.
                if not waiting and exc.errno in _DOWN:
                    waiting = True
                    why = str(exc.strerror or exc)
                    hint = getattr(exc, "hint", "")
                    why = why.removesuffix(f"; {hint}") if hint else why
                    err_console.print(
                        f"luoctl: {why}; waiting for luod to serve again",
                        highlight=False,
                        markup=False,
                        soft_wrap=True,
                    )
                time.sleep(interval)
                continue
            waiting = False
            if not isinstance(conn, Control):
                conn.close()  # never keep the device from its users
                conn = None
            now = time.time()
            data = state_dict(info)
            steady = {k: v for k, v in data.items() if k not in _VOLATILE}
            if last is None or steady != last:
                changed = [] if last is None else [k for k in steady if steady[k] != last.get(k)]
                if obj.json:
                    click.echo(json.dumps({"time": now, **data}, sort_keys=True))
                else:
                    console.print(_watch_line(data, changed, now), highlight=False, soft_wrap=True)
                last = steady
            time.sleep(interval)
    except KeyboardInterrupt:
        return  # Ctrl-C is how a watch ends: a success
    finally:
        if conn is not None:
            conn.close()
