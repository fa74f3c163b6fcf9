"""The cold-start loss report: what did the previous luod hold when it died?

luod's preserved files live in its fd table, so a luod that dies (SIGKILL,
the OOM killer, a crash in the middle of a reboot) takes them along. They
cannot be brought back; the promise is that their loss is never silent. The
dead luod left records of what it held in the state directory (see
:mod:`liveupdate.server.journal`), and the next cold start reads them here:

* a handover image (``handover.dtb``): it died during a live update, after
  the freeze began; the image supersedes the journals;
* otherwise the journals: it died outside a live update, or during one but
  before the freeze (the ``reboot-in-progress`` marker tells which);
* a ``journal-stale`` marker: its journal could not be written for a while,
  so the report is a lower bound, and it says so.

Every session a record describes is logged as lost (``session-lost``, with
its tokens), the count reaches clients through ``GET_STATE.lost_sessions``,
and each record is kept, renamed ``lost-STAMP-NAME``, for ``luoctl inspect``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from liveupdate.events import event
from liveupdate.handover_abi import HandoverError
from liveupdate.handover_codec import decode_image
from liveupdate.server.journal import (
    IMAGE_NAME,
    INCOMING_JOURNAL_NAME,
    JOURNAL_NAME,
    MARKER_NAME,
    STALE_JOURNAL_NAME,
)
from liveupdate.server.safefs import StateDir

__all__ = ["LostReport", "find_lost", "forget_records", "report_lost"]


@dataclass(frozen=True)
class LostReport:
    """What a cold start found the previous luod had held when it died."""

    #: Sessions described as lost by the records left behind.
    sessions: int = 0
    #: The journal was out of date (it could not be written): more may have been lost.
    incomplete: bool = False


def report_lost(state_dir: StateDir | str | os.PathLike[str]) -> int:
    """How many sessions did the previous luod lose? (see :func:`find_lost`)"""
    if not isinstance(state_dir, StateDir):
        state_dir = StateDir(os.fspath(state_dir))
    return find_lost(state_dir).sessions


def find_lost(state_dir: StateDir) -> LostReport:
    """Report (log) every session the records left in ``state_dir`` describe, once."""
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


def forget_records(state_dir: StateDir) -> None:
    """The records of a luod whose sessions were recovered from its copies
    (:mod:`liveupdate.server.fdstore`): nothing they describe was lost."""
    for name in (
        IMAGE_NAME,
        JOURNAL_NAME,
        INCOMING_JOURNAL_NAME,
        MARKER_NAME,
        STALE_JOURNAL_NAME,
    ):
        state_dir.unlink(name)


def _report_record(state_dir: StateDir, name: str, why: str) -> int:
    """Keep the record ``name`` as ``lost-*`` and log its sessions; how many."""
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
