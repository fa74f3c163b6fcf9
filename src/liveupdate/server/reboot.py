"""luod's live update: the re-exec that plays the kexec.

:class:`Rebooter` is the :class:`~liveupdate.core.state.RebootHost` of a
running luod. The core decides and freezes; this module does what touches
the outside world:

* the *pre-flight*: the code that will run next (``luod --check-image``, a
  child process of the installed luod) must read a dry-run image of this
  generation, or PREPARE fails and the state stays NORMAL;
* the *handover image* file (``STATE_DIR/handover.dtb``), written atomically:
  first the intent (what is about to be handed over), then the frozen image.
  It is what a new generation restores from, and what a cold start reports
  as lost when the holder died mid-reboot;
* the *re-exec*: every preserved fd, the listening socket and the lock are
  inherited by ``execve`` of the installed luod, so clients' connection
  attempts wait in the backlog instead of being refused. ``--no-exec`` (or
  a failed exec) builds the next generation in-process from the same image.

Both children (the pre-flight and the re-exec) run only installed code: the
command luod was given (:func:`child_environment` and ``luod.default_exec_argv``
say how), in ``/``, with an environment luod builds instead of its own.
Every file is reached through the checked state directory fd
(:class:`~liveupdate.server.safefs.StateDir`), never through a link.

Test hooks: ``LUOD_FAULT_FILE`` names a file read at each step of a reboot;
each line is ``kill-at STEP``, ``stop-at STEP`` or ``freeze-fail ERRNO
[TOKEN]``. Steps: ``freeze`` (after the first file's freeze), ``after-image``,
``before-exec``, ``after-exec`` (the new process, before it reads the image)
and ``restore`` (after the first session is restored). Editing the file
between reboots "fixes" the fault.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry, PreservedFile
from liveupdate.core.handover import HandoverError, HandoverImage, decode_image, encode_image
from liveupdate.core.luo import Limits, Orchestrator
from liveupdate.server import systemd
from liveupdate.server.journal import (
    INCOMING_JOURNAL_NAME,
    JOURNAL_NAME,
    STALE_JOURNAL_NAME,
    Journal,
)
from liveupdate.server.logs import event
from liveupdate.server.safefs import StateDir

if TYPE_CHECKING:
    from liveupdate.server.transport import DeviceServer

__all__ = ["FAULT_ENV", "Faults", "LostReport", "Rebooter", "child_environment"]

FAULT_ENV = "LUOD_FAULT_FILE"
IMAGE_NAME = "handover.dtb"
#: Present from the start of a reboot until the next generation restored.
MARKER_NAME = "reboot-in-progress"
LAST_IMAGE_NAME = "last-handover.dtb"
#: PATH of luod's children: the system's directories, never the caller's.
CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Variables of luod's own environment its children get unchanged: the service
#: manager's (``sd_notify``, journal) and luod's test hook. Everything else
#: (``LD_PRELOAD``, ``PYTHON*``, ``HOME``, locale...) is the caller's, not ours.
PASSED_ENV = ("NOTIFY_SOCKET", "JOURNAL_STREAM", "INVOCATION_ID", FAULT_ENV)


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


def as_state_dir(state_dir: StateDir | str | os.PathLike[str]) -> StateDir:
    return state_dir if isinstance(state_dir, StateDir) else StateDir(os.fspath(state_dir))


class Faults:
    """Fault injection points for the crash-safety tests (see the module doc)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else os.environ.get(FAULT_ENV)

    def _lines(self) -> list[list[str]]:
        if not self.path:
            return []
        try:
            text = Path(self.path).read_text()
        except OSError:
            return []
        return [line.split() for line in text.splitlines() if line.strip()]

    def point(self, step: str) -> None:
        """Stop or die here if the fault file asks for it."""
        for words in self._lines():
            if len(words) == 2 and words[1] == step:
                if words[0] == "kill-at":
                    event("fault-kill", logging.WARNING, step=step)
                    logging.shutdown()
                    os.kill(os.getpid(), signal.SIGKILL)
                elif words[0] == "stop-at":
                    event("fault-stop", logging.WARNING, step=step)
                    os.kill(os.getpid(), signal.SIGSTOP)

    def freeze(self, file: PreservedFile) -> None:
        """Fail this file's freeze if asked (``freeze-fail ERRNO [TOKEN]``)."""
        for words in self._lines():
            if words and words[0] == "freeze-fail" and len(words) in (2, 3):
                if len(words) == 3 and int(words[2], 0) != file.token:
                    continue
                err = getattr(errno, words[1], None) or int(words[1], 0)
                raise OSError(err, f"injected freeze failure of token {file.token:#x}")


