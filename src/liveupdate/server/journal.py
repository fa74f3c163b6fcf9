"""The journal: what luod holds, on disk, so that its death is never silent.

luod's preserved files live in its own fd table: if the process is killed
outside a live update (SIGKILL, OOM killer, a crash of the interpreter),
they are gone. Nothing can bring them back, but the next start must *say*
what was lost. The journal is a handover image of every session luod holds
(outgoing and unfinished incoming), rewritten atomically at most once per
``--journal-interval`` seconds while sessions change, and removed on a clean
stop (SIGTERM releases sessions on purpose). A cold start that finds it
reports every session in it as lost, like a crash in the middle of a reboot.

The interval bounds the cost (an image of 2000 sessions takes ~0.15 s to
encode) at the price of freshness: a session created less than one interval
before a crash may be missing from the report.

A journal that cannot be written (a full disk) is not only logged: its errno
is reported by ``GET_STATE`` (``journal_error``) until a write succeeds
again, and an empty marker file (``journal-stale``, which needs no data
blocks) says so on disk, so that a start after a crash reports its loss
report as incomplete instead of silently under-counting.
"""

from __future__ import annotations

import errno
import logging
import time

from liveupdate.core.luo import Orchestrator
from liveupdate.core.session import session_record
from liveupdate.events import event
from liveupdate.handover_abi import HandoverImage, SessionRecord
from liveupdate.handover_codec import encode_image
from liveupdate.server.safefs import StateDir

__all__ = [
    "IMAGE_NAME",
    "INCOMING_JOURNAL_NAME",
    "JOURNAL_NAME",
    "LAST_IMAGE_NAME",
    "MARKER_NAME",
    "STALE_JOURNAL_NAME",
    "Journal",
]

# The records of the state directory that say what luod holds. The journals
# are this module's; the handover image and the marker are written by the
# re-exec driver (``reexec``); a cold start reads them all (``lossreport``).

#: The handover image: the intent, then the frozen image, of a reboot.
IMAGE_NAME = "handover.dtb"
#: Present from the start of a reboot until the next generation restored.
MARKER_NAME = "reboot-in-progress"
#: The image the current generation was restored from (kept for inspection).
LAST_IMAGE_NAME = "last-handover.dtb"
JOURNAL_NAME = "journal.dtb"
#: Incoming sessions go into their own image: an outgoing and an incoming
#: session may share a name, and one image holds each name once.
INCOMING_JOURNAL_NAME = "journal-incoming.dtb"
#: Present while the journals on disk may be older than what luod holds.
STALE_JOURNAL_NAME = "journal-stale"


class Journal:
    """Keeps ``STATE_DIR/journal.dtb`` (outgoing sessions) and
    ``journal-incoming.dtb`` (unfinished incoming ones) in step with the
    orchestrator."""

    def __init__(self, state_dir: StateDir | str, interval: float, writer: str = "") -> None:
        self.dir = state_dir if isinstance(state_dir, StateDir) else StateDir(state_dir)
        self.interval = interval
        self.writer = writer
        self._seen: tuple[int, int] | None = None
        # The first write waits one interval: right after a start or a live
        # update the handover image (or nothing) already describes the state,
        # and the first clients should not wait for an encode.
        self._last_write = time.monotonic()
        #: errno of the last failed write, 0 once a write succeeds (GET_STATE's journal_error).
        self.error = 0

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def tick(self, luo: Orchestrator) -> float | None:
        """Write the journal if it is due; return seconds until the next check."""
        if not self.enabled or (id(luo), luo.sessions.mutations) == self._seen:
            return None
        wait = self._last_write + self.interval - time.monotonic()
        if wait > 0:
            return wait
        self.flush(luo)
        return None

    def flush(self, luo: Orchestrator) -> None:
        """Bring the journal up to date now (nothing to do when it already is)."""
        mark = (id(luo), luo.sessions.mutations)
        if not self.enabled or mark == self._seen:
            return
        self._last_write = time.monotonic()
        incoming = [s for s in luo.sessions.incoming.values() if not s.finished]
        error = 0
        for name, sessions in (
            (JOURNAL_NAME, list(luo.sessions.outgoing.values())),
            (INCOMING_JOURNAL_NAME, incoming),
        ):
            records = [session_record(s) for s in sessions]
            error = self._write(name, luo.generation, records) or error
        self._set_error(error)  # GET_STATE reads it through the orchestrator's hook
        # A failed write is retried at the next tick (one interval later).
        self._seen = None if error else mark

    def _write(self, name: str, generation: int, records: list[SessionRecord]) -> int:
        """Write one journal; the errno on failure, else 0."""
        try:
            if records:
                image = HandoverImage(generation, records, writer=self.writer)
                self.dir.write_atomic(name, encode_image(image))
            else:
                self.dir.unlink(name)
        except (OSError, ValueError) as exc:
            event(
                "journal-failed",
                logging.ERROR,
                path=self.dir.show(name),
                error=str(exc),
                consequence="if luod dies now, what it holds is lost without a full report",
            )
            return (exc.errno if isinstance(exc, OSError) else None) or errno.EIO
        return 0

    def _set_error(self, error: int) -> None:
        if error == self.error:
            return
        self.error = error
        try:
            if error:
                self.dir.create_empty(STALE_JOURNAL_NAME)
            else:
                self.dir.unlink(STALE_JOURNAL_NAME)
                event("journal-recovered")
        except OSError as exc:
            event(
                "journal-failed",
                logging.ERROR,
                path=self.dir.show(STALE_JOURNAL_NAME),
                error=str(exc),
            )

    def remove(self) -> None:
        """A clean stop: the sessions were released on purpose."""
        for name in (JOURNAL_NAME, INCOMING_JOURNAL_NAME, STALE_JOURNAL_NAME):
            self.dir.unlink(name)
