"""``luod``: the Live Update Orchestrator daemon.

It plays the kernel's part: it serves the LUO device on a Unix socket, holds
every preserved file, and performs its own live update (``luoctl reboot``)
by re-executing itself with a handover image and the inherited fds.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import os
import resource
import shutil
import socket
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import click

from liveupdate import paths
from liveupdate.core.handlers import default_registry
from liveupdate.core.luo import Limits, LuoState, Orchestrator
from liveupdate.server import systemd
from liveupdate.server.journal import Journal
from liveupdate.server.logs import event, setup_logging
from liveupdate.server.reboot import (
    IMAGE_NAME,
    MARKER_NAME,
    Faults,
    Rebooter,
    child_environment,
    find_lost,
    restore_from_image,
)
from liveupdate.server.reboot import check_image as check_image_main
from liveupdate.server.safefs import StateDir, UnsafePathError
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
    max_sessions_per_uid: int = Limits.max_sessions_per_uid
    max_files_per_uid: int = Limits.max_files_per_uid
    max_memfd_bytes_per_uid: int = Limits.max_memfd_bytes_per_uid
    fd_reserve: int = Limits.fd_reserve
    #: ``--admin-group``, resolved to a gid once (the next generation gets the number).
    admin_gid: int | None = None
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
        return Limits(
            max_sessions=self.max_sessions,
            max_files=self.max_files,
            max_sessions_per_uid=self.max_sessions_per_uid,
            max_files_per_uid=self.max_files_per_uid,
            max_memfd_bytes_per_uid=self.max_memfd_bytes_per_uid,
            fd_reserve=self.fd_reserve,
            admin_gid=self.admin_gid,
        )

    def to_args(self) -> list[str]:
        """The options that reproduce this configuration (for the next generation)."""
        args = [
            "--socket", self.socket_path,
            "--socket-mode", f"{self.socket_mode:04o}",
            "--state-dir", self.state_dir,
            "--state-file", self.state_file,
            "--max-sessions", str(self.max_sessions),
            "--max-files", str(self.max_files),
            "--max-sessions-per-uid", str(self.max_sessions_per_uid),
            "--max-files-per-uid", str(self.max_files_per_uid),
            "--max-memfd-bytes-per-uid", str(self.max_memfd_bytes_per_uid),
            "--fd-reserve", str(self.fd_reserve),
            "--log-format", self.log_format,
            "--log-level", self.log_level,
            "--journal-interval", str(self.journal_interval),
        ]  # fmt: skip
        if self.socket_group is not None:
            args += ["--socket-group", self.socket_group]
        if self.admin_gid is not None:
            args += ["--admin-group", str(self.admin_gid)]
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


def _admin_gid(group: str | None) -> int | None:
    """``--admin-group``'s gid; an unknown group name is a usage error."""
    if group is None:
        return None
    try:
        return _gid(group)
    except KeyError:
        raise click.BadParameter(f"no group {group!r}", param_hint="--admin-group") from None


def acquire_lock(state_dir: StateDir) -> int:
    """Take ``luod.lock`` in the state directory, or fail if a live luod holds it."""
    fd = state_dir.open_lock("luod.lock")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StartupError(f"another luod holds {state_dir.show('luod.lock')}") from None
    return fd


def bind_listener(config: Config, socket_dir: StateDir) -> socket.socket:
    """Create the device socket, replacing a stale socket file but never a live one.

    ``socket_dir`` is the socket's directory, checked: nobody else can swap
    it, so binding by path lands in it.
    """
    path = config.socket_path
    name = os.path.basename(path)
    try:
        st = os.lstat(name, dir_fd=socket_dir.fd)
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
            os.unlink(name, dir_fd=socket_dir.fd)  # nobody listens: a dead daemon's
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
    os.chmod(name, config.socket_mode, dir_fd=socket_dir.fd, follow_symlinks=False)
    if config.socket_group is not None:
        os.chown(name, -1, _gid(config.socket_group), dir_fd=socket_dir.fd, follow_symlinks=False)
    sock.listen(socket.SOMAXCONN)
    return sock


def write_state_file(directory: StateDir, name: str, state: LuoState) -> None:
    """Replace the state file atomically with ``normal``/``prepared``/... (mode 0644).

    The file only mirrors the state for watchers: failing to write it is
    logged, never allowed to interrupt a state change.
    """
    try:
        directory.write_atomic(name, state.name.lower().encode() + b"\n", 0o644)
    except OSError as exc:
        event("state-file-failed", 30, path=directory.show(name), error=exc.strerror)


def default_exec_argv() -> list[str]:
    """The next generation's command: this interpreter running the installed luod.

    ``python -m liveupdate.server.luod`` imports whatever version of the
    package is installed at reboot time, so upgrading the package and then
    rebooting luod runs the new code. ``-P`` keeps the working directory off
    ``sys.path`` (``-m`` would put it first): only installed code runs. Not
    ``-I``: it would also drop ``PYTHONPATH``, where handler plugins may be
    installed; the children's environment is built by luod instead
    (:func:`~liveupdate.server.reboot.child_environment`).
    """
    return [sys.executable, "-P", "-m", "liveupdate.server.luod"]


