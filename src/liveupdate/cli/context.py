"""What every ``luoctl`` command shares: its options, its output and how it fails."""

from __future__ import annotations

import errno
import json
import sys
import time
from contextlib import ExitStack
from typing import Any, NoReturn

import click
from click.shell_completion import CompletionItem
from rich.console import Console
from rich.markup import escape

import liveupdate
from liveupdate import paths
from liveupdate.cli.progress import Steps
from liveupdate.client.control import Control, control_path, open_control
from liveupdate.client.errors import error_from_errno
from liveupdate.client.holders import device_holders
from liveupdate.client.transport import transport_for_path

__all__ = ["Context", "complete_sessions", "console", "count", "err_console", "fail"]

console = Console()
err_console = Console(stderr=True)

#: How long an open waits on a busy device before saying who holds it: a
#: holder closing at once (a luoctl that just ran) is not worth a message.
_QUIET_WAIT = 0.25
#: The least time one attempt to open waits for luod's answer (see Context.open).
_ATTEMPT = 2.0


class Context:
    """The global options, given to every command (``click.pass_obj``)."""

    def __init__(
        self, socket: str | None, as_json: bool, timeout: float, control: str | None = None
    ) -> None:
        self.socket = socket
        self.json = as_json
        self.timeout = timeout
        #: ``--control-socket``: used without falling back to the device.
        self.control = control

    def open(self, timeout: float | None = None) -> liveupdate.Device:
        """The device; when another process holds it, say who and that luoctl waits.

        ``timeout`` (default ``--timeout``) bounds the wait; running out is
        ``EBUSY`` naming the holder. Each attempt waits at least
        :data:`_ATTEMPT` for luod's answer: a refusal can take luod a moment
        (it checks whether the holder is still alive), and must not be
        mistaken for a luod that does not answer (``ETIMEDOUT``).
        """
        wait = self.timeout if timeout is None else timeout
        path = paths.resolve_device(self.socket)
        transport = transport_for_path(path)
        deadline = time.monotonic() + wait
        delay = 0.001
        with ExitStack() as stack:
            announced = False
            while True:
                remaining = deadline - time.monotonic()
                try:
                    fd = transport.open(path, max(remaining, _ATTEMPT) if wait else None)
                    return liveupdate.Device(fd, transport, path)
                except liveupdate.LiveUpdateError as exc:
                    # A timeout after a refusal: still busy, as far as anyone can tell.
                    late = exc.errno == errno.ETIMEDOUT and announced
                    if exc.errno != errno.EBUSY and not late:
                        raise
                if time.monotonic() >= deadline:
                    break
                if not announced and wait - (deadline - time.monotonic()) >= _QUIET_WAIT:
                    announced = True
                    self._announce_wait(path, wait, stack)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.05)
        raise _busy(path, wait)

    @staticmethod
    def _announce_wait(path: str, wait: float, stack: ExitStack) -> None:
        """Say who holds the device and that luoctl waits: a spinner on a
        terminal (erased once the device is free), else one line."""
        note = f"{path} is {device_holders(path).describe()}; waiting for it"
        note += f" (up to {wait:g} s, --timeout)"
        steps = stack.enter_context(Steps(err_console))
        if steps.shown:
            steps.step(escape(note))
        else:
            click.echo(f"luoctl: {note}", err=True)

    def open_state(self, timeout: float | None = None) -> liveupdate.Device | Control:
        """Where to read the state and send events: luod's control socket when
        there is one (never busy, whoever holds the device), else the device."""
        wait = self.timeout if timeout is None else timeout
        if self.control is not None:
            return open_control(self.control, wait or None)
        path = control_path(self.socket)
        if path is not None:
            try:
                return open_control(path, wait or None)
            except liveupdate.LiveUpdateError as exc:
                # Not ours to use, or left by a stopped luod: the device decides.
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES):
                    raise
        return self.open(timeout)

    def emit(self, data: dict[str, Any], text: str) -> None:
        if self.json:
            click.echo(json.dumps(data, sort_keys=True))
        else:
            console.print(text, highlight=False)


#: Seconds a completion may wait for luod: a <TAB> must never hang the shell.
_COMPLETION_TIMEOUT = 0.2


def complete_sessions(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Shell completion of a session NAME: the names luod lists to this user.

    Asked over the control socket only, never the device (a <TAB> must not
    take the device from the agent that uses it). Quiet and quick: when luod
    cannot be asked (not running, no control socket, not allowed), there is
    simply nothing to offer.
    """
    options = ctx.find_root().params
    try:
        path = options.get("control") or control_path(options.get("socket"))
        if path is None:
            return []
        with open_control(path, _COMPLETION_TIMEOUT) as conn:
            listing = conn.list_sessions(files=False)
    except (OSError, ValueError):
        return []
    names = sorted({s.name for s in listing.sessions if s.name.startswith(incomplete)})
    return [CompletionItem(name) for name in names]


def _busy(path: str, waited: float) -> liveupdate.LiveUpdateError:
    """EBUSY at open of the device at ``path``, naming who holds it."""
    holders = device_holders(path)
    after = f" after waiting {waited:.3g} s" if waited else ""
    return error_from_errno(
        errno.EBUSY,
        f"open {path}",
        f"{holders.describe()}{after} (one opener at a time)",
        "retry once it has closed it, or wait longer with --timeout",
    )


def count(n: int, noun: str) -> str:
    """``1 session``, ``2 sessions``: how many of ``noun``, in words a reader expects."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def fail(exc: OSError, status: int = 1) -> NoReturn:
    """One line on stderr: what failed and why, the errno, what to do; then exit."""
    name = errno.errorcode.get(exc.errno or 0, "?")
    message = str(exc.strerror or exc)
    hint = getattr(exc, "hint", "")
    if hint and message.endswith(f"; {hint}"):
        message = message[: -len(hint) - 2]
    # click.echo, not rich: a message must never be wrapped, nor read as markup.
    click.echo(f"luoctl: {message} ({name})" + (f"; {hint}" if hint else ""), err=True)
    sys.exit(status)
