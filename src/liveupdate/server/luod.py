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
import shutil
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

from liveupdate import paths
from liveupdate.core.handlers import default_registry
from liveupdate.core.luo import Limits, LuoState, Orchestrator
from liveupdate.server import systemd
from liveupdate.server.journal import Journal
from liveupdate.server.logs import event, setup_logging
from liveupdate.server.reboot import (
    Faults,
    Rebooter,
    report_lost,
    restore_from_image,
)
from liveupdate.server.reboot import check_image as check_image_main
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
    #: The listener came from systemd (kept across re-execs: never unlink it).
    socket_activated: bool = False
    #: Seconds between two journal writes (0: no journal).
    journal_interval: float = 1.0
    #: The next generation's command; empty: :func:`default_exec_argv`.
    exec_argv: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.state_dir:
            self.state_dir = str(Path(self.socket_path).parent)
        if not self.state_file:
            self.state_file = str(Path(self.state_dir) / "state")

    @property
    def limits(self) -> Limits:
        return Limits(self.max_sessions, self.max_files)

    def to_args(self) -> list[str]:
        """The options that reproduce this configuration (for the next generation)."""
        args = [
            "--socket", self.socket_path,
            "--socket-mode", f"{self.socket_mode:04o}",
            "--state-dir", self.state_dir,
            "--state-file", self.state_file,
            "--max-sessions", str(self.max_sessions),
            "--max-files", str(self.max_files),
            "--log-format", self.log_format,
            "--log-level", self.log_level,
            "--journal-interval", str(self.journal_interval),
        ]  # fmt: skip
        if self.socket_group is not None:
            args += ["--socket-group", self.socket_group]
        if self.exec_argv:
            args += ["--exec", self.exec_argv[0]]
        if self.socket_activated:
            args.append("--socket-activated")
        return args


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


def check_private_dir(path: str) -> None:
    """Refuse a directory another user could plant a socket or an image in."""
    st = os.stat(path)
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise StartupError(
            f"{path} is owned by uid {st.st_uid} or writable by others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); refusing to use it"
        )


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
    """Replace the state file atomically with ``normal``/``prepared``/...

    The file only mirrors the state for watchers: failing to write it is
    logged, never allowed to interrupt a state change.
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(state.name.lower() + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        event("state-file-failed", 30, path=path, error=exc.strerror)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def default_exec_argv() -> list[str]:
    """The next generation's command: this interpreter running the installed luod.

    ``python -m liveupdate.server.luod`` imports whatever version of the
    package is installed at reboot time, so upgrading the package and then
    rebooting luod runs the new code.
    """
    return [sys.executable, "-m", "liveupdate.server.luod"]


@dataclass
class Handover:
    """What a re-executed luod inherits (hidden options set by the old generation)."""

    image: str
    listen_fd: int
    lock_fd: int


def run(config: Config, handover: Handover | None = None) -> int:
    """Serve one generation (cold start, or restored from ``handover``) until stopped."""
    hard = raise_nofile_limit()
    faults = Faults()
    registry = default_registry()
    state_dir = Path(config.state_dir)
    lost = 0
    if handover is None:
        for directory in (config.state_dir, str(Path(config.socket_path).parent)):
            os.makedirs(directory, mode=0o755 if os.geteuid() == 0 else 0o700, exist_ok=True)
            check_private_dir(directory)
        lock_fd = acquire_lock(config.state_dir)
        activated = systemd.listen_fds()
        config.socket_activated = bool(activated)
        listener = socket.socket(fileno=activated[0]) if activated else bind_listener(config)
        lost = report_lost(state_dir)
        luo = Orchestrator(registry, config.limits)
    else:
        lock_fd = handover.lock_fd
        listener = socket.socket(fileno=handover.listen_fd)
        for fd in (lock_fd, handover.listen_fd):
            os.set_inheritable(fd, False)
        faults.point("after-exec")
        luo = restore_from_image(Path(handover.image), registry, config.limits, faults)
    luo.lost_sessions = lost
    _write_pid(lock_fd)
    luo.on_state_change = lambda state: write_state_file(config.state_file, state)
    write_state_file(config.state_file, luo.state)
    server = DeviceServer(luo, listener)
    journal = Journal(config.state_dir, config.journal_interval, f"luod {__version__}")
    rebooter = Rebooter(
        server,
        registry,
        config.limits,
        config.state_dir,
        config.exec_argv or default_exec_argv(),
        config.to_args(),
        lock_fd,
        faults,
        journal,
    )
    server.host = rebooter
    server.on_sighup = rebooter.retry_restore
    server.on_idle = lambda: journal.tick(server.luo)
    server.install_signal_handlers()
    event(
        "started",
        version=__version__,
        socket=config.socket_path,
        generation=luo.generation,
        nofile=hard,
        activated=config.socket_activated,
        restored=handover is not None and luo.restore_error is None,
    )
    # The line operators (and tests) wait for: the socket listens now.
    event("serving", socket=config.socket_path, generation=luo.generation)
    systemd.notify("READY=1", f"STATUS=serving generation {luo.generation}")
    try:
        server.serve_forever()
    finally:
        systemd.notify("STOPPING=1")
        server.close()
        server.luo.close()
        journal.remove()
        if not config.socket_activated:  # systemd's socket is systemd's to remove
            try:
                os.unlink(config.socket_path)
            except FileNotFoundError:
                pass
        listener.close()
        os.close(lock_fd)
        event("stopped")
    return 0


def _write_pid(lock_fd: int) -> None:
    """Record our pid in the lock file, for operators and ``luoctl``."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


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
@click.option(
    "--journal-interval",
    type=click.FloatRange(0),
    default=1.0,
    show_default=True,
    help="Seconds between two writes of the journal (STATE_DIR/journal.dtb), which lets "
    "the next start report what was lost if luod is killed; 0 disables it.",
)
@click.option(
    "--exec",
    "exec_path",
    default=None,
    metavar="PATH",
    help="luod executable the live update re-executes [default: this Python running "
    "the installed liveupdate package].",
)
@click.option(
    "--check-image",
    default=None,
    metavar="IMAGE",
    help="Check mode: exit 0 if this version can restore the handover IMAGE, else say why.",
)
@click.option("--handover", default=None, hidden=True)
@click.option("--socket-activated", is_flag=True, hidden=True)
@click.option("--listen-fd", type=int, default=None, hidden=True)
@click.option("--lock-fd", type=int, default=None, hidden=True)
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
    journal_interval: float,
    exec_path: str | None,
    check_image: str | None,
    handover: str | None,
    socket_activated: bool,
    listen_fd: int | None,
    lock_fd: int | None,
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
        journal_interval=journal_interval,
    )
    if check_image is not None:
        sys.exit(check_image_main(check_image, default_registry()))
    if exec_path:
        # execv does not search PATH (the pre-flight's subprocess would):
        # resolve now, so both run the same file.
        resolved = shutil.which(exec_path)
        if resolved is None:
            raise click.BadParameter(f"{exec_path!r} is not an executable", param_hint="--exec")
        config.exec_argv = [os.path.abspath(resolved)]
    config.socket_activated = socket_activated
    setup_logging(log_format, log_level)
    inherited = None
    if handover is not None:
        if listen_fd is None or lock_fd is None:
            raise click.UsageError("--handover needs --listen-fd and --lock-fd")
        inherited = Handover(handover, listen_fd, lock_fd)
    try:
        sys.exit(run(config, inherited))
    except StartupError as exc:
        event("startup-failed", 40, reason=str(exc))
        click.echo(f"luod: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
