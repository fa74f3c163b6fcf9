"""What every ``luoctl`` command shares: its options, its output and how it fails."""

from __future__ import annotations

import errno
import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console

import liveupdate

__all__ = ["Context", "console", "err_console", "fail"]

console = Console()
err_console = Console(stderr=True)


class Context:
    """The global options, given to every command (``click.pass_obj``)."""

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
