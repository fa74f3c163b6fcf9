"""``luod``: the Live Update Orchestrator daemon.

It plays the kernel's part: it serves the LUO device on a Unix socket, holds
every preserved file, and performs its own live update (``luoctl reboot``)
by handing a handover image and every fd to its successor, the installed
luod started ahead of time (:mod:`~liveupdate.server.successor`).

This module starts one generation and wires the pieces together: the
options (:mod:`~liveupdate.server.config`), the checked state directory and
its lock (:mod:`~liveupdate.server.safefs`), the cold start's loss report
(:mod:`~liveupdate.server.lossreport`), the successor's life before it
serves, or the restore after a ``SIGHUP`` retry's re-exec
(:mod:`~liveupdate.server.reexec`), the journal, and the transport that
serves until SIGTERM (:mod:`~liveupdate.server.transport`).

``luod --successor-fd N`` is the quick path of every live update
(:func:`entry`): no option parsing and no ``click`` (the configuration comes
over the channel), so a successor imports only what it serves with.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry
from liveupdate.core.handlers import default_registry
from liveupdate.core.handlers.linux import linux_registry
from liveupdate.core.luo import Hooks, LuoState, Orchestrator
from liveupdate.core.policy import FdBudget, Limits
from liveupdate.core.session import Session
from liveupdate.events import event
from liveupdate.handover_abi import HandoverError, HandoverImage
from liveupdate.handover_codec import decode_image, restamped_reboot_times
from liveupdate.server import fdstore, systemd
from liveupdate.server.config import Config, gid_of
from liveupdate.server.faults import FaultInjector, FaultStep
from liveupdate.server.fdstore import Copies, Recovered
from liveupdate.server.journal import IMAGE_NAME, MARKER_NAME, Journal
from liveupdate.server.logs import setup_logging
from liveupdate.server.preflight import check_image as check_image_main
from liveupdate.server.preflight import read_dry_run
from liveupdate.server.reexec import (
    ReexecDriver,
    child_environment,
    restore_from_image,
    settle_restored,
)
from liveupdate.server.safefs import StateDir, UnsafePathError
from liveupdate.server.successor import Handed, Predecessor, SuccessorError
from liveupdate.server.transport import DeviceServer, ServerHooks
from liveupdate.uapi import LuodCopies
from liveupdate.version import __version__

if TYPE_CHECKING:
    import click

    from liveupdate.server.lossreport import LostReport

__all__ = [
    "Config",
    "__version__",
    "entry",
    "raise_nofile_limit",
    "set_process_name",
    "successor_main",
]

#: ``prctl(2)``'s option that names the calling thread (``/proc/PID/comm``).
PR_SET_NAME = 15
#: What ``pgrep`` and ``ps -o comm`` show for every generation of luod (not ``python``).
PROCESS_NAME = b"luod"


class StartupError(Exception):
    """luod cannot start; the message says why and what to do."""


def set_process_name(name: bytes = PROCESS_NAME) -> None:
    """Name this process ``luod`` (``/proc/PID/comm``), whatever interpreter runs it.

    Each generation is a new ``python`` process; the name makes ``pgrep luod``
    find the one serving now. Best effort: a failure changes nothing else.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def raise_nofile_limit() -> int:
    """Raise ``RLIMIT_NOFILE``'s soft limit to the hard one: every file held costs an fd."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


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
    return bind_socket(config.socket_path, config.socket_mode, config.socket_group, socket_dir)


def bind_control(config: Config, socket_dir: StateDir) -> socket.socket:
    """Create the control socket (:mod:`~liveupdate.server.control`) the same safe way.

    ``socket_dir`` is the device socket's directory, checked; the control
    socket's own is checked here when it is another one.
    """
    where = os.path.dirname(config.control_socket)
    if where == socket_dir.path:
        return bind_socket(
            config.control_socket, config.control_socket_mode, config.control_socket_group,
            socket_dir,
        )  # fmt: skip
    mode = 0o755 if os.geteuid() == 0 else 0o700
    control_dir = StateDir(where, create_mode=mode)
    try:
        return bind_socket(
            config.control_socket, config.control_socket_mode, config.control_socket_group,
            control_dir,
        )  # fmt: skip
    finally:
        control_dir.close()


def bind_socket(path: str, mode: int, group: str | None, socket_dir: StateDir) -> socket.socket:
    """A listening ``SOCK_SEQPACKET`` socket at ``path`` in the checked ``socket_dir``,
    with exactly ``mode`` and ``group``; a stale socket file is replaced, a live one never."""
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
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(name, mode, dir_fd=socket_dir.fd, follow_symlinks=False)
    if group is not None:
        gid = gid_of(group)
        os.chown(name, -1, gid, dir_fd=socket_dir.fd, follow_symlinks=False)
    sock.listen(socket.SOMAXCONN)
    return sock


def write_state_file(directory: StateDir, name: str, state: LuoState) -> None:
    """Replace the state file atomically with ``normal``/``prepared``/... (mode 0644).

    The file only mirrors the state for watchers: failing to write it is
    logged, never allowed to interrupt a state change. Not fsync'ed: every
    start writes it again, and an fsync here (1-7 ms on ext4) sat inside the
    blackout of every per-session update (UPDATE, then the successor's FINISH).
    """
    try:
        directory.write_atomic(name, state.name.lower().encode() + b"\n", 0o644, durable=False)
    except OSError as exc:
        event("state-file-failed", logging.WARNING, path=directory.show(name), error=exc.strerror)


def default_exec_argv() -> list[str]:
    """The next generation's command: this interpreter running the installed luod.

    ``python -m liveupdate.server.luod`` imports whatever version of the
    package is installed at reboot time, so upgrading the package and then
    rebooting luod runs the new code. ``-P`` keeps the working directory off
    ``sys.path`` (``-m`` would put it first): only installed code runs. Not
    ``-I``: it would also drop ``PYTHONPATH``, where handler plugins may be
    installed; the children's environment is built by luod instead
    (:func:`~liveupdate.server.reexec.child_environment`).
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
    #: The control socket's listener (``None``: the old generation had none).
    control_fd: int | None = None


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


@dataclass
class Ground:
    """What a generation stands on: its checked directories, the lock, the listener."""

    state_dir: StateDir
    state_file_dir: StateDir
    lock_fd: int
    listener: socket.socket
    #: The control socket's listener (:mod:`~liveupdate.server.control`).
    control: socket.socket | None = None
    #: The fd store's copies given back by the service manager, by name.
    given_back: dict[str, int] = field(default_factory=dict)


def _cold_start(config: Config) -> Ground:
    """Check the directories, take the lock, bind: one clear error if anything fails."""
    try:
        state_dir, state_file_dir, socket_dir = _open_dirs(config, create=True)
        lock_fd = acquire_lock(state_dir)
        names = systemd.listen_fd_names()
        activated = systemd.listen_fds()
        # The fd store's copies come with the sockets, told apart by their
        # names (fdstore): the listener is the fd left.
        given_back = {
            name: fd
            for name, fd in zip(names, activated, strict=False)
            if fdstore.is_copy_name(name)
        }
        activated = [fd for fd in activated if fd not in given_back.values()]
        config.socket_activated = bool(activated)
        if activated:
            listener = socket.socket(fileno=activated[0])
        else:
            listener = bind_listener(config, socket_dir)
        control = bind_control(config, socket_dir)
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
    return Ground(state_dir, state_file_dir, lock_fd, listener, control, given_back)


def _inherit(config: Config, handover: Handover, faults: FaultInjector) -> Ground:
    """After a re-exec: take over the lock and the listener, check the directories again."""
    lock_fd = handover.lock_fd
    listener = socket.socket(fileno=handover.listen_fd)
    for fd in (lock_fd, handover.listen_fd):
        os.set_inheritable(fd, False)
    control = None
    if handover.control_fd is not None:
        os.set_inheritable(handover.control_fd, False)
        control = socket.socket(fileno=handover.control_fd)
    try:
        state_dir, state_file_dir, _socket_dir = _open_dirs(config, create=False)
    except UnsafePathError as exc:
        # The previous generation checked the same chain moments ago:
        # someone changed it during the update. Following it now could
        # write anywhere, so stop (the held files are lost, loudly).
        raise StartupError(f"after the live update: {exc}") from None
    faults.point(FaultStep.AFTER_EXEC)
    image_dir = os.path.dirname(os.path.abspath(handover.image))
    if image_dir != state_dir.path:
        raise StartupError(f"--handover {handover.image} is not in {state_dir.path}")
    return Ground(state_dir, state_file_dir, lock_fd, listener, control)


def _server_hooks(
    config: Config,
    ground: Ground,
    faults: FaultInjector,
    journal: Journal,
    child_env: dict[str, str] | None,
    copies: Copies | None = None,
) -> Callable[[DeviceServer], ServerHooks]:
    """What luod plugs into its transport: the re-exec driver, SIGHUP, the journal."""

    def hooks(server: DeviceServer) -> ServerHooks:
        driver = ReexecDriver(
            server,
            server.luo.registry,
            config.limits,
            ground.state_dir,
            config.exec_argv or default_exec_argv(),
            config.to_args(),
            ground.lock_fd,
            faults,
            journal,
            child_env,
            successor_config=config.to_fields(),
        )

        def on_idle() -> float | None:
            due = journal.tick(server.luo)
            if copies is None:
                return due
            later = copies.sync(server.luo)
            return later if due is None else due if later is None else min(due, later)

        return ServerHooks(host=driver, on_sighup=driver.retry_restore, on_idle=on_idle)

    return hooks


def _shut_down(
    config: Config,
    ground: Ground,
    server: DeviceServer,
    journal: Journal,
    copies: Copies | None = None,
) -> None:
    """A clean stop: every session released on purpose, nothing left to report."""
    systemd.notify("STOPPING=1")
    server.close()
    server.luo.close()
    if copies is not None:
        copies.stop()  # released on purpose: the copies go too
        if copies.kind == LuodCopies.KEEPER:
            ground.state_dir.unlink(_keeper_pid_file())
    journal.remove()
    if server.luo.restore_error is None:
        # Released on purpose, like the journal: an intent or image left by
        # a reboot that failed must not read as a loss at the next start.
        # (After a failed restore the image stays: its files are lost now.)
        ground.state_dir.unlink(IMAGE_NAME)
        ground.state_dir.unlink(MARKER_NAME)
    if not config.socket_activated:  # systemd's socket is systemd's to remove
        try:
            os.unlink(config.socket_path)
        except FileNotFoundError:
            pass
    ground.listener.close()
    if ground.control is not None:
        try:
            os.unlink(config.control_socket)
        except FileNotFoundError:
            pass
        ground.control.close()
    os.close(ground.lock_fd)
    event("stopped")


def run(
    config: Config,
    handover: Handover | None = None,
    child_env: dict[str, str] | None = None,
    predecessor: Predecessor | None = None,
) -> int:
    """Serve one generation (cold start, restored from ``handover``, or taken
    over as the successor of ``predecessor``) until stopped.

    ``child_env``: the environment of the successor and the re-exec
    (:func:`~liveupdate.server.reexec.child_environment` by default).
    """
    set_process_name()
    hard = raise_nofile_limit()
    faults = FaultInjector()
    registry = linux_registry() if config.linux_exact else default_registry()
    lost: LostReport | None = None
    state_name = os.path.basename(config.state_file)
    server: DeviceServer | None = None
    journal: Journal | None = None
    state_file_dir: StateDir | None = None
    copies: Copies | None = None
    #: errno of copies that could not start (0: on, or turned off).
    copies_failed = 0
    recovered: Recovered | None = None

    def released_meanwhile(session: Session) -> bool:
        # The transport's close check. The transport is made below, around
        # this orchestrator; no call reaches the core before it serves.
        return server is not None and server.reap(session)

    def on_state_change(state: LuoState) -> None:
        if state_file_dir is not None:
            write_state_file(state_file_dir, state_name, state)
        host = server.hooks.host if server is not None else None
        if isinstance(host, ReexecDriver):
            host.state_changed(state)

    luo_hooks = Hooks(
        on_state_change=on_state_change,
        released_meanwhile=released_meanwhile,
        journal_error=lambda: journal.error if journal is not None else 0,
        copies_error=lambda: copies.error if copies is not None else copies_failed,
        budget=FdBudget(),
    )
    if predecessor is not None:
        taken = _take_over(config, predecessor, registry, faults, luo_hooks)
        if taken is None:
            return 0  # dismissed (CANCEL), or the hand-over failed: nothing is ours
        ground, luo = taken
    else:
        back: tuple[Orchestrator, Recovered] | None = None
        if handover is None:
            ground = _cold_start(config)
            copies, back, copies_failed = _open_copies(
                config, ground, child_env, registry, luo_hooks, True
            )
            from liveupdate.server.lossreport import find_lost, forget_records

            if back is None:
                lost = find_lost(ground.state_dir)
            else:
                forget_records(ground.state_dir)  # what they describe is back
        else:
            ground = _inherit(config, handover, faults)
        if back is not None:
            luo, recovered = back
        else:
            luo = _first_generation(
                config, handover, ground.state_dir, registry, faults, lost, luo_hooks
            )
    if copies is None and (handover is not None or predecessor is not None):
        copies, _, copies_failed = _open_copies(
            config, ground, child_env, registry, luo_hooks, False
        )
        if copies is not None:
            copies.hold_off(fdstore.AFTER_REBOOT_GRACE)
    _set_budget(luo_hooks.budget, copies, config.limits)
    state_dir, state_file_dir = ground.state_dir, ground.state_file_dir
    journal = Journal(state_dir, config.journal_interval, f"luod {__version__}")
    _write_pid(ground.lock_fd)
    write_state_file(state_file_dir, state_name, luo.state)
    server = DeviceServer(
        luo,
        ground.listener,
        _server_hooks(config, ground, faults, journal, child_env, copies),
        control=ground.control,
        # The control socket keeps the extensions luoctl needs (linux-mode.md).
        linux_exact=config.linux_exact,
    )
    server.install_signal_handlers()
    metrics = None
    if config.metrics_address is not None:
        from liveupdate.server.metrics import MetricsEndpoint  # off by default: not imported

        metrics = MetricsEndpoint(server, config.metrics_address, len(luo.sessions.incoming))
        metrics.start()
    restored = (handover is not None or predecessor is not None) and luo.restore_error is None
    event(
        "started",
        version=__version__,
        socket=config.socket_path,
        generation=luo.generation,
        nofile=hard,
        activated=config.socket_activated,
        restored=restored,
        copies=copies.name if copies is not None else "off",
        recovered_sessions=recovered.sessions if recovered is not None else 0,
        compat=config.compat or "luod",
    )
    luo.serving()
    # The line operators (and tests) wait for: the socket listens now.
    event("serving", socket=config.socket_path, generation=luo.generation)
    main_pid = [f"MAINPID={os.getpid()}"] if predecessor is not None else []
    systemd.notify(*main_pid, "READY=1", f"STATUS=serving generation {luo.generation}")
    try:
        server.serve_forever()
    finally:
        if metrics is not None:
            metrics.close()
        _shut_down(config, ground, server, journal, copies)
    return 0


def _set_budget(budget: FdBudget, copies: Copies | None, limits: Limits) -> None:
    """What a preserved file costs with these ``copies``, and how many they hold."""
    budget.copies = copies.kind if copies is not None else LuodCopies.OFF
    room = copies.capacity(limits) if copies is not None else None
    budget.copy_capacity, budget.capacity_source = room if room is not None else (None, "")


def _open_copies(
    config: Config,
    ground: Ground,
    child_env: dict[str, str] | None,
    registry: HandlerRegistry,
    hooks: Hooks,
    recover: bool,
) -> tuple[Copies | None, tuple[Orchestrator, Recovered] | None, int]:
    """Where this generation keeps its copies (``--keeper``), and on a cold
    start (``recover``) the generation rebuilt from what they held; last, the
    errno of copies that could not start (0: they did, or are turned off)."""
    writer = f"luod {__version__}"
    mode = config.keeper
    if mode == "auto":
        mode = "fdstore" if systemd.fd_store_enabled() else "keeper"
    given = ground.given_back
    if mode == "off":
        _close_all(given)
        return None, None, 0
    if mode == "fdstore":
        back = None
        state = fdstore.given_back_state(given) if recover else None
        if state is not None:
            back = fdstore.recover_or_report(
                state[0], given, registry, config.limits, hooks, "fdstore"
            )
        copies = fdstore.FdStoreCopies(writer, given, state[1] if state is not None else 0)
        _close_all(given)
        event("copies", kind="fdstore", max=systemd.fd_store_max())
        return copies, back, 0
    from liveupdate.server import keeper

    _close_all(given)
    dir_fd = ground.state_dir.fd
    try:
        sock = keeper.connect_keeper(dir_fd)
        if sock is not None:
            kept = keeper.KeeperCopies(sock, 0, writer)
            back = None
            if recover:
                data, files = kept.fetch()  # it says its pid too
                try:
                    if data is not None:
                        back = fdstore.recover_or_report(
                            data, files, registry, config.limits, hooks, "keeper"
                        )
                finally:
                    _close_all(files)
                _note_keeper_pid(ground.state_dir, kept.pid)
            else:  # the next generation of a live update: read, not written (an fsync)
                kept.pid = _keeper_pid(ground.state_dir)
            event("copies", kind="keeper", action="reconnected")
            return kept, back, 0
        env = child_env if child_env is not None else child_environment()
        pid = keeper.start_keeper(dir_fd, env)
        _note_keeper_pid(ground.state_dir, pid)
        sock = keeper.connect_keeper(dir_fd)
        if sock is None:
            raise OSError(errno.ECONNREFUSED, "the keeper does not listen")
    except OSError as exc:
        event(
            "keeper-failed",
            logging.ERROR,
            error=str(exc),
            consequence="a crash of luod loses what it holds",
        )
        return None, None, exc.errno or errno.EIO
    event("copies", kind="keeper", action="started", keeper_pid=pid)
    return keeper.KeeperCopies(sock, pid, writer), None, 0


def _keeper_pid_file() -> str:
    """The name of the keeper's pid file (the keeper module is imported only
    when the keeper is used)."""
    from liveupdate.server.keeper import KEEPER_PID

    return KEEPER_PID


def _note_keeper_pid(state_dir: StateDir, pid: int) -> None:
    """Write the keeper's pid where the next generation reads it (best effort:
    without it, only the keeper's fd budget goes unchecked)."""
    if pid > 0:
        try:
            state_dir.write_atomic(_keeper_pid_file(), f"{pid}\n".encode())
        except OSError:
            pass


def _keeper_pid(state_dir: StateDir) -> int:
    """The keeper's pid as the previous generation wrote it (0: not known)."""
    try:
        text = state_dir.read(_keeper_pid_file()).decode("ascii", errors="replace").strip()
    except (OSError, UnsafePathError):
        return 0
    return int(text) if text.isdigit() else 0


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _take_over(
    config: Config,
    predecessor: Predecessor,
    registry: HandlerRegistry,
    faults: FaultInjector,
    hooks: Hooks,
) -> tuple[Ground, Orchestrator] | None:
    """The successor's life before it serves: check dry-run images until the
    hand-over, restore it, and take over once the old generation lets go.

    ``None``: this process never held anything and exits (dismissed, or the
    restore failed: the old generation keeps serving and says why).
    """
    try:
        state_dir, state_file_dir, _socket_dir = _open_dirs(config, create=False)
    except (UnsafePathError, OSError) as exc:
        predecessor.say("failed", reason=f"the next luod cannot use {config.state_dir}: {exc}")
        return None
    faults.point(FaultStep.SUCCESSOR_STARTED)
    predecessor.say("ready", pid=os.getpid(), version=__version__)
    checked: Checked | None = None
    while True:
        request = predecessor.next_request()
        if request is None:
            event("successor-dismissed")
            return None
        if isinstance(request, Handed):
            break
        problem, checked = _check_dry_run(state_dir, request, registry)
        if problem is None:
            predecessor.say("ready")
        else:
            event("preflight-failed", logging.WARNING, reason=problem)
            predecessor.say("failed", reason=problem)
    handed = request
    try:
        luo = _restore_handed(state_dir, handed, registry, config, faults, hooks, checked)
    except (OSError, HandoverError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        event("restore-failed", logging.ERROR, image=state_dir.show(IMAGE_NAME), reason=reason)
        handed.close()
        predecessor.say("failed", reason=f"the next luod could not restore: {reason}")
        return None
    faults.point(FaultStep.SUCCESSOR_RESTORED)
    predecessor.say("restored")
    predecessor.wait_serve()
    faults.point(FaultStep.SUCCESSOR_TAKEOVER)
    predecessor.say("serving")
    predecessor.close()
    for each in (handed.listener_fd, handed.lock_fd):
        os.set_inheritable(each, False)
    settle_restored(state_dir, IMAGE_NAME, luo)
    listener = socket.socket(fileno=handed.listener_fd)
    control = None
    if handed.control_fd >= 0:
        os.set_inheritable(handed.control_fd, False)
        control = socket.socket(fileno=handed.control_fd)
    return Ground(state_dir, state_file_dir, handed.lock_fd, listener, control), luo


@dataclass
class Checked:
    """The dry-run image a successor last found restorable: its bytes, decoded."""

    data: bytes
    image: HandoverImage


def _check_dry_run(
    state_dir: StateDir, name: str, registry: HandlerRegistry
) -> tuple[str | None, Checked | None]:
    """The pre-flight in the successor: why the dry-run image ``name`` could
    not be restored (``None``: it can, and it is returned, decoded)."""
    try:
        data = state_dir.read(name)
    except (OSError, UnsafePathError) as exc:
        return f"cannot read the pre-flight image {state_dir.show(name)}: {exc}", None
    problem, image = read_dry_run(data, registry)
    return problem, None if image is None else Checked(data, image)


def _restore_handed(
    state_dir: StateDir,
    handed: Handed,
    registry: HandlerRegistry,
    config: Config,
    faults: FaultInjector,
    hooks: Hooks,
    checked: Checked | None = None,
) -> Orchestrator:
    """The next generation from the image on disk and the fds just received.

    The image names the old generation's fd numbers; each is replaced by the
    number the same file has here (a file the image names but that was not
    handed over fails the restore, like a missing inherited fd).

    An image byte for byte the dry-run one checked last but for the
    reboot's times stamped in it (``checked``: a REBOOT with nothing changed
    since PREPARE) is not decoded again: the same bytes were read by the
    same decoder moments ago.
    """
    data = state_dir.read(IMAGE_NAME)
    times = restamped_reboot_times(checked.data, data) if checked is not None else None
    if checked is not None and times is not None:
        image = checked.image
        image.reboot_started_ns, image.frozen_ns = times
    else:
        image = decode_image(data)
    for session in image.sessions:
        for file in session.files:
            if file.fd >= 0:
                file.fd = handed.files.get(file.fd, -1)
    return reboot.restore(
        image,
        registry,
        config.limits,
        hooks,
        on_session=lambda _s: faults.point(FaultStep.RESTORE),
    )


def _first_generation(
    config: Config,
    handover: Handover | None,
    state_dir: StateDir,
    registry: HandlerRegistry,
    faults: FaultInjector,
    lost: LostReport | None,
    hooks: Hooks,
) -> Orchestrator:
    """The generation served first: a cold start's, or the one restored from the image."""
    if handover is None:
        return Orchestrator(
            registry,
            config.limits,
            hooks=hooks,
            lost_sessions=lost.sessions if lost is not None else 0,
            lost_incomplete=lost.incomplete if lost is not None else False,
        )
    name = os.path.basename(handover.image)
    return restore_from_image(state_dir, name, registry, config.limits, faults, hooks)


def _write_pid(lock_fd: int) -> None:
    """Record our pid in the lock file, for operators and ``luoctl``."""
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)


def _refuse(message: str) -> NoReturn:
    """A bad option value: one line, exit 2 (as for click's usage errors)."""
    print(f"luod: {message}", file=sys.stderr)
    sys.exit(2)


def _check_socket_options(config: Config) -> None:
    path, mode, group = config.socket_path, config.socket_mode, config.socket_group
    if not path:
        _refuse("--socket: the path is empty; give the socket's path")
    if path.endswith("/"):
        _refuse(f"--socket {path}: names a directory; give the socket's path")
    if mode & ~0o777:
        _refuse(f"--socket-mode {mode:04o}: only permission bits (0000-0777) make sense")
    if group is not None:
        try:
            gid_of(group)
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


def _command() -> click.Command:
    """luod's command line (built on first use: a successor never imports click)."""
    import click

    from liveupdate.server.options import click_options

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click_options
    @click.option(
        "--check-image",
        default=None,
        metavar="IMAGE",
        help="Check mode: exit 0 if this version can restore the handover IMAGE, else say why.",
    )
    @click.option("--handover", default=None, hidden=True)
    @click.option("--listen-fd", type=int, default=None, hidden=True)
    @click.option("--lock-fd", type=int, default=None, hidden=True)
    @click.option("--control-fd", type=int, default=None, hidden=True)
    @click.option("--successor-fd", type=int, default=None, hidden=True)
    @click.version_option(__version__, prog_name="luod")
    def main(
        check_image: str | None,
        handover: str | None,
        listen_fd: int | None,
        lock_fd: int | None,
        control_fd: int | None,
        successor_fd: int | None,
        **options: Any,
    ) -> None:
        """Serve the Live Update Orchestrator device on a Unix socket.

        luod holds the files that clients preserve in sessions through the LUO
        ioctl ABI (the same structs as Linux's /dev/liveupdate), and keeps them
        across its own live update (luoctl reboot). It runs in the foreground;
        SIGTERM stops it, releasing every session. Under systemd it speaks
        sd_notify (Type=notify) and accepts a socket-activated listener.
        """
        if successor_fd is not None:
            # Its configuration comes over the channel; other options are ignored.
            sys.exit(successor_main(successor_fd))
        config = Config(**options)
        _check_socket_options(config)
        # Every path absolute now: luod leaves its working directory below.
        config = config.absolute()
        if check_image is not None:
            os.chdir("/")
            sys.exit(check_image_main(check_image, default_registry()))
        # Children get luod's PYTHONPATH with absolute entries, then nothing of
        # the caller's working directory: luod (and so each child) runs in "/".
        child_env = child_environment(python_path=python_path_for_children())
        os.chdir("/")
        setup_logging(config.log_format, config.log_level)
        _warn_open_socket(config.socket_mode, config.socket_group)
        inherited = None
        if handover is not None:
            if listen_fd is None or lock_fd is None:
                raise click.UsageError("--handover needs --listen-fd and --lock-fd")
            inherited = Handover(handover, listen_fd, lock_fd, control_fd)
        _serve(config, inherited, child_env)

    return main


def _serve(
    config: Config,
    handover: Handover | None,
    child_env: dict[str, str],
    predecessor: Predecessor | None = None,
) -> NoReturn:
    try:
        sys.exit(run(config, handover, child_env, predecessor))
    except StartupError as exc:
        event("startup-failed", logging.ERROR, reason=str(exc))
        print(f"luod: {exc}", file=sys.stderr)
        sys.exit(1)


def successor_main(fd: int) -> int:
    """``luod --successor-fd N``: a successor, configured by the old generation.

    It is started in ``/`` with the environment luod builds for its children
    (:func:`~liveupdate.server.reexec.child_environment`), and reads its
    configuration from the channel (what :meth:`Config.to_fields` wrote, from
    a luod that checked it): no option parsing, no ``click``.
    """
    set_process_name()
    os.chdir("/")
    predecessor = Predecessor(fd)
    try:
        fields = predecessor.configuration()
        if fields is None:
            return 0  # the old generation went away before saying anything
        config = Config.from_fields(fields)
    except SuccessorError as exc:
        predecessor.say("failed", reason=f"the next luod: {exc.strerror}")
        return 1
    except (TypeError, ValueError) as exc:
        predecessor.say("failed", reason=f"the next luod cannot use the configuration: {exc}")
        return 1
    setup_logging(config.log_format, config.log_level)
    _warn_open_socket(config.socket_mode, config.socket_group)
    child_env = child_environment(python_path=python_path_for_children())
    _serve(config, None, child_env, predecessor)


def entry(argv: Sequence[str] | None = None) -> None:
    """Run luod: ``--successor-fd N`` alone starts a successor without parsing
    any option (the quick path of every live update), anything else is the
    command line (:data:`main`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--successor-fd" and args[1].isdigit():
        sys.exit(successor_main(int(args[1])))
    if argv is None:
        _command()()
    else:
        _command()(args)


def __getattr__(name: str) -> Any:
    # ``main``, the click command (console script, tests), built when asked for.
    if name == "main":
        command = _command()
        globals()["main"] = command
        return command
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    entry()
