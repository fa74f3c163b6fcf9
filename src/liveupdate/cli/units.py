"""``luoctl install-units``: install luod's systemd units for this installation.

The package ships ``luod.socket`` and ``luod.service`` as data
(``liveupdate/data/systemd``). As shipped, their ``ExecStart=`` and
``ExecReload=`` name ``/usr/local/bin/luod`` and ``/usr/local/bin/luoctl``,
where a system-wide ``pip install`` puts the commands, so a plain ``cp``
works there. This command writes the same units with the commands of the
installation it runs from (a virtual environment, ``/opt/...``), so that
systemd starts the very ``luod`` that ``luoctl`` belongs to.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import click

from liveupdate.cli.context import Context, fail
from liveupdate.client.errors import error_from_errno

__all__ = [
    "SHIPPED_COMMANDS",
    "UNIT_NAMES",
    "Unit",
    "command_for",
    "install_units",
    "render_unit",
    "shipped_unit",
    "units_for_this_installation",
]

#: The units, in the order they are installed (the socket first).
UNIT_NAMES = ("luod.socket", "luod.service")
#: Where systemd looks for units an administrator installs.
DEFAULT_DIR = "/etc/systemd/system"
#: The command each shipped ``Exec*=`` line starts with, and the module it runs.
SHIPPED_COMMANDS = {
    "/usr/local/bin/luod": ("luod", "liveupdate.server.luod"),
    "/usr/local/bin/luoctl": ("luoctl", "liveupdate.cli.luoctl"),
}
#: The unit settings whose command this installation's replaces.
EXEC_KEYS = ("ExecStart", "ExecReload")
#: What a word of an ``Exec*=`` line may hold unquoted and unescaped: systemd
#: reads ``%`` as a specifier, ``$`` as a variable, quotes and backslashes
#: as quoting, and whitespace as a separator.
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def shipped_unit(name: str) -> str:
    """The text of the unit ``name`` as the package ships it."""
    return resources.files("liveupdate").joinpath("data", "systemd", name).read_text("utf-8")


def _runs_this_python(script: Path) -> bool:
    """Whether ``script`` is a console script whose interpreter is this Python."""
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    interpreter = first[2:].strip().split(b" ")[0].decode(errors="replace")
    # The same path, not merely the same binary: a virtual environment's
    # python is a link to the system's, with other packages.
    return os.path.abspath(interpreter) == os.path.abspath(sys.executable)


def command_for(name: str, module: str) -> list[str]:
    """The command that runs ``name`` (``luod``, ``luoctl``) of this installation.

    Its console script when the installation has one that runs this very
    interpreter (``bin/luod`` of a virtual environment); else this
    interpreter running the module, with ``-P`` (the working directory never
    on ``sys.path``), as luod itself starts its next generation.
    """
    script = Path(sysconfig.get_path("scripts")) / name
    if os.access(script, os.X_OK) and _runs_this_python(script):
        return [str(script)]
    return [sys.executable, "-P", "-m", module]


def _exec_words(words: list[str]) -> str:
    """``words`` as an ``Exec*=`` command line; a path systemd would read
    differently is refused rather than guessed at."""
    for word in words:
        if not _PLAIN_WORD.fullmatch(word):
            raise ValueError(
                f"{word!r} holds characters systemd reads specially in a unit: "
                "copy the shipped units and write ExecStart= and ExecReload= by hand"
            )
    return " ".join(words)


def render_unit(text: str, commands: dict[str, list[str]]) -> str:
    """``text`` with the shipped command of each ``Exec*=`` line replaced by
    ``commands`` (shipped path -> this installation's command).

    Raises:
        ValueError: an ``Exec*=`` line starts with no command of ``commands``
            (the shipped units and this code disagree), or a command cannot
            be written plainly (see :func:`_exec_words`).
    """
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in EXEC_KEYS:
            continue
        program, _, rest = value.strip().partition(" ")
        if program not in commands:
            raise ValueError(f"{key.strip()}= runs {program!r}, not a shipped luod command")
        lines[i] = f"{key.strip()}={_exec_words(commands[program])}"
        lines[i] += f" {rest}\n" if rest else "\n"
    return "".join(lines)


@dataclass
class Unit:
    """One unit to install: where, and what it must hold."""

    path: Path
    text: str

    def current(self) -> str | None:
        try:
            return self.path.read_text("utf-8")
        except FileNotFoundError:
            return None

    def write(self) -> None:
        """Replace the file in one step (a reader never sees half a unit)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.text)
                os.fchmod(f.fileno(), 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def units_for_this_installation(directory: Path) -> list[Unit]:
    commands = {shipped: command_for(*what) for shipped, what in SHIPPED_COMMANDS.items()}
    return [
        Unit(directory / name, render_unit(shipped_unit(name), commands)) for name in UNIT_NAMES
    ]


@click.command("install-units")
@click.option(
    "--dir",
    "directory",
    default=DEFAULT_DIR,
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write luod.socket and luod.service into.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the units and where they would go; write nothing."
)
@click.pass_obj
def install_units(obj: Context, directory: Path, dry_run: bool) -> None:
    """Install luod's systemd units for this installation's luod and luoctl."""
    try:
        units = units_for_this_installation(directory.absolute())
    except ValueError as exc:
        fail(error_from_errno(errno.EINVAL, "install-units", str(exc)))
    if not dry_run and not directory.is_dir():
        fail(
            error_from_errno(
                errno.ENOTDIR, str(directory), "not a directory", "create it, or give --dir"
            )
        )
    done = []
    for unit in units:
        before = None if dry_run else unit.current()
        if dry_run:
            action = "would write"
        elif before == unit.text:
            action = "unchanged"
        else:
            try:
                unit.write()
            except OSError as exc:
                hint = "run it as root" if exc.errno in (errno.EACCES, errno.EPERM) else ""
                fail(error_from_errno(exc.errno or errno.EIO, str(unit.path), None, hint))
            action = "wrote" if before is None else "replaced"
        done.append({"path": str(unit.path), "action": action, "content": unit.text})
    if obj.json:
        obj.emit({"dry_run": dry_run, "units": done}, "")
        return
    for entry in done:
        if dry_run:
            click.echo(f"# {entry['path']}\n{entry['content']}")
        else:
            click.echo(f"{entry['action']} {entry['path']}")
    if not dry_run:
        click.echo("next: systemctl daemon-reload && systemctl enable --now luod.socket")