class Rebooter:
    """Carries out reboots for one luod process.

    Args:
        server: The transport serving the current generation.
        registry: Handlers (for the in-process restore).
        limits: The limits the next generation keeps.
        state_dir: Where the handover image lives (checked once, see ``safefs``).
        exec_argv: The command of the next luod (the installed one).
        daemon_args: luod's options, passed on to the next generation.
        lock_fd: The state directory's lock, inherited so no other luod can
            start between the two generations.
        env: The children's environment (:func:`child_environment` by default).
    """

    def __init__(
        self,
        server: DeviceServer,
        registry: HandlerRegistry,
        limits: Limits,
        state_dir: StateDir | str,
        exec_argv: Sequence[str],
        daemon_args: Sequence[str],
        lock_fd: int,
        faults: Faults | None = None,
        journal: Journal | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.server = server
        self.registry = registry
        self.limits = limits
        self.dir = as_state_dir(state_dir)
        self.env = dict(env) if env is not None else child_environment()
        self.exec_argv = list(exec_argv)
        self.daemon_args = list(daemon_args)
        self.lock_fd = lock_fd
        self.faults = faults or Faults()
        self.journal = journal
        self.started_at = 0.0
        #: Who writes the images (``luoctl inspect`` shows it).
        self.writer = f"luod pid {os.getpid()}"

    @property
    def image_path(self) -> Path:
        return Path(self.dir.show(IMAGE_NAME))

    # -- RebootHost ------------------------------------------------------------

    def preflight(self, image: HandoverImage) -> None:
        image.writer = self.writer
        name = f".preflight.{os.getpid()}.dtb"
        argv = [*self.exec_argv, "--check-image", self.dir.show(name)]
        try:
            self.dir.write_atomic(name, encode_image(image))
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot write the pre-flight image in {self.dir.path}: {exc.strerror}"
            ) from None
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd="/",
                env=self.env,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(errno.EIO, f"pre-flight could not run {argv[0]}: {exc}") from None
        finally:
            self.dir.unlink(name)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            reason = f"pre-flight failed: {lines[-1]}"
            event("preflight-failed", logging.WARNING, reason=reason, rc=proc.returncode)
            raise OSError(errno.EIO, reason)
        event("preflight-passed", sessions=len(image.sessions))

    @property
    def marker_path(self) -> Path:
        return Path(self.dir.show(MARKER_NAME))

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
                self.journal.flush(self.server.luo)
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
        self.faults.point("freeze")

    def _forget_intent(self) -> None:
        self.dir.unlink(IMAGE_NAME)
        self.dir.unlink(MARKER_NAME)

    def abort_reboot(self) -> None:
        self._forget_intent()
        event("reboot-aborted", logging.WARNING)

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        image.writer = self.writer
        self.dir.write_atomic(IMAGE_NAME, encode_image(image))
        self.faults.point("after-image")
        self.server.deferred.append(lambda: self._next_generation(no_exec))

    # -- starting the next generation -----------------------------------------------

    def _next_generation(self, no_exec: bool) -> None:
        # The old generation's device and session fds die here: clients see
        # ENODEV. The files stay held by the orchestrator.
        self.server.close_connections()
        systemd.notify("STATUS=live update in progress")
        if not no_exec:
            self.faults.point("before-exec")
            try:
                self.exec_next(reboot.preserved_fds(self.server.luo))
            except OSError as exc:
                event("exec-failed", logging.ERROR, error=str(exc), fallback="in-process")
        self.restore_in_process()

    def exec_next(self, file_fds: Sequence[int]) -> None:
        """Replace this process by the next luod; returns only if exec failed."""
        listener = self.server.listener.fileno()
        inherited = [listener, self.lock_fd, *file_fds]
        argv = [
            *self.exec_argv,
            *self.daemon_args,
            "--handover",
            str(self.image_path),
            "--listen-fd",
            str(listener),
            "--lock-fd",
            str(self.lock_fd),
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
        if self.server.luo.restore_error is None or not self.dir.exists(IMAGE_NAME):
            event("sighup-ignored", reason="nothing to retry")
            return
        event("restore-retry", image=str(self.image_path))
        self.server.close_connections()
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
        old = self.server.luo
        # Incoming sessions of the ending generation that are not handed on
        # are released, exactly as the exec would (their fds are close-on-exec).
        kept = {id(s) for s in reboot.handed_over_sessions(old)}
        for session in old.incoming.values():
            if id(session) not in kept:
                for file in session.files.values():
                    file.release()
        old.incoming.clear()
        # The very path an exec'd luod takes: restore from the image file just
        # committed (on failure: EIO opens, the image and every fd kept).
        new = restore_from_image(self.dir, IMAGE_NAME, self.registry, self.limits, self.faults)
        new.on_state_change = old.on_state_change
        new.journal_error = old.journal_error
        self.server.luo = new
        if new.on_state_change is not None:
            new.on_state_change(new.state)
        elapsed = time.monotonic() - self.started_at
        event(
            "reboot-complete",
            generation=new.generation,
            incoming=len(new.incoming),
            seconds=round(elapsed, 6),
            exec=False,
        )
        systemd.notify("READY=1", f"STATUS=serving generation {new.generation}")


def restore_from_image(
    state_dir: StateDir,
    name: str,
    registry: HandlerRegistry,
    limits: Limits,
    faults: Faults,
) -> Orchestrator:
    """The next generation, restored from the image file (after an exec or in-process).

    On failure the result serves nothing but ``EIO`` opens; every fd the
    image names stays open and the image stays in place, so a fixed version
    can retry (SIGHUP re-executes on the same image and fds).
    """
    generation = 0
    path = state_dir.show(name)
    try:
        image = decode_image(state_dir.read(name))
        generation = image.liveupdate_number + 1
        luo = reboot.restore(image, registry, limits, hook=lambda _s: faults.point("restore"))
    except (OSError, HandoverError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        luo = Orchestrator(registry, limits, generation=generation)
        luo.restore_error = f"{path}: {reason}"
        event("restore-failed", logging.ERROR, image=str(path), reason=reason)
        return luo
    state_dir.rename(name, LAST_IMAGE_NAME)
    state_dir.unlink(MARKER_NAME)
    event(
        "restored",
        generation=luo.generation,
        sessions=len(luo.incoming),
        files=luo.file_count,
    )
    return luo


@dataclass(frozen=True)
class LostReport:
    """What a cold start found the previous luod had held when it died."""

    #: Sessions described as lost by the records left behind.
    sessions: int = 0
    #: The journal was out of date (it could not be written): more may have been lost.
    incomplete: bool = False


def report_lost(state_dir: StateDir | str | os.PathLike[str]) -> int:
    """At a cold start: how many sessions did the previous luod lose? (see :func:`find_lost`)"""
    return find_lost(as_state_dir(state_dir)).sessions


def find_lost(state_dir: StateDir) -> LostReport:
    """At a cold start: what did the previous luod hold when it died?

    A leftover handover image means it died during a live update after the
    freeze; leftover journals, that it died outside one (or before the
    freeze: the marker tells). Logs every session described as lost, keeps
    each record renamed for inspection. A ``journal-stale`` marker means the
    journal could not be written for a while before the death: the count is
    then a lower bound, and the report says so.
    """
    journals = [JOURNAL_NAME, INCOMING_JOURNAL_NAME]
    why = "the previous luod died during a live update"
    if state_dir.exists(IMAGE_NAME):
        records = [IMAGE_NAME]  # the image supersedes the journals
        for name in journals:
            state_dir.unlink(name)
    else:
        records = [name for name in journals if state_dir.exists(name)]
        if not state_dir.exists(MARKER_NAME):
            why = "the previous luod died (outside a live update)"
    state_dir.unlink(MARKER_NAME)
    incomplete = state_dir.exists(STALE_JOURNAL_NAME)
    if incomplete:
        why += "; its journal could not be written, so sessions it held may be missing here"
    lost = sum(_report_record(state_dir, name, why) for name in records)
    if incomplete:
        event(
            "lost-report-incomplete",
            logging.ERROR,
            sessions_at_least=lost,
            reason="the previous luod's journal could not be written (see journal-failed) "
            "before it died: sessions created or changed since its last write are lost "
            "without a record",
        )
        state_dir.unlink(STALE_JOURNAL_NAME)
    return LostReport(lost, incomplete)


def _report_record(state_dir: StateDir, name: str, why: str) -> int:
    # Unique even for two reports in one second: never overwrite a report.
    stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
    kept = f"lost-{stamp}-{name}"
    state_dir.link(name, kept)
    state_dir.unlink(name)
    try:
        image = decode_image(state_dir.read(kept))
    except (OSError, HandoverError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        event("lost-unknown", logging.ERROR, image=state_dir.show(kept), reason=reason)
        return 0
    for session in image.sessions:
        event(
            "session-lost",
            logging.ERROR,
            session=session.name.decode(errors="backslashreplace"),
            files=len(session.files),
            tokens=",".join(f"{f.token:#x}" for f in session.files),
            generation=image.liveupdate_number,
            why=why,
        )
    event(
        "lost-report",
        logging.ERROR,
        sessions=len(image.sessions),
        image=state_dir.show(kept),
        hint=f"luoctl inspect {state_dir.show(kept)}",
    )
    return len(image.sessions)


def check_image(path: str, registry: HandlerRegistry) -> int:
    """``luod --check-image``: can this version restore ``path``? (exit status)"""
    try:
        # The same full read as the restore (libfdt's fdt_check_full, then
        # every schema rule), run before the reboot instead of after it.
        # Its directory was checked by the luod that wrote it; the file itself
        # is never read through a link.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        image = decode_image(data)
    except (OSError, HandoverError) as exc:
        print(f"cannot read handover image {path}: {exc}", file=sys.stderr)
        return 1
    unknown = sorted(
        {
            f.compatible
            for s in image.sessions
            for f in s.files
            if registry.by_compatible(f.compatible) is None
        }
    )
    if unknown:
        print(
            f"handler(s) {', '.join(unknown)} unknown to this luod "
            f"(known: {', '.join(registry.compatibles)})",
            file=sys.stderr,
        )
        return 1
    files = sum(len(s.files) for s in image.sessions)
    print(f"ok: image v{image.version}, {len(image.sessions)} sessions, {files} files")
    return 0
