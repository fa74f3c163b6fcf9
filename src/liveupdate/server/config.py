"""luod's configuration: every option declared once.

Each field of :class:`Config` is one ``luod`` option, declared with
:func:`option` next to its type and default. That one declaration gives:

* the ``click`` option (:func:`liveupdate.server.options.click_options`
  decorates luod's command);
* the field of :class:`Config` that ``luod`` reads;
* the argument that reproduces it for a re-executed generation
  (:meth:`Config.to_args`: the same configuration, resolved: absolute paths,
  the admin group as a gid), and the JSON object a successor receives
  instead (:meth:`Config.to_fields`, :meth:`Config.from_fields`).

A value that needs converting says so with its type (:data:`OCTAL`,
:data:`GROUP_ID`, :data:`EXECUTABLE`, :class:`AtLeast`, :class:`OneOf`),
which also reads back what :meth:`~Config.to_args` writes. This module does
not import ``click``: a successor gets its configuration as JSON and never
pays for it (:mod:`liveupdate.server.options` turns the types into click's).
Options that are not configuration (the ``--check-image`` mode, the hidden
options a re-exec passes the handover with) are declared on luod's command
alone.
"""

from __future__ import annotations

import dataclasses
import grp
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liveupdate import paths
from liveupdate.core.policy import Limits

__all__ = [
    "EXECUTABLE",
    "GROUP_ID",
    "OCTAL",
    "OPTION",
    "AtLeast",
    "Config",
    "Converted",
    "OneOf",
    "Option",
    "gid_of",
]

#: Key of a :class:`Config` field's metadata that holds its :class:`Option`.
OPTION = "luod-option"


def gid_of(group: str) -> int:
    """The gid of a group given by name or number (``KeyError``: no such group)."""
    try:
        return int(group)
    except ValueError:
        return grp.getgrnam(group).gr_gid


@dataclass(frozen=True)
class Converted:
    """A value read by ``convert`` from its text; a ``ValueError`` is the message shown.

    ``name`` is what the help calls such a value.
    """

    name: str
    convert: Callable[[str], Any]


@dataclass(frozen=True)
class AtLeast:
    """A number (``kind``) no smaller than ``low``."""

    kind: type[int] | type[float]
    low: float


@dataclass(frozen=True)
class OneOf:
    """One of ``choices``."""

    choices: tuple[str, ...]


