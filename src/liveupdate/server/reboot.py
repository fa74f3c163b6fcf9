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
  inherited by ``execv`` of the installed luod, so clients' connection
  attempts wait in the backlog instead of being refused. ``--no-exec`` (or
  a failed exec) builds the next generation in-process from the same image.

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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry, PreservedFile
from liveupdate.core.handover import HandoverError, HandoverImage, decode_image, encode_image
from liveupdate.core.luo import Limits, Orchestrator
from liveupdate.server import systemd
from liveupdate.server.files import write_atomic
from liveupdate.server.journal import INCOMING_JOURNAL_NAME, JOURNAL_NAME, Journal
from liveupdate.server.logs import event

if TYPE_CHECKING:
    from liveupdate.server.transport import DeviceServer

__all__ = ["FAULT_ENV", "Faults", "Rebooter"]

FAULT_ENV = "LUOD_FAULT_FILE"
IMAGE_NAME = "handover.dtb"
#: Present from the start of a reboot until the next generation restored.
MARKER_NAME = "reboot-in-progress"
LAST_IMAGE_NAME = "last-handover.dtb"


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
        state_dir: Where the handover image lives.
        exec_argv: The command of the next luod (the installed one).
        daemon_args: luod's options, passed on to the next generation.
        lock_fd: The state directory's lock, inherited so no other luod can
            start between the two generations.
    """

    def __init__(
        self,
        server: DeviceServer,
        registry: HandlerRegistry,
        limits: Limits,
        state_dir: str,
        exec_argv: Sequence[str],
        daemon_args: Sequence[str],
        lock_fd: int,
        faults: Faults | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.server = server
        self.registry = registry
        self.limits = limits
        self.state_dir = Path(state_dir)
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
        return self.state_dir / IMAGE_NAME

    # -- RebootHost ------------------------------------------------------------

    def preflight(self, image: HandoverImage) -> None:
        image.writer = self.writer
        path = self.state_dir / f".preflight.{os.getpid()}.dtb"
        write_atomic(path, encode_image(image))
        argv = [*self.exec_argv, "--check-image", str(path)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise OSError(errno.EIO, f"pre-flight could not run {argv[0]}: {exc}") from None
        finally:
            path.unlink(missing_ok=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            reason = f"pre-flight failed: {lines[-1]}"
            event("preflight-failed", logging.WARNING, reason=reason, rc=proc.returncode)
            raise OSError(errno.EIO, reason)
        event("preflight-passed", sessions=len(image.sessions))

    @property
    def marker_path(self) -> Path:
        return self.state_dir / MARKER_NAME

    def begin_reboot(self, intent: HandoverImage) -> None:
        self.started_at = time.monotonic()
        event("reboot-started", generation=intent.liveupdate_number, sessions=len(intent.sessions))
        # The intent: what a crash from here on would lose. The journal says
        # it (brought up to date: usually nothing to write) plus a marker
        # saying a reboot began; without a journal, an image of the intent.
        if self.journal is not None and self.journal.enabled:
            self.journal.flush(self.server.luo)
        else:
            intent.writer = self.writer
            write_atomic(self.image_path, encode_image(intent))
        write_atomic(self.marker_path, f"{intent.liveupdate_number}\n".encode())

    def freeze_hook(self, file: PreservedFile) -> None:
        self.faults.freeze(file)
        self.faults.point("freeze")

    def abort_reboot(self) -> None:
        self.image_path.unlink(missing_ok=True)
        self.marker_path.unlink(missing_ok=True)
        event("reboot-aborted", logging.WARNING)

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        image.writer = self.writer
        write_atomic(self.image_path, encode_image(image))
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
            os.execv(argv[0], argv)
        except OSError:
            for fd in inherited:
                os.set_inheritable(fd, False)
            raise

    def retry_restore(self) -> None:
        """SIGHUP while restoring failed: re-execute the installed luod on the same
        image and the same inherited fds (they were never closed)."""
        if self.server.luo.restore_error is None or not self.image_path.exists():
            event("sighup-ignored", reason="nothing to retry")
            return
        event("restore-retry", image=str(self.image_path))
        self.server.close_connections()
        # After an exec, the inherited fds were never made close-on-exec; after
        # a failed in-process restore they were: hand on every fd the image names.
        try:
            fds = [
                f.fd for s in decode_image(self.image_path.read_bytes()).sessions for f in s.files
            ]
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
        new = restore_from_image(self.image_path, self.registry, self.limits, self.faults)
        new.on_state_change = old.on_state_change
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
    path: Path, registry: HandlerRegistry, limits: Limits, faults: Faults
) -> Orchestrator:
    """The next generation, restored from the image file (after an exec or in-process).

    On failure the result serves nothing but ``EIO`` opens; every fd the
    image names stays open and the image stays in place, so a fixed version
    can retry (SIGHUP re-executes on the same image and fds).
    """
    generation = 0
    try:
        image = decode_image(path.read_bytes())
        generation = image.liveupdate_number + 1
        luo = reboot.restore(image, registry, limits, hook=lambda _s: faults.point("restore"))
    except (OSError, HandoverError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        luo = Orchestrator(registry, limits, generation=generation)
        luo.restore_error = f"{path}: {reason}"
        event("restore-failed", logging.ERROR, image=str(path), reason=reason)
        return luo
    path.replace(path.with_name(LAST_IMAGE_NAME))
    (path.parent / MARKER_NAME).unlink(missing_ok=True)
    event(
        "restored",
        generation=luo.generation,
        sessions=len(luo.incoming),
        files=luo.file_count,
    )
    return luo


def report_lost(state_dir: Path) -> int:
    """At a cold start: what did the previous luod hold when it died?

    A leftover handover image means it died during a live update after the
    freeze; leftover journals, that it died outside one (or before the
    freeze: the marker tells). Logs every session described as lost, keeps
    each record renamed for inspection, and returns how many there were.
    """
    image_path = state_dir / IMAGE_NAME
    journals = [state_dir / JOURNAL_NAME, state_dir / INCOMING_JOURNAL_NAME]
    marker = state_dir / MARKER_NAME
    why = "the previous luod died during a live update"
    if image_path.exists():
        records = [image_path]  # the image supersedes the journals
        for path in journals:
            path.unlink(missing_ok=True)
    else:
        records = [path for path in journals if path.exists()]
        if not marker.exists():
            why = "the previous luod died (outside a live update)"
    marker.unlink(missing_ok=True)
    return sum(_report_record(path, why) for path in records)


def _report_record(path: Path, why: str) -> int:
    # Unique even for two reports in one second: never overwrite a report.
    stamp = time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}.{os.getpid()}"
    kept = path.with_name(f"lost-{stamp}-{path.name}")
    os.link(path, kept)
    path.unlink()
    try:
        image = decode_image(kept.read_bytes())
    except HandoverError as exc:
        event("lost-unknown", logging.ERROR, image=str(kept), reason=exc.reason)
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
        image=str(kept),
        hint=f"luoctl inspect {kept}",
    )
    return len(image.sessions)


def check_image(path: str, registry: HandlerRegistry) -> int:
    """``luod --check-image``: can this version restore ``path``? (exit status)"""
    try:
        # The pre-flight also parses with the `fdt` library and requires both
        # parsers to agree: a slower, stricter read that runs outside the reboot.
        image = decode_image(Path(path).read_bytes(), cross_check=True)
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
