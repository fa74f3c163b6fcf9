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
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from liveupdate.core.handover import HandoverImage, SessionRecord, encode_image
from liveupdate.core.luo import Orchestrator
from liveupdate.core.reboot import session_record
from liveupdate.server.files import write_atomic
from liveupdate.server.logs import event

__all__ = ["JOURNAL_NAME", "Journal"]

JOURNAL_NAME = "journal.dtb"
#: Incoming sessions go into their own image: an outgoing and an incoming
#: session may share a name, and one image holds each name once.
INCOMING_JOURNAL_NAME = "journal-incoming.dtb"


class Journal:
    """Keeps ``STATE_DIR/journal.dtb`` (outgoing sessions) and
    ``journal-incoming.dtb`` (unfinished incoming ones) in step with the
    orchestrator."""

    def __init__(self, state_dir: str, interval: float, writer: str = "") -> None:
        self.path = Path(state_dir) / JOURNAL_NAME
        self.incoming_path = Path(state_dir) / INCOMING_JOURNAL_NAME
        self.interval = interval
        self.writer = writer
        self._seen: tuple[int, int] | None = None
        # The first write waits one interval: right after a start or a live
        # update the handover image (or nothing) already describes the state,
        # and the first clients should not wait for an encode.
        self._last_write = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def tick(self, luo: Orchestrator) -> float | None:
        """Write the journal if it is due; return seconds until the next check."""
        if not self.enabled or (id(luo), luo.mutations) == self._seen:
            return None
        wait = self._last_write + self.interval - time.monotonic()
        if wait > 0:
            return wait
        self.flush(luo)
        return None

    def flush(self, luo: Orchestrator) -> None:
        """Bring the journal up to date now (nothing to do when it already is)."""
        mark = (id(luo), luo.mutations)
        if not self.enabled or mark == self._seen:
            return
        self._seen = mark
        self._last_write = time.monotonic()
        incoming = [s for s in luo.incoming.values() if not s.finished]
        for path, sessions in (
            (self.path, list(luo.outgoing.values())),
            (self.incoming_path, incoming),
        ):
            self._write(path, luo.generation, [session_record(s) for s in sessions])

    def _write(self, path: Path, generation: int, records: list[SessionRecord]) -> None:
        try:
            if records:
                image = HandoverImage(generation, records, writer=self.writer)
                write_atomic(path, encode_image(image))
            else:
                path.unlink(missing_ok=True)
        except (OSError, ValueError) as exc:
            event("journal-failed", logging.WARNING, path=str(path), error=str(exc))

    def remove(self) -> None:
        """A clean stop: the sessions were released on purpose."""
        self.path.unlink(missing_ok=True)
        self.incoming_path.unlink(missing_ok=True)
