"""``luod``: the Live Update Orchestrator daemon.

It plays the kernel's part: it serves the LUO device on a Unix socket, holds
every preserved file, and performs its own live update (``luoctl reboot``)
by re-executing itself with a handover image and the inherited fds.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import resource
import socket
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from liveupdate import paths
from liveupdate.core.handlers import default_registry
from liveupdate.core.luo import Limits, LuoState, Orchestrator
from liveupdate.server import systemd
from liveupdate.server.logs import event, setup_logging
from liveupdate.server.transport import DeviceServer

__all__ = ["Config", "main", "raise_nofile_limit"]

__version__ = "0.1.0"


class StartupError(Exception):
    """luod cannot start; the message says why and what to do."""


@dataclass
class Config:
    """Everything ``luod``'s options set."""

    socket_path: str
    socket_mode: int = 0o600
    socket_group: str | None = None
    state_dir: str = ""
    state_file: str = ""
    max_sessions: int = Limits.max_sessions
    max_files: int = Limits.max_files
    log_format: str = "human"
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = str(Path(self.socket_path).parent)
        if not self.state_file:
            self.state_file = str(Path(self.state_dir) / "state")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_sessions, self.max_files)


def raise_nofile_limit() -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard one: every file held costs an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _gid(group: str) -> int:
    try:
        return int(group)
    except ValueError:
        return grp.getgrnam(group).gr_gid


def acquire_lock(state_dir: str) -> int:
    """Take ``luod.lock`` in the state directory, or fail if a live luod holds it."""
    path = os.path.join(state_dir, "luod.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another luod holds {path}") from None
    return fd


def bind_listener(config: Config) -> socket.socket:
    """Create the device socket, replacing a stale socket file but never a live one."""
    path = config.socket_path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise StartupError(f"cannot check {path}: {exc.strerror}") from None
            os.unlink(path)  # nobody listens: a leftover of a dead daemon
            event("stale-socket-removed", path=path)
        else:
            raise StartupError(f"a daemon is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Bind under a restrictive umask so the socket is never reachable with
    # looser permissions than asked, not even for an instant.
    old_umask = os.umask(0o777 & ~config.socket_mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, config.socket_mode)
    if config.socket_group is not None:
        os.chown(path, -1, _gid(config.socket_group))
    sock.listen(socket.SOMAXCONN)
    return sock


def write_state_file(path: str, state: LuoState) -> None:
    """Replace the state file atomically with ``normal``/``prepared``/..."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(state.name.lower() + "\n")
    os.replace(tmp, path)


def run(config: Config) -> int:
    """Start a cold generation and serve until stopped."""
    hard = raise_nofile_limit()
    os.makedirs(config.state_dir, mode=0o755, exist_ok=True)
    os.makedirs(Path(config.socket_path).parent, mode=0o755, exist_ok=True)
    lock_fd = acquire_lock(config.state_dir)
    activated = systemd.listen_fds()
    listener = socket.socket(fileno=activated[0]) if activated else bind_listener(config)
    luo = Orchestrator(default_registry(), config.limits)
    luo.on_state_change = lambda state: write_state_file(config.state_file, state)
    write_state_file(config.state_file, luo.state)
    server = DeviceServer(luo, listener)
    server.install_signal_handlers()
    event(
        "started",
        version=__version__,
        socket=config.socket_path,
        generation=luo.generation,
        nofile=hard,
        activated=bool(activated),
    )
    print(f"luod {__version__} serving {config.socket_path}", file=sys.stderr, flush=True)
    systemd.notify("READY=1", f"STATUS=serving generation {luo.generation}")
    try:
        server.serve_forever()
    finally:
        systemd.notify("STOPPING=1")
        server.close()
        luo.close()
        if not activated:
            try:
                os.unlink(config.socket_path)
            except FileNotFoundError:
                pass
        listener.close()
        os.close(lock_fd)
        event("stopped")
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    default=paths.default_socket_path,
    show_default="/run/liveupdate/device as root, else $XDG_RUNTIME_DIR/liveupdate/device",
    help="Path of the device socket to serve.",
)
@click.option(
    "--socket-mode",
    default="0600",
    show_default=True,
    help="Permission bits of the socket (octal); who may connect may use the device.",
)
@click.option("--socket-group", default=None, help="Group (name or gid) owning the socket.")
@click.option(
    "--state-dir",
    default="",
    help="Directory of the lock, state and handover files [default: the socket's directory].",
)
@click.option(
    "--state-file",
    default="",
    help="File mirroring the state (normal|prepared|frozen|updated) [default: STATE_DIR/state].",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(1),
    default=Limits.max_sessions,
    show_default=True,
    help="Most outgoing sessions at once (CREATE_SESSION then fails with ENOMEM).",
)
@click.option(
    "--max-files",
    type=click.IntRange(1),
    default=Limits.max_files,
    show_default=True,
    help="Most files in one session (PRESERVE_FD then fails with ENOSPC).",
)
@click.option(
    "--log-format",
    type=click.Choice(["human", "json"]),
    default="human",
    show_default=True,
    help="One line per event, readable or JSON.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="debug also logs every ioctl and every caller mistake.",
)
@click.version_option(__version__, prog_name="luod")
def main(
    socket_path: str,
    socket_mode: str,
    socket_group: str | None,
    state_dir: str,
    state_file: str,
    max_sessions: int,
    max_files: int,
    log_format: str,
    log_level: str,
) -> None:
    """Serve the Live Update Orchestrator device on a Unix socket.

    luod holds the files that clients preserve in sessions through the LUO
    ioctl ABI (the same structs as Linux's /dev/liveupdate), and keeps them
    across its own live update (luoctl reboot). It runs in the foreground;
    SIGTERM stops it, releasing every session. Under systemd it speaks
    sd_notify (Type=notify) and accepts a socket-activated listener.
    """
    try:
        mode = int(socket_mode, 8)
    except ValueError:
        raise click.BadParameter(
            f"{socket_mode!r} is not octal", param_hint="--socket-mode"
        ) from None
    config = Config(
        socket_path=socket_path,
        socket_mode=mode,
        socket_group=socket_group,
        state_dir=state_dir,
        state_file=state_file,
        max_sessions=max_sessions,
        max_files=max_files,
        log_format=log_format,
        log_level=log_level,
    )
    setup_logging(log_format, log_level)
    try:
        sys.exit(run(config))
    except StartupError as exc:
        event("startup-failed", 40, reason=str(exc))
        click.echo(f"luod: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
