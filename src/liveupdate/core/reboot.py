"""The live update of the orchestrator: freeze, serialize, restore.

The analog of LUO's reboot notifier plus KHO: before the kexec, Linux freezes
every outgoing session and serializes it into the KHO tree; the next kernel
restores the sessions as incoming. Here:

1. :func:`freeze` freezes every outgoing session in creation order and every
   file in preservation order, rolling everything back (reverse order) when
   one freeze fails, and returns the :class:`HandoverImage`;
2. the transport writes the image and re-executes (``luod``) with every
   preserved fd inherited, or stays in-process (``--no-exec``);
3. :func:`restore` builds the next :class:`Orchestrator` from the image and
   the inherited fds. A failure leaves nothing half-restored: the caller
   keeps the old fds and the image, and every open answers ``EIO``.

Incoming sessions of the ending generation that were never finished are not
in the image: their files are released by the reboot (their fds are
close-on-exec).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from liveupdate import uapi
from liveupdate.core.file import HandlerRegistry, PreservedFile
from liveupdate.core.luo import Limits, Orchestrator
from liveupdate.core.session import Owner, Session
from liveupdate.handover_abi import (
    IMAGE_FLAG_AWAITING_SUCCESSOR,
    FileRecord,
    HandoverImage,
    SessionRecord,
)

__all__ = [
    "FreezeHook",
    "freeze",
    "preserved_fds",
    "restore",
    "session_record",
    "snapshot",
    "unfreeze",
]

#: Called after each file's freeze (fault injection in tests, progress).
FreezeHook = Callable[[PreservedFile], None]


def session_record(session: Session) -> SessionRecord:
    """The image record of one session (its files' data as last frozen)."""
    waiting = session.handed_over and not session.retrieved
    return SessionRecord(
        name=session.name,
        uid=session.owner.uid,
        gid=session.owner.gid,
        pid=session.owner.pid,
        created=session.created,
        flags=session.flags | (IMAGE_FLAG_AWAITING_SUCCESSOR if waiting else 0),
        files=[
            FileRecord(f.token, f.handler.compatible, f.fd, f.data) for f in session.files.values()
        ],
    )


def snapshot(luo: Orchestrator, writer: str = "") -> HandoverImage:
    """The image of the outgoing sessions as they are, without freezing.

    Written before the freeze starts so that a holder killed mid-reboot
    leaves a record of what it held (the next cold start reports it lost).
    """
    return HandoverImage(
        liveupdate_number=luo.generation,
        sessions=[session_record(s) for s in handed_over_sessions(luo)],
        writer=writer,
    )


def handed_over_sessions(luo: Orchestrator) -> list[Session]:
    """What the next generation receives: every outgoing session, then the
    incoming sessions that a per-session update or keep-on-close handed over
    and that nobody retrieved yet (they still wait for their successor).
    Other unfinished incoming sessions are released, as in Linux."""
    waiting = [s for s in luo.incoming.values() if s.handed_over and not s.retrieved]
    return [*luo.outgoing.values(), *waiting]


def freeze(luo: Orchestrator, writer: str = "", hook: FreezeHook | None = None) -> HandoverImage:
    """Freeze every outgoing session and return the handover image.

    Sessions are frozen in creation order, files in preservation order; each
    handler's data is kept in ``PreservedFile.data``. On failure every file
    frozen so far is unfrozen, last first, and the handler's
    :class:`OSError` propagates: nothing changed.
    """
    freeze_files([f for s in luo.outgoing.values() for f in s.files.values()], hook)
    return snapshot(luo, writer)


def freeze_files(files: list[PreservedFile], hook: FreezeHook | None = None) -> None:
    """Freeze ``files`` in order; on failure unfreeze those done, last first, and re-raise."""
    frozen: list[PreservedFile] = []
    try:
        for file in files:
            file.data = file.handler.freeze(file)
            frozen.append(file)
            if hook is not None:
                hook(file)
    except BaseException:
        unfreeze(frozen)
        raise


def unfreeze(files: list[PreservedFile]) -> None:
    """Undo freezes in reverse order (a failing unfreeze does not stop the others)."""
    for file in reversed(files):
        try:
            file.handler.unfreeze(file)
        except OSError:
            pass


def thaw(luo: Orchestrator) -> None:
    """Unfreeze every outgoing file (a reboot that could not proceed)."""
    unfreeze([f for s in luo.outgoing.values() for f in s.files.values()])


def preserved_fds(luo: Orchestrator) -> list[int]:
    """Every fd the next generation must inherit, in image order."""
    return [f.fd for s in handed_over_sessions(luo) for f in s.files.values()]


def restore(
    image: HandoverImage,
    registry: HandlerRegistry,
    limits: Limits | None = None,
    hook: Callable[[Session], None] | None = None,
) -> Orchestrator:
    """Build the next generation from ``image`` and the inherited fds it names.

    Every file's handler is looked up by compatible string and asked to
    check its data against the inherited fd. Raises :class:`OSError`
    (``EIO``) with the reason when anything does not fit; nothing is closed
    in that case, so a fixed version can try again with the same fds.
    """
    luo = Orchestrator(registry, limits, generation=image.liveupdate_number + 1)
    for record in image.sessions:
        session = Session(
            record.name,
            uapi.SessionDirection.INCOMING,
            Owner(record.pid, record.uid, record.gid),
            created=record.created,
            flags=record.flags & ~IMAGE_FLAG_AWAITING_SUCCESSOR,
            handed_over=bool(record.flags & IMAGE_FLAG_AWAITING_SUCCESSOR),
        )
        for rec in record.files:
            handler = registry.by_compatible(rec.compatible)
            if handler is None:
                known = ", ".join(registry.compatibles)
                raise OSError(
                    errno.EIO,
                    f"session {session.display_name!r} token {rec.token:#x}: no handler "
                    f"{rec.compatible!r} in this version (known: {known})",
                )
            try:
                st = os.fstat(rec.fd)
            except OSError:
                raise OSError(
                    errno.EIO,
                    f"session {session.display_name!r} token {rec.token:#x}: "
                    f"inherited fd {rec.fd} is not open",
                ) from None
            file = PreservedFile(
                rec.token,
                handler,
                rec.fd,
                handler.file_key(rec.fd, st),
                rec.data,
                session=session,
                charge=handler.charged_bytes(rec.fd, st),
            )
            try:
                handler.restore(file)
            except OSError as exc:
                raise OSError(
                    errno.EIO,
                    f"session {session.display_name!r} token {rec.token:#x}: "
                    f"{rec.compatible} cannot restore: {exc.strerror}",
                ) from None
            session.files[rec.token] = file
        luo.incoming[session.name] = session
        if hook is not None:
            hook(session)
    # Only now that everything fits do the inherited fds become ours alone.
    for session in luo.incoming.values():
        for file in session.files.values():
            os.set_inheritable(file.fd, False)
    if luo.incoming:
        luo.state = uapi.LuodState.UPDATED
    return luo