def python_path_for_children(environ: dict[str, str] | None = None) -> str:
    """luod's own ``PYTHONPATH`` with every entry absolute (call it before leaving the
    working directory); empty entries (the working directory) are dropped."""
    value = (os.environ if environ is None else environ).get("PYTHONPATH", "")
    return os.pathsep.join(os.path.abspath(p) for p in value.split(os.pathsep) if p)


@dataclass
class Handover:
    """What a re-executed luod inherits (hidden options set by the old generation)."""

    image: str
    listen_fd: int
    lock_fd: int


def _open_dirs(config: Config, create: bool) -> tuple[StateDir, StateDir, StateDir]:
    """The state directory, the state file's and the socket's, each checked once
    (``safefs``); the first two are created when missing on a cold start."""
    mode = 0o755 if os.geteuid() == 0 else 0o700
    state_dir = StateDir(config.state_dir, create_mode=mode if create else None)

    def same_or_open(path: str, create_mode: int | None) -> StateDir:
        return state_dir if path == state_dir.path else StateDir(path, create_mode=create_mode)

    state_file_dir = same_or_open(os.path.dirname(config.state_file), None)
    socket_dir = same_or_open(os.path.dirname(config.socket_path), mode if create else None)
    return state_dir, state_file_dir, socket_dir


def _cold_start(config: Config) -> tuple[StateDir, StateDir, int, socket.socket]:
    """Check the directories, take the lock, bind: one clear error if anything fails."""
    try:
        state_dir, state_file_dir, socket_dir = _open_dirs(config, create=True)
        lock_fd = acquire_lock(state_dir)
        activated = systemd.listen_fds()
        config.socket_activated = bool(activated)
        if activated:
            listener = socket.socket(fileno=activated[0])
        else:
            listener = bind_listener(config, socket_dir)
    except UnsafePathError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise StartupError(
            f"cannot serve {config.socket_path or repr('')} with state in "
            f"{config.state_dir}: {exc.strerror or exc}{where}"
        ) from None
    if socket_dir is not state_dir and socket_dir is not state_file_dir:
        socket_dir.close()
    return state_dir, state_file_dir, lock_fd, listener


