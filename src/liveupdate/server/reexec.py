"""The reboot driver: luod's live update, the hand-over that plays the kexec.

:class:`ReexecDriver` is the :class:`~liveupdate.core.reboot.RebootHost` of a
running luod. The core decides, freezes and orders the steps; the driver
does what touches the outside world, in this order:

1. the *pre-flight* (:mod:`liveupdate.server.preflight`): the successor
   (:mod:`liveupdate.server.successor`, started now unless PREPARE started
   it) must read a dry-run image of this generation, or PREPARE fails;
2. the *intent* (:meth:`~ReexecDriver.begin_reboot`): what is about to be
   handed over, on disk before anything is frozen (the journal brought up to
   date plus the ``reboot-in-progress`` marker), so that a crash from here on
   is reported by the next cold start (:mod:`liveupdate.server.lossreport`);
3. the *handover image* (``STATE_DIR/handover.dtb``), written atomically once
   everything is frozen (:meth:`~ReexecDriver.commit_reboot`);
4. the *hand-over*, before the REBOOT's reply: every preserved fd, the
   listening socket and the lock are sent to the successor, which restores
   them (a failure rolls back); after the reply the successor is told to
   serve and this process exits, so clients' connection attempts wait in
   the backlog instead of being refused. ``--no-exec`` (or a successor that
   died after its restore) builds the next generation in-process, from the
   same image file through the same function (:func:`restore_from_image`).
   A generation whose in-process restore failed re-executes the installed
   luod on ``SIGHUP`` (:meth:`~ReexecDriver.retry_restore`).

Every child (the successor, the re-exec of a retry) runs only installed code: the
command luod was given (``luod.default_exec_argv`` says which), in ``/``,
with the environment :func:`child_environment` builds instead of luod's
own. Every file is reached through the checked state directory fd
(:class:`~liveupdate.server.safefs.StateDir`), never through a link. The
crash-safety tests make the driver fail at each step through
:mod:`liveupdate.server.faults`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry, PreservedFile
from liveupdate.core.luo import Hooks, LuoState, Orchestrator
from liveupdate.core.policy import Limits
from liveupdate.events import event
from liveupdate.handover_abi import HandoverError, HandoverImage
from liveupdate.handover_codec import decode_image, encode_image, stamp_reboot_times
from liveupdate.server import systemd
from liveupdate.server.faults import FAULT_ENV, FaultInjector, FaultStep
from liveupdate.server.journal import IMAGE_NAME, LAST_IMAGE_NAME, MARKER_NAME, Journal
from liveupdate.server.safefs import StateDir
from liveupdate.server.successor import Successor

__all__ = [
    "ReexecDriver",
    "Transport",
    "child_environment",
    "restore_from_image",
    "settle_restored",
]

#: PATH of luod's children: the system's directories, never the caller's.
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Set by coverage.py in a process it measures; passed on so that the test
#: suite measures every generation too. It only makes the installed coverage
#: package record lines: it names no code beyond what ``PYTHONPATH`` (passed
#: below) already could, and it is absent unless luod's starter set it.
COVERAGE_ENV = "COVERAGE_PROCESS_CONFIG"
#: Variables of luod's own environment its children get unchanged: the service
#: manager's (``sd_notify``, journal), luod's test hook and the coverage
#: measurement of the test suite. Everything else (``LD_PRELOAD``,
#: ``PYTHON*``, ``HOME``, locale...) is the caller's, not ours.
PASSED_ENV = (
    "NOTIFY_SOCKET",
    "FDSTORE",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    FAULT_ENV,
    COVERAGE_ENV,
)


def child_environment(
    environ: Mapping[str, str] | None = None, python_path: str | None = None
) -> dict[str, str]:
    """The environment of every child luod starts (pre-flight, re-exec).

    ``python_path`` is the ``PYTHONPATH`` luod itself was started with, made
    of absolute directories (``luod.main`` resolves it before leaving its
    working directory): handler plugins installed there are part of what the
    operator installed, and the next generation must load them too.
    """
    source = os.environ if environ is None else environ
    env = {"PATH": CHILD_PATH, "LC_ALL": "C.UTF-8"}
    env.update({name: source[name] for name in PASSED_ENV if name in source})
    if python_path:
        env["PYTHONPATH"] = python_path
    return env


class Transport(Protocol):
    """What the driver needs from the transport serving the current generation
    (:class:`~liveupdate.server.transport.DeviceServer`)."""

    @property
    def luo(self) -> Orchestrator:
        """The generation served now."""

    @property
    def listener_fd(self) -> int:
        """The listening socket, inherited by the next luod."""

    @property
    def control_fd(self) -> int:
        """The control socket's listener (``-1``: none), inherited likewise."""

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` after the current call's reply is sent."""

    def close_connections(self) -> None:
        """Close every device and session connection (the sessions stay held)."""

    def replace_generation(self, luo: Orchestrator) -> None:
        """Serve ``luo`` from now on (the in-process reboot)."""


class ReexecDriver:
    """Carries out the live updates of one luod process.

    Args:
        transport: The transport serving the current generation.
        registry: Handlers (for the in-process restore).
        limits: The limits the next generation keeps.
        state_dir: Where the handover image lives (checked once, see ``safefs``).
        exec_argv: The command of the next luod (the installed one).
        daemon_args: luod's options, passed on to the next generation.
        lock_fd: The state directory's lock, inherited so no other luod can
            start between the two generations.
        faults: The crash-safety tests' fault injection.
        journal: Brought up to date as the intent of a reboot (else an image is).
        env: The children's environment (:func:`child_environment` by default).
        successor_config: luod's configuration as the successor receives it
            (:meth:`~liveupdate.server.config.Config.to_fields`).
    """

    def __init__(
        self,
        transport: Transport,
        registry: HandlerRegistry,
        limits: Limits,
        state_dir: StateDir,
        exec_argv: Sequence[str],
        daemon_args: Sequence[str],
        lock_fd: int,
        faults: FaultInjector | None = None,
        journal: Journal | None = None,
        env: Mapping[str, str] | None = None,
        successor_config: Mapping[str, Any] | None = None,
    ) -> None:
        self.transport = transport
        self.registry = registry
        self.limits = limits
        self.dir = state_dir
        self.env = dict(env) if env is not None else child_environment()
        self.exec_argv = list(exec_argv)
        self.daemon_args = list(daemon_args)
        self.successor_config = dict(successor_config or {})
        self.lock_fd = lock_fd
        self.faults = faults or FaultInjector()
        self.journal = journal
        self.started_at = 0.0
        #: The next generation, started ahead of the reboot (PREPARE).
        self.successor: Successor | None = None
        #: The dry-run image the successor last checked, and its bytes.
        self.dry_run: tuple[HandoverImage, bytes] | None = None
        #: Who writes the images (``luoctl inspect`` shows it).
        self.writer = f"luod pid {os.getpid()}"

    @property
    def image_path(self) -> Path:
        return Path(self.dir.show(IMAGE_NAME))

    # -- RebootHost ------------------------------------------------------------

    def preflight(self, image: HandoverImage) -> None:
        """The pre-flight, by the successor: started now unless one already waits."""
        image.writer = self.writer
        name = f".preflight.{os.getpid()}.dtb"
        data = encode_image(image)
        try:
            self.dir.write_atomic(name, data)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot write the pre-flight image in {self.dir.path}: {exc.strerror}",
            ) from None
        try:
            successor = self._waiting_successor()
            try:
                successor.check(name)
            except OSError as exc:
                self.stop_successor()
                raise OSError(errno.EIO, f"pre-flight failed: {exc.strerror}") from None
        finally:
            self.dir.unlink(name)
        # What PREPARE checked is kept: a REBOOT that follows with nothing
        # changed hands over these very bytes instead of encoding them again.
        self.dry_run = (image, data)
        # The journal is brought up to date now, out of the reboot's
        # blackout: its flush in begin_reboot then has nothing left to write.
        if self.journal is not None:
            self.journal.flush(self.transport.luo)
        event("preflight-passed", sessions=len(image.sessions), successor=successor.pid)

    def _waiting_successor(self) -> Successor:
        """The successor waiting for this reboot; a new one when none is alive."""
        if self.successor is not None and self.successor.alive():
            return self.successor
        self.stop_successor()
        try:
            self.successor = Successor.start(self.exec_argv, self.env, self.successor_config)
        except OSError as exc:
            raise OSError(errno.EIO, f"pre-flight failed: {exc.strerror}") from None
        return self.successor

    def stop_successor(self) -> None:
        """No successor waits any more (CANCEL, a failed reboot, a stop)."""
        successor, self.successor = self.successor, None
        self.dry_run = None
        if successor is not None:
            successor.stop()

    def state_changed(self, state: LuoState) -> None:
        """A successor only waits while a reboot is prepared or under way."""
        if state not in (LuoState.PREPARED, LuoState.FROZEN):
            self.stop_successor()

    def begin_reboot(self, intent: HandoverImage) -> None:
        self.started_at = time.monotonic()
        event("reboot-started", generation=intent.liveupdate_number, sessions=len(intent.sessions))
        # The intent: what a crash from here on would lose. The journal says
        # it (brought up to date: usually nothing to write) plus a marker
        # saying a reboot began; without a journal, an image of the intent.
        # It is all or nothing: the caller rolls back only what comes after
        # this call, so a failure here (a full disk) must leave no intent
        # behind, or the next clean start would report every session lost.
        try:
            if self.journal is not None and self.journal.enabled:
                self.journal.flush(self.transport.luo)
            else:
                intent.writer = self.writer
                self.dir.write_atomic(IMAGE_NAME, encode_image(intent))
            self.dir.write_atomic(MARKER_NAME, f"{intent.liveupdate_number}\n".encode())
        except BaseException as exc:
            self._forget_intent()
            event("reboot-aborted", logging.WARNING, error=str(exc), step="intent")
            raise

    def freeze_hook(self, file: PreservedFile) -> None:
        self.faults.freeze(file)
        self.faults.point(FaultStep.FREEZE)

    def abort_reboot(self) -> None:
        self._forget_intent()
        event("reboot-aborted", logging.WARNING)

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        image.writer = self.writer
        self.dir.write_atomic(IMAGE_NAME, self._image_bytes(image))
        self.faults.point(FaultStep.AFTER_IMAGE)
        if no_exec:
            self.stop_successor()
            self.transport.defer(self._next_generation_in_process)
            return
        # The hand-over, before the reply: until the successor restored
        # everything, the files are ours alone and a failure rolls back.
        self.faults.point(FaultStep.BEFORE_HANDOFF)
        try:
            successor = self._waiting_successor()
            control = self.transport.control_fd
            fds = [
                self.transport.listener_fd,
                self.lock_fd,
                *([control] if control >= 0 else []),
                *reboot.preserved_fds(self.transport.luo),
            ]
            successor.hand_over(
                fds, sent=lambda: self.faults.point(FaultStep.AFTER_HANDOFF_SENT), control=control
            )
        except OSError as exc:
            # It must never take over once we roll back: gone and reaped first.
            self.stop_successor()
            event("handoff-failed", logging.ERROR, reason=exc.strerror)
            raise OSError(errno.EIO, f"the next generation failed: {exc.strerror}") from None
        self.transport.defer(self._switch_to_successor)

    def _image_bytes(self, image: HandoverImage) -> bytes:
        """The encoded ``image``: the dry-run's bytes when it is the image the
        successor checked (the encoding is deterministic: equal images give
        equal bytes, and comparing records costs a fraction of encoding them),
        with the reboot's times stamped in place."""
        if self.dry_run is not None and self.dry_run[0] == image:
            stamped = stamp_reboot_times(self.dry_run[1], image.reboot_started_ns, image.frozen_ns)
            if stamped is not None:
                return stamped
        return encode_image(image)

    def _forget_intent(self) -> None:
        self.dir.unlink(IMAGE_NAME)
        self.dir.unlink(MARKER_NAME)

    # -- starting the next generation -----------------------------------------------

    def _switch_to_successor(self) -> None:
        """After the REBOOT's reply: let the successor serve, then end this process."""
        systemd.notify("STATUS=live update in progress")
        self.faults.point(FaultStep.BEFORE_EXEC)
        successor, self.successor = self.successor, None
        assert successor is not None
        if not successor.serve():
            # It died (or hangs) between its restore and its takeover: it is
            # made sure gone, and this process starts the next generation
            # itself from the same image and fds.
            successor.stop()
            event("successor-failed", logging.ERROR, fallback="in-process")
            self.transport.close_connections()
            self.restore_in_process()
            return
        elapsed = time.monotonic() - self.started_at
        # The old generation's device and session fds die only now (clients
        # see ENODEV), while the successor already serves: closing 2000
        # connections, each drained first, is no part of the blackout. They
        # are this process's sockets alone, no request is served here any
        # more, and the files they named stay held by the successor.
        self.transport.close_connections()
        event("handed-over", successor=successor.pid, seconds=round(elapsed, 6))
        # The service manager follows the successor (the unit needs
        # NotifyAccess=all for the successor's own notifications).
        systemd.notify(f"MAINPID={successor.pid}")
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Not a clean stop: the journal, the image and the socket are the
        # successor's now. Every fd of ours simply closes.
        os._exit(0)

    def _next_generation_in_process(self) -> None:
        self.transport.close_connections()
        systemd.notify("STATUS=live update in progress")
        self.restore_in_process()

    def exec_next(self, file_fds: Sequence[int]) -> None:
        """Replace this process by the next luod; returns only if exec failed."""
        listener = self.transport.listener_fd
        control = self.transport.control_fd
        inherited = [listener, self.lock_fd, *([control] if control >= 0 else []), *file_fds]
        argv = [
            *self.exec_argv,
            *self.daemon_args,
            "--handover",
            str(self.image_path),
            "--listen-fd",
            str(listener),
            "--lock-fd",
            str(self.lock_fd),
            *(["--control-fd", str(control)] if control >= 0 else []),
        ]
        event("exec", argv=" ".join(argv), fds=len(inherited))
        for handler in logging.getLogger().handlers:
            handler.flush()
        for fd in inherited:
            os.set_inheritable(fd, True)
        try:
            # The same directory and environment as the pre-flight that
            # checked this code (luod runs in "/" since its start).
            os.execve(argv[0], argv, self.env)
        except OSError:
            for fd in inherited:
                os.set_inheritable(fd, False)
            raise

    def retry_restore(self) -> None:
        """SIGHUP while restoring failed: re-execute the installed luod on the same
        image and the same inherited fds (they were never closed)."""
        if self.transport.luo.restore_error is None or not self.dir.exists(IMAGE_NAME):
            event("sighup-ignored", reason="nothing to retry")
            return
        event("restore-retry", image=str(self.image_path))
        self.transport.close_connections()
        # After an exec, the inherited fds were never made close-on-exec; after
        # a failed in-process restore they were: hand on every fd the image names.
        try:
            fds = [f.fd for s in decode_image(self.dir.read(IMAGE_NAME)).sessions for f in s.files]
        except (OSError, HandoverError):
            fds = []
        try:
            self.exec_next(fds)
        except OSError as exc:
            event("exec-failed", logging.ERROR, error=str(exc))

    def restore_in_process(self) -> None:
        """Start the next generation without exec, from the image just committed."""
        old = self.transport.luo
        # Incoming sessions of the ending generation that are not handed on
        # are released, exactly as the exec would (their fds are close-on-exec).
        old.sessions.drop_incoming()
        # Its participants see their fd close, as after an exec: the next
        # generation is theirs to register with.
        old.participants.close()
        # The very path an exec'd luod takes: restore from the image file just
        # committed (on failure: EIO opens, the image and every fd kept).
        new = restore_from_image(
            self.dir, IMAGE_NAME, self.registry, self.limits, self.faults, old.hooks
        )
        self.transport.replace_generation(new)
        new.serving()
        # The state file said "frozen": it says the new generation's state.
        new.hooks.on_state_change(new.state)
        elapsed = time.monotonic() - self.started_at
        event(
            "reboot-complete",
            generation=new.generation,
            incoming=len(new.sessions.incoming),
            seconds=round(elapsed, 6),
            exec=False,
        )
        systemd.notify("READY=1", f"STATUS=serving generation {new.generation}")


def restore_from_image(
    state_dir: StateDir,
    name: str,
    registry: HandlerRegistry,
    limits: Limits,
    faults: FaultInjector,
    hooks: Hooks | None = None,
) -> Orchestrator:
    """The next generation, restored from the image file (after an exec or in-process).

    ``hooks``: the daemon's (an in-process reboot passes the ending generation's).

    On failure the result serves nothing but ``EIO`` opens; every fd the
    image names stays open and the image stays in place, so a fixed version
    can retry (SIGHUP re-executes on the same image and fds).
    """
    generation = 0
    path = state_dir.show(name)
    try:
        image = decode_image(state_dir.read(name))
        generation = image.liveupdate_number + 1
        luo = reboot.restore(
            image, registry, limits, hooks, on_session=lambda _s: faults.point(FaultStep.RESTORE)
        )
    except (OSError, HandoverError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        luo = Orchestrator(registry, limits, generation, hooks, restore_error=f"{path}: {reason}")
        event("restore-failed", logging.ERROR, image=str(path), reason=reason)
        return luo
    settle_restored(state_dir, name, luo)
    return luo


def settle_restored(state_dir: StateDir, name: str, luo: Orchestrator) -> None:
    """A restore from the image ``name`` succeeded: the reboot is over.

    The image stays as ``LAST_IMAGE_NAME`` for inspection, the marker that
    a reboot began goes, and the new generation says what it holds. Every
    path that restores (an exec'd or in-process generation, a successor)
    ends here.
    """
    state_dir.rename(name, LAST_IMAGE_NAME)
    state_dir.unlink(MARKER_NAME)
    event(
        "restored",
        generation=luo.generation,
        sessions=len(luo.sessions.incoming),
        files=luo.sessions.file_count,
    )