def _octal(value: str) -> int:
    try:
        return int(value, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not octal") from None


def _group_id(value: str) -> int:
    try:
        return gid_of(value)
    except KeyError:
        raise ValueError(f"no group {value!r}") from None


def _executable(value: str) -> str:
    import shutil  # only for this option, at the command line

    # execv does not search PATH (the pre-flight's subprocess would):
    # resolve now, so both run the same file.
    resolved = shutil.which(value)
    if resolved is None:
        raise ValueError(f"{value!r} is not an executable")
    return os.path.abspath(resolved)


#: Permission bits in octal (``0660``), read as an int.
OCTAL = Converted("mode", _octal)
#: A group name or gid, read as the gid.
GROUP_ID = Converted("group", _group_id)
#: An executable found like a shell would, read as its absolute path.
EXECUTABLE = Converted("path", _executable)


@dataclass(frozen=True)
class Option:
    """How one :class:`Config` field appears on luod's command line.

    Attributes:
        flag: The option (``--max-files``).
        params: ``click.option``'s keyword arguments (help, type, ...); a
            ``type`` is one of this module's (:mod:`~liveupdate.server.options`
            makes it click's).
        to_arg: Writes the value back as the option's argument; ``None``
            for a flag, given when the value is true.
    """

    flag: str
    params: Mapping[str, Any]
    to_arg: Callable[[Any], str] | None = str


def option(
    flag: str,
    value: Any = dataclasses.MISSING,
    *,
    to_arg: Callable[[Any], str] | None = str,
    **params: Any,
) -> Any:
    """A :class:`Config` field that is the option ``flag`` (see :class:`Option`).

    ``value`` is the field's default and, unless ``params`` gives a
    ``default`` of its own, the option's.
    """
    if "default" not in params and value is not dataclasses.MISSING:
        params["default"] = value
    return dataclasses.field(default=value, metadata={OPTION: Option(flag, params, to_arg)})


@dataclass
class Config:
    """Everything ``luod``'s options set, in ``luod --help``'s order."""

    #: The click default is computed at start (it depends on the user).
    socket_path: str = option(
        "--socket",
        default=paths.default_socket_path,
        show_default="/run/liveupdate/device as root, else $XDG_RUNTIME_DIR/liveupdate/device",
        help="Path of the device socket to serve.",
    )
    socket_mode: int = option(
        "--socket-mode",
        0o600,
        to_arg=lambda mode: f"{mode:04o}",
        type=OCTAL,
        default="0600",  # shown as written: OCTAL reads it
        show_default=True,
        help="Permission bits of the socket (octal); who may connect may use the device.",
    )
    #: As given (a name stays a name: the next generation resolves it again).
    socket_group: str | None = option(
        "--socket-group", None, help="Group (name or gid) owning the socket."
    )
    #: Empty: ``control`` next to the device socket (:func:`liveupdate.paths.control_path_for`).
    control_socket: str = option(
        "--control-socket",
        "",
        metavar="PATH",
        help="Path of the control socket: GET_STATE, SET_EVENT and LIST_SESSIONS without "
        "the single-opener device, for luoctl and the service manager "
        "[default: 'control' next to the device socket].",
    )
    control_socket_mode: int = option(
        "--control-socket-mode",
        0o600,
        to_arg=lambda mode: f"{mode:04o}",
        type=OCTAL,
        default="0600",
        show_default=True,
        help="Permission bits of the control socket (octal).",
    )
    control_socket_group: str | None = option(
        "--control-socket-group", None, help="Group (name or gid) owning the control socket."
    )
    state_dir: str = option(
        "--state-dir",
        "",
        help="Directory of the lock, state and handover files [default: the socket's directory].",
    )
    state_file: str = option(
        "--state-file",
        "",
        help="File mirroring the state (normal|prepared|frozen|updated) "
        "[default: STATE_DIR/state].",
    )
    max_sessions: int = option(
        "--max-sessions",
        Limits.max_sessions,
        type=AtLeast(int, 1),
        show_default=True,
        help="Most outgoing sessions at once (CREATE_SESSION then fails with ENOMEM).",
    )
    max_files: int = option(
        "--max-files",
        Limits.max_files,
        type=AtLeast(int, 1),
        show_default=True,
        help="Most files in one session (PRESERVE_FD then fails with ENOSPC).",
    )
    max_sessions_per_uid: int = option(
        "--max-sessions-per-uid",
        Limits.max_sessions_per_uid,
        type=AtLeast(int, 0),
        show_default=True,
        help="Most sessions luod holds for one uid, incoming ones included (CREATE_SESSION "
        "then fails with ENOMEM); 0: no quota. uid 0 and luod's own uid are exempt.",
    )
    max_files_per_uid: int = option(
        "--max-files-per-uid",
        Limits.max_files_per_uid,
        type=AtLeast(int, 0),
        show_default=True,
        help="Most files luod holds for one uid over all its sessions (PRESERVE_FD then "
        "fails with ENOSPC); 0: no quota.",
    )
    max_memfd_bytes_per_uid: int = option(
        "--max-memfd-bytes-per-uid",
        Limits.max_memfd_bytes_per_uid,
        type=AtLeast(int, 0),
        show_default=True,
        help="Most bytes of memfd (sizes when preserved) luod holds for one uid "
        "(PRESERVE_FD then fails with ENOSPC); 0: no quota.",
    )
    fd_reserve: int = option(
        "--fd-reserve",
        Limits.fd_reserve,
        type=AtLeast(int, 0),
        show_default=True,
        help="fds of luod's RLIMIT_NOFILE kept for its own work, so that a reboot stays "
        "possible: CREATE_SESSION and PRESERVE_FD that would use them fail with EMFILE.",
    )
    #: Resolved to a gid once (the next generation gets the number).
    admin_gid: int | None = option(
        "--admin-group",
        None,
        type=GROUP_ID,
        metavar="GROUP",
        help="Group (name or gid) whose members may drive the state machine (prepare, "
        "cancel, reboot, finish everyone's sessions) like root and luod's own user.",
    )
    participant_timeout_ms: int = option(
        "--participant-timeout-ms",
        Limits.participant_timeout_ms,
        type=AtLeast(int, 1),
        show_default=True,
        help="How long luod waits for a participant's answer to one event (PREPARE, FREEZE, "
        "CANCEL, FINISH); a missed PREPARE or FREEZE deadline aborts the live update.",
    )
    #: ``HOST:PORT`` of the Prometheus endpoint; ``None``: no metrics.
    metrics_address: str | None = option(
        "--metrics-address",
        None,
        metavar="HOST:PORT",
        help="Serve Prometheus metrics over HTTP at this address (e.g. 127.0.0.1:9464) "
        "[default: off].",
    )
    log_format: str = option(
        "--log-format",
        "human",
        type=OneOf(("human", "json")),
        show_default=True,
        help="One line per event, readable or JSON.",
    )
    log_level: str = option(
        "--log-level",
        "info",
        type=OneOf(("debug", "info", "warning", "error")),
        show_default=True,
        help="debug also logs every ioctl and every caller mistake.",
    )
    #: Where the copies of every preserved fd are kept (:mod:`liveupdate.server.fdstore`).
    keeper: str = option(
        "--keeper",
        "auto",
        type=OneOf(("auto", "keeper", "fdstore", "off")),
        show_default=True,
        help="Where luod keeps a copy of every preserved fd so that its crash loses nothing: "
        "auto (systemd's fd store when $FDSTORE says it is enabled, else a keeper process), "
        "keeper, fdstore, or off.",
    )
    #: Seconds between two journal writes (0: no journal).
    journal_interval: float = option(
        "--journal-interval",
        1.0,
        type=AtLeast(float, 0),
        show_default=True,
        help="Seconds between two writes of the journal (STATE_DIR/journal.dtb), which lets "
        "the next start report what was lost if luod is killed; 0 disables it.",
    )
    #: The next generation's executable (absolute); ``None``: ``luod.default_exec_argv``.
    exec_path: str | None = option(
        "--exec",
        None,
        type=EXECUTABLE,
        metavar="PATH",
        help="luod executable the live update re-executes [default: this Python running "
        "the installed liveupdate package].",
    )
    #: ``linux``: behave as Linux 7.3's /dev/liveupdate where userspace can
    #: (docs/guides/linux-mode.md); ``None``: luod's own contract and extensions.
    compat: str | None = option(
        "--compat",
        None,
        type=OneOf(("linux",)),
        help="linux: answer on the device and session fds as Linux 7.3 does (EINVAL for "
        "numbers outside its table, no luod extensions, memfds alone, their size locked "
        "by seals); the control socket keeps the extensions [default: luod's own contract].",
    )
    #: The listener came from systemd (kept across re-execs: never unlink it).
    socket_activated: bool = option("--socket-activated", False, to_arg=None, hidden=True)

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = str(Path(self.socket_path).parent)
        if not self.state_file:
            self.state_file = str(Path(self.state_dir) / "state")
        if not self.control_socket:
            self.control_socket = paths.control_path_for(self.socket_path)

    def absolute(self) -> Config:
        """This configuration with every path absolute (luod leaves its working
        directory; the next generation must find the same files)."""
        return dataclasses.replace(
            self,
            socket_path=os.path.abspath(self.socket_path),
            state_dir=os.path.abspath(self.state_dir),
            state_file=os.path.abspath(self.state_file),
            control_socket=os.path.abspath(self.control_socket),
        )

    @property
    def exec_argv(self) -> list[str]:
        """The next generation's command, if ``--exec`` gave one."""
        return [self.exec_path] if self.exec_path else []

    @property
    def linux_exact(self) -> bool:
        """``--compat=linux``."""
        return self.compat == "linux"

    @property
    def limits(self) -> Limits:
        return Limits(
            max_sessions=self.max_sessions,
            max_files=self.max_files,
            max_sessions_per_uid=self.max_sessions_per_uid,
            max_files_per_uid=self.max_files_per_uid,
            max_memfd_bytes_per_uid=self.max_memfd_bytes_per_uid,
            fd_reserve=self.fd_reserve,
            admin_gid=self.admin_gid,
            participant_timeout_ms=self.participant_timeout_ms,
        )

    def to_args(self) -> list[str]:
        """The options that reproduce this configuration (for the next generation)."""
        args: list[str] = []
        for field in dataclasses.fields(self):
            spec: Option = field.metadata[OPTION]
            value = getattr(self, field.name)
            if spec.to_arg is None:
                args += [spec.flag] if value else []
            elif value is not None:
                args += [spec.flag, spec.to_arg(value)]
        return args

    def to_fields(self) -> dict[str, Any]:
        """This configuration as a JSON object (what a successor receives)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> Config:
        """The configuration :meth:`to_fields` wrote (perhaps an older luod's:
        a field it did not have keeps its default).

        Raises:
            ValueError: a field this version does not know, or of the wrong type.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}")
        for name, value in fields.items():
            default = known[name].default
            if value is None or default is None or default is dataclasses.MISSING:
                continue
            if type(value) is not type(default) and not (
                isinstance(default, float) and type(value) is int
            ):
                raise ValueError(f"option {name}: {value!r} is not a {type(default).__name__}")
        return cls(**fields)