def run(
    config: Config, handover: Handover | None = None, child_env: dict[str, str] | None = None
) -> int:
    """Serve one generation (cold start, or restored from ``handover``) until stopped.

    ``child_env``: the environment of the pre-flight and the re-exec
    (:func:`~liveupdate.server.reboot.child_environment` by default).
    """
    hard = raise_nofile_limit()
    faults = Faults()
    registry = default_registry()
    lost = None
    if handover is None:
        state_dir, state_file_dir, lock_fd, listener = _cold_start(config)
        lost = find_lost(state_dir)
        luo = Orchestrator(registry, config.limits)
    else:
        lock_fd = handover.lock_fd
        listener = socket.socket(fileno=handover.listen_fd)
        for fd in (lock_fd, handover.listen_fd):
            os.set_inheritable(fd, False)
        try:
            state_dir, state_file_dir, _socket_dir = _open_dirs(config, create=False)
        except UnsafePathError as exc:
            # The previous generation checked the same chain moments ago:
            # someone changed it during the update. Following it now could
            # write anywhere, so stop (the held files are lost, loudly).
            raise StartupError(f"after the live update: {exc}") from None
        faults.point("after-exec")
        image_dir = os.path.dirname(os.path.abspath(handover.image))
        if image_dir != state_dir.path:
            raise StartupError(f"--handover {handover.image} is not in {state_dir.path}")
        luo = restore_from_image(
            state_dir, os.path.basename(handover.image), registry, config.limits, faults
        )
    if lost is not None:
        luo.lost_sessions = lost.sessions
        luo.lost_incomplete = lost.incomplete
    _write_pid(lock_fd)
    state_name = os.path.basename(config.state_file)
    luo.on_state_change = lambda state: write_state_file(state_file_dir, state_name, state)
    write_state_file(state_file_dir, state_name, luo.state)
    server = DeviceServer(luo, listener)
    journal = Journal(state_dir, config.journal_interval, f"luod {__version__}")
    rebooter = Rebooter(
        server,
        registry,
        config.limits,
        state_dir,
        config.exec_argv or default_exec_argv(),
        config.to_args(),
        lock_fd,
        faults,
        journal,
        child_env,
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
        if server.luo.restore_error is None:
            # Released on purpose, like the journal: an intent or image left by
            # a reboot that failed must not read as a loss at the next start.
            # (After a failed restore the image stays: its files are lost now.)
            state_dir.unlink(IMAGE_NAME)
            state_dir.unlink(MARKER_NAME)
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


def _refuse(message: str) -> NoReturn:
    """A bad option value: one line, exit 2 (as for click's usage errors)."""
    click.echo(f"luod: {message}", err=True)
    sys.exit(2)


def _check_socket_options(path: str, mode: int, group: str | None) -> None:
    if not path:
        _refuse("--socket: the path is empty; give the socket's path")
    if path.endswith("/"):
        _refuse(f"--socket {path}: names a directory; give the socket's path")
    if mode & ~0o777:
        _refuse(f"--socket-mode {mode:04o}: only permission bits (0000-0777) make sense")
    if group is not None:
        try:
            _gid(group)
        except KeyError:
            _refuse(f"--socket-group {group}: no such group")


def _warn_open_socket(mode: int, group: str | None) -> None:
    """Accepted, but said out loud: whoever may connect may use the device."""
    if mode & 0o006:
        event(
            "socket-open-to-everyone",
            logging.WARNING,
            mode=f"{mode:04o}",
            consequence="any user of this machine may use the device",
        )
    elif mode & 0o060:
        event(
            "socket-open-to-group",
            logging.WARNING,
            mode=f"{mode:04o}",
            group=group if group is not None else "luod's primary group",
            consequence="every member of the group may use the device",
        )


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
    "--max-sessions-per-uid",
    type=click.IntRange(0),
    default=Limits.max_sessions_per_uid,
    show_default=True,
    help="Most sessions luod holds for one uid, incoming ones included (CREATE_SESSION "
    "then fails with ENOMEM); 0: no quota. uid 0 and luod's own uid are exempt.",
)
@click.option(
    "--max-files-per-uid",
    type=click.IntRange(0),
    default=Limits.max_files_per_uid,
    show_default=True,
    help="Most files luod holds for one uid over all its sessions (PRESERVE_FD then "
    "fails with ENOSPC); 0: no quota.",
)
@click.option(
    "--max-memfd-bytes-per-uid",
    type=click.IntRange(0),
    default=Limits.max_memfd_bytes_per_uid,
    show_default=True,
    help="Most bytes of memfd (sizes when preserved) luod holds for one uid "
    "(PRESERVE_FD then fails with ENOSPC); 0: no quota.",
)
@click.option(
    "--fd-reserve",
    type=click.IntRange(0),
    default=Limits.fd_reserve,
    show_default=True,
    help="fds of luod's RLIMIT_NOFILE kept for its own work, so that a reboot stays "
    "possible: CREATE_SESSION and PRESERVE_FD that would use them fail with EMFILE.",
)
@click.option(
    "--admin-group",
    default=None,
    metavar="GROUP",
    help="Group (name or gid) whose members may drive the state machine (prepare, "
    "cancel, reboot, finish everyone's sessions) like root and luod's own user.",
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
    max_sessions_per_uid: int,
    max_files_per_uid: int,
    max_memfd_bytes_per_uid: int,
    fd_reserve: int,
    admin_group: str | None,
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
    _check_socket_options(socket_path, mode, socket_group)
    # Every path absolute now: luod leaves its working directory below.
    socket_path = os.path.abspath(socket_path)
    state_dir = os.path.abspath(state_dir) if state_dir else ""
    state_file = os.path.abspath(state_file) if state_file else ""
    config = Config(
        socket_path=socket_path,
        socket_mode=mode,
        socket_group=socket_group,
        state_dir=state_dir,
        state_file=state_file,
        max_sessions=max_sessions,
        max_files=max_files,
        max_sessions_per_uid=max_sessions_per_uid,
        max_files_per_uid=max_files_per_uid,
        max_memfd_bytes_per_uid=max_memfd_bytes_per_uid,
        fd_reserve=fd_reserve,
        admin_gid=_admin_gid(admin_group),
        log_format=log_format,
        log_level=log_level,
        journal_interval=journal_interval,
    )
    if check_image is not None:
        os.chdir("/")
        sys.exit(check_image_main(check_image, default_registry()))
    if exec_path:
        # execv does not search PATH (the pre-flight's subprocess would):
        # resolve now, so both run the same file.
        resolved = shutil.which(exec_path)
        if resolved is None:
            raise click.BadParameter(f"{exec_path!r} is not an executable", param_hint="--exec")
        config.exec_argv = [os.path.abspath(resolved)]
    config.socket_activated = socket_activated
    # Children get luod's PYTHONPATH with absolute entries, then nothing of
    # the caller's working directory: luod (and so each child) runs in "/".
    child_env = child_environment(python_path=python_path_for_children())
    os.chdir("/")
    setup_logging(log_format, log_level)
    _warn_open_socket(mode, socket_group)
    inherited = None
    if handover is not None:
        if listen_fd is None or lock_fd is None:
            raise click.UsageError("--handover needs --listen-fd and --lock-fd")
        inherited = Handover(handover, listen_fd, lock_fd)
    try:
        sys.exit(run(config, inherited, child_env))
    except StartupError as exc:
        event("startup-failed", 40, reason=str(exc))
        click.echo(f"luod: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
