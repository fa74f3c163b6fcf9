"""What every ``luoctl`` command shares: its options, its output and how it fails."""

from __future__ import annotations

import errno
import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console

import liveupdate
from liveupdate.client.control import Control, control_path, open_control

__all__ = ["Context", "console", "err_console", "fail"]

console = Console()
err_console = Console(stderr=True)


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
        return liveupdate.open_device(
            self.socket, timeout=self.timeout if timeout is None else timeout
        )

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
