"""Copies of what luod holds, kept outside luod so that its death loses nothing.

luod's preserved files live in its own fd table: a SIGKILL outside a live
update used to close them all. Now every preserved fd has a second
reference held by another process, together with the serialized state
that says which session and token each one belongs to:

* under systemd with the fd store enabled, systemd itself holds them
  (:class:`FdStoreCopies`: ``sd_notify`` ``FDSTORE=1``/``FDSTOREREMOVE=1``,
  given back as ``LISTEN_FDS``/``LISTEN_FDNAMES`` when luod is restarted);
* otherwise luod's own keeper process (:mod:`liveupdate.server.keeper`).

Both are driven the same way (:class:`Copies`): at each idle turn of the
event loop, if the sessions changed, the new fds are sent, then the state
(a *snapshot*: the journal's two images plus the key of each file, in a
sealed memfd), then the keys no longer held are removed. The keeper also
takes *deltas* between snapshots (:meth:`Copies._sync_delta`): the changed
sessions' records only, applied in order after the snapshot at recovery. A file is named
by its identity (:data:`~liveupdate.core.file.FileKey`), the same in every
generation, so a live update sends nothing new.

A cold start that gets copies back rebuilds every session from them
(:func:`recover`) as *incoming* sessions: the holders retrieve them again
by name, as after a live update.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

from liveupdate.core import reboot
from liveupdate.core.file import HandlerRegistry, PreservedFile
from liveupdate.core.luo import Hooks, Orchestrator, sealed_memfd
from liveupdate.core.policy import Limits
from liveupdate.core.session import Session, session_record
from liveupdate.events import event
from liveupdate.handover_abi import (
    IMAGE_FLAG_AWAITING_SUCCESSOR,
    FileRecord,
    HandoverError,
    HandoverImage,
    SessionRecord,
)
from liveupdate.handover_codec import decode_image, encode_image
from liveupdate.server import systemd
from liveupdate.uapi import LuodCopies

__all__ = [
    "STATE_NAME",
    "Copies",
    "FdStoreCopies",
    "Recovered",
    "Snapshot",
    "delta_line",
    "read_memfd",
    "recover",
    "snapshot",
]

#: The first line of a snapshot (its format version).
MAGIC = b"luod-copies 1\n"
#: The fd store's name of the snapshot (two alternate, so one is always whole).
STATE_NAME = "luod-state"
#: The fd store's names of the files start with this.
FILE_PREFIX = "f-"
#: fd store slots the state takes: two, since a new snapshot is stored
#: before the old one is removed (one of them is always whole).
STATE_SLOTS = 2
#: A sync quicker than this (seconds) is followed by :data:`COALESCE` only.
QUICK_SYNC = 0.005
#: Seconds between two syncs at the least: the changes of a burst (a
#: service's restore() preserving 100 connections, a client's pipelined
#: batch) go in one update instead of one each, and the first change after a
#: quiet spell still goes at once.
COALESCE = 0.002
#: After a slower sync, the next waits this many times its duration.
PAUSE_FACTOR = 4
#: After a live update, the new generation's first sync (a full snapshot:
#: ~0.15 s for 2000 sessions) waits this long, so that the clients waiting
#: in the backlog are answered first: it is not part of the blackout.
AFTER_REBOOT_GRACE = 0.1
#: Largest snapshot read back (a bad one is refused, never loaded whole).
MAX_SNAPSHOT = 256 << 20
#: A full snapshot replaces the delta log once the log holds this many deltas...
MAX_DELTAS = 4096
#: ...or more bytes than the last full snapshot and at least this many, so
#: that a change costs O(1) amortized and the log stays O(state).
DELTA_LOG_MIN = 256 << 10
#: A delta bigger than this goes as a full snapshot instead (it fits a message).
MAX_DELTA_LINE = 256 << 10


def is_copy_name(name: str) -> bool:
    """Whether an fd given back by the service manager is one of our copies."""
    return name.startswith((FILE_PREFIX, STATE_NAME))


def key_name(key: tuple[int, int, int]) -> str:
    """A file's name in the copies: its identity, the same in every generation."""
    return f"{FILE_PREFIX}{key[0]}-{key[1]}-{key[2]}"


@dataclass
class Snapshot:
    """What the copies must hold now: the state and every file by name."""

    data: bytes
    files: dict[str, int]


def snapshot(luo: Orchestrator, writer: str = "", seq: int = 0) -> Snapshot:
    """The snapshot of ``luo``: outgoing and unfinished incoming sessions
    (``seq``: its number, the newest one wins when two were kept)."""
    files: dict[str, int] = {}
    header: dict[str, object] = {"generation": luo.generation, "seq": seq}
    parts: list[bytes] = []
    incoming = [s for s in luo.sessions.incoming.values() if not s.finished]
    outgoing = list(luo.sessions.outgoing.values())
    for direction, sessions in (("outgoing", outgoing), ("incoming", incoming)):
        records: list[SessionRecord] = []
        keys: list[list[str | None]] = []
        for session in sessions:
            record = session_record(session)
            records.append(record)
            names: list[str | None] = []
            for token in session.files:
                file = session.files[token]
                if file.fd < 0:
                    names.append(None)
                    continue
                name = key_name(file.key)
                files.setdefault(name, file.fd)
                names.append(name)
            keys.append(names)
        data = b""
        if records:
            data = encode_image(HandoverImage(luo.generation, records, writer=writer))
        header[direction] = {"bytes": len(data), "keys": keys}
        parts.append(data)
    return Snapshot(MAGIC + json.dumps(header).encode() + b"\n" + b"".join(parts), files)


#: The name of the memfd a state snapshot travels in.
STATE_MEMFD_NAME = "luod-state"


def read_memfd(fd: int) -> bytes:
    """The whole content of a snapshot memfd (bounded)."""
    size = os.fstat(fd).st_size
    if size > MAX_SNAPSHOT:
        raise OSError(errno.EFBIG, f"snapshot of {size} bytes")
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass
class Recovered:
    """What a cold start got back from the copies."""

    sessions: int
    files: int
    #: Files the state names that were not given back (or did not check).
    missing: int


Images = list[tuple[HandoverImage, list[list[str | None]]]]


def _parse(data: bytes) -> tuple[int, Images]:
    """The generation and the two images of a snapshot, with the deltas that
    follow it (one JSON line each, see :func:`delta_line`) applied in order."""
    if not data.startswith(MAGIC):
        raise ValueError("not a snapshot of this format")
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    offset = end + 1
    generation = int(header["generation"])
    images = []
    for direction in ("outgoing", "incoming"):
        part = header[direction]
        size = int(part["bytes"])
        keys = part["keys"]
        image = HandoverImage(generation, [])
        if size:
            image = decode_image(data[offset : offset + size])
            if len(keys) != len(image.sessions) or any(
                len(k) != len(s.files) for k, s in zip(keys, image.sessions, strict=True)
            ):
                raise ValueError("the keys do not match the image")
        elif keys:
            raise ValueError("keys without an image")
        images.append((image, keys))
        offset += size
    tail = data[offset:]
    if not tail:
        return generation, [(i, k) for i, k in images if i.sessions]
    # The delta log: each line replaces or removes whole sessions.
    by_name: list[dict[bytes, tuple[SessionRecord, list[str | None]]]] = [
        {s.name: (s, k) for s, k in zip(image.sessions, keys, strict=True)}
        for image, keys in images
    ]
    for line in tail.split(b"\n"):
        if not line:
            raise ValueError("an empty delta")
        records = json.loads(line)
        if not isinstance(records, list):
            raise ValueError("a delta is not a list")
        for record in records:
            _apply(by_name, record)
    return generation, [
        (HandoverImage(generation, [s for s, _ in d.values()]), [k for _, k in d.values()])
        for d in by_name
        if d
    ]


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("a delta field is not an integer")
    return value


def _file_entries(entries: object) -> tuple[list[FileRecord], list[str | None]]:
    """A delta's file entries, ``[token, compatible, copy name]`` each."""
    if not isinstance(entries, list):
        raise ValueError("a delta's files are not a list")
    files: list[FileRecord] = []
    keys: list[str | None] = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 3:
            raise ValueError("a delta file is not [token, compatible, name]")
        token, compatible, key = entry
        if not isinstance(compatible, str) or not (key is None or isinstance(key, str)):
            raise ValueError("a delta file's compatible or name is not a string")
        files.append(FileRecord(_int(token), compatible, -1, b""))
        keys.append(key)
    return files, keys


def _apply(
    by_name: list[dict[bytes, tuple[SessionRecord, list[str | None]]]], record: object
) -> None:
    """Apply one session's delta record (strict: anything unexpected is a
    :class:`ValueError`, and the whole recovery is refused)."""
    if not isinstance(record, dict):
        raise ValueError("a delta record is not an object")
    direction = record["dir"]
    if direction not in (0, 1):
        raise ValueError("a delta record's direction is not 0 or 1")
    name = bytes.fromhex(record["name"])
    if not 0 < len(name) < 64 or b"\0" in name:
        raise ValueError("a delta record's name is not a session name")
    sessions = by_name[direction]
    if record.get("gone") is True:
        sessions.pop(name, None)
        return
    if "files" not in record:  # the files alone changed (fdstore.files_record)
        if name not in sessions:
            raise ValueError("a delta of files for a session the snapshot does not hold")
        base, base_keys = sessions[name]
        if not isinstance(record["drop"], list):
            raise ValueError("a delta's dropped tokens are not a list")
        drop = {_int(token) for token in record["drop"]}
        kept = [(f, k) for f, k in zip(base.files, base_keys, strict=True) if f.token not in drop]
        added_files, added_keys = _file_entries(record["add"])
        sessions[name] = (
            dataclasses.replace(base, files=[f for f, _ in kept] + added_files),
            [k for _, k in kept] + added_keys,
        )
        return
    files, keys = _file_entries(record["files"])
    created = record["created"]
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise ValueError("a delta record's creation time is not a number")
    session = SessionRecord(
        name=name,
        uid=_int(record["uid"]),
        gid=_int(record["gid"]),
        pid=_int(record["pid"]),
        created=float(created),
        flags=_int(record["flags"]),
        files=files,
    )
    sessions[name] = (session, keys)


def _recaptured(rec: FileRecord, fd: int, registry: HandlerRegistry) -> FileRecord | None:
    """The record with its handler data captured from the copy now (the data
    in the snapshot is that of the last freeze, if any, and the file may
    have changed since); ``None`` if the handler refuses it."""
    handler = registry.by_compatible(rec.compatible)
    if handler is None:
        return None
    try:
        st = os.fstat(fd)
        file = PreservedFile(rec.token, handler, fd, handler.file_key(fd, st))
        data = handler.freeze(file)
    except (OSError, ValueError):
        return None
    return FileRecord(rec.token, rec.compatible, fd, data)


def recover(
    data: bytes,
    fds: Mapping[str, int],
    registry: HandlerRegistry,
    limits: Limits,
    hooks: Hooks,
) -> tuple[Orchestrator, Recovered]:
    """The generation rebuilt from a snapshot and the copies given back.

    Every session (outgoing or not yet finished incoming) becomes an
    incoming session; an incoming session whose name an outgoing one also
    has is reported lost (the outgoing one is what its holder made for the
    next generation). ``fds`` stay the caller's: each file gets a dup.
    Raises :class:`ValueError`, :class:`OSError` or
    :class:`~liveupdate.handover_abi.HandoverError` when the snapshot is
    unusable (nothing is kept then).
    """
    generation, images = _parse(data)
    records: list[SessionRecord] = []
    names: set[bytes] = set()
    dups: list[int] = []
    missing = 0
    files = 0
    try:
        for image, keys in images:
            for session, session_keys in zip(image.sessions, keys, strict=True):
                if session.name in names:
                    event(
                        "session-lost",
                        logging.ERROR,
                        session=session.name.decode(errors="backslashreplace"),
                        files=len(session.files),
                        why="an outgoing session of the same name was recovered instead",
                    )
                    continue
                names.add(session.name)
                kept: list[FileRecord] = []
                for rec, name in zip(session.files, session_keys, strict=True):
                    copy = fds.get(name) if isinstance(name, str) else None
                    rebuilt = None
                    if copy is not None:
                        fd = os.dup(copy)
                        dups.append(fd)
                        rebuilt = _recaptured(rec, fd, registry)
                    if rebuilt is None:
                        missing += 1
                        event(
                            "file-lost",
                            logging.ERROR,
                            session=session.name.decode(errors="backslashreplace"),
                            token=f"{rec.token:#x}",
                            why="no usable copy of it was given back",
                        )
                        continue
                    kept.append(rebuilt)
                    files += 1
                records.append(
                    SessionRecord(
                        name=session.name,
                        uid=session.uid,
                        gid=session.gid,
                        pid=session.pid,
                        created=session.created,
                        flags=session.flags & ~IMAGE_FLAG_AWAITING_SUCCESSOR,
                        files=kept,
                    )
                )
        luo = reboot.restore(HandoverImage(generation, records), registry, limits, hooks)
        # A restart after a crash is a cold start (a new line of generations),
        # not a live update: no reboot to report, the copies' counts instead.
        luo.arrival = None
        luo.recovered_sessions, luo.recovered_files = len(records), files
    except BaseException:
        for fd in dups:
            os.close(fd)
        raise
    used = {f.fd for r in records for f in r.files}
    for fd in dups:
        if fd not in used:
            os.close(fd)
    return luo, Recovered(len(records), files, missing)


def recover_or_report(
    data: bytes,
    fds: Mapping[str, int],
    registry: HandlerRegistry,
    limits: Limits,
    hooks: Hooks,
    source: str,
) -> tuple[Orchestrator, Recovered] | None:
    """:func:`recover`, logging the result; ``None`` when the copies are unusable."""
    try:
        luo, recovered = recover(data, fds, registry, limits, hooks)
    except (OSError, ValueError, KeyError, TypeError, HandoverError) as exc:
        event("recover-failed", logging.ERROR, source=source, reason=str(exc))
        return None
    event(
        "recovered",
        logging.WARNING,
        source=source,
        sessions=recovered.sessions,
        files=recovered.files,
        missing=recovered.missing,
        generation=luo.generation,
        hint="every session is back as an incoming session: retrieve it by name",
    )
    return luo, recovered


#: A session's place in the copies: (0 outgoing / 1 incoming, name).
Place = tuple[int, bytes]
#: A file's identity (``PreservedFile.key``); its copy's name is :func:`key_name`.
Key = tuple[int, int, int]
#: What a delta compares: flags, waiting, and each file's (token, fd, identity).
Print = tuple[int, bool, tuple[tuple[int, int, Key | None], ...]]


def _sessions(luo: Orchestrator) -> list[tuple[Place, Session]]:
    """What the copies keep: outgoing and unfinished incoming sessions."""
    kept = [((0, name), s) for name, s in luo.sessions.outgoing.items()]
    kept += [((1, name), s) for name, s in luo.sessions.incoming.items() if not s.finished]
    return kept


def _print(session: Session) -> Print:
    entries = [(t, f.fd, f.key if f.fd >= 0 else None) for t, f in session.files.items()]
    return (session.flags, session.waiting, tuple(entries))


def _file_entry(session: Session, token: int, key: Key | None) -> list[object]:
    return [token, session.files[token].handler.compatible, None if key is None else key_name(key)]


def delta_record(place: Place, session: Session | None, fp: Print | None) -> dict[str, object]:
    """One session's delta record: its whole record (files by token,
    compatible and copy name; the handler data is captured again from the
    copy at recovery), or ``gone``."""
    record: dict[str, object] = {"dir": place[0], "name": place[1].hex()}
    if session is None or fp is None:
        record["gone"] = True
        return record
    record.update(
        uid=session.owner.uid,
        gid=session.owner.gid,
        pid=session.owner.pid,
        created=session.created,
        flags=fp[0] | (IMAGE_FLAG_AWAITING_SUCCESSOR if fp[1] else 0),
        files=[_file_entry(session, token, key) for token, _fd, key in fp[2]],
    )
    return record


Entries = tuple[tuple[int, int, Key | None], ...] | list[tuple[int, int, Key | None]]


def _diff(old: Print, new: Print) -> tuple[Entries, Entries]:
    """The file entries of ``old`` that ``new`` lacks, and those it adds (in order)."""
    now = set(new[2])
    before = set(old[2])
    return [e for e in old[2] if e not in now], [e for e in new[2] if e not in before]


def files_record(
    place: Place, session: Session, old: Print, new: Print, dropped: Entries, added: Entries
) -> dict[str, object] | None:
    """The delta record of a session whose files alone changed (``dropped``
    and ``added``: :func:`_diff`), or ``None`` when the change is more than
    that and the whole record goes. A preserve into a session of 10,000
    files then costs one entry, not 10,000."""
    if old[:2] != new[:2]:
        return None
    gone = {entry[0] for entry in dropped}
    # Applied, the record keeps the old order less the dropped files, then
    # the added ones: that must be the new order exactly.
    if len(old[2]) - len(gone) + len(added) != len(new[2]) or (
        gone and [e for e in old[2] if e[0] not in gone] + list(added) != list(new[2])
    ):
        return None
    if not gone and old[2] != new[2][: len(old[2])]:
        return None
    return {
        "dir": place[0],
        "name": place[1].hex(),
        "drop": sorted(gone),
        "add": [_file_entry(session, token, key) for token, _fd, key in added],
    }


def delta_line(records: list[dict[str, object]]) -> bytes:
    """A delta as stored after a snapshot: one JSON line (no newline inside)."""
    return json.dumps(records, separators=(",", ":")).encode()


class Copies:
    """Keeps a copy of every preserved fd and of the state outside luod.

    :meth:`sync` runs on the loop's idle hook (never inside a call): it
    compares what the copies hold with the sessions, and sends the
    difference. Where the copies take deltas (:attr:`deltas`), a change
    costs the new fds and the changed sessions' records; a full snapshot
    goes only when the delta log since the last one outgrows it
    (:data:`DELTA_LOG_MIN` at least) or holds :data:`MAX_DELTAS` deltas.
    A failure is logged once and retried at the next change, with a full
    snapshot.
    """

    name = "copies"
    #: What GET_STATE calls them.
    kind = LuodCopies.OFF
    #: Whether :meth:`_send_delta` is supported (else every sync is full).
    deltas = False

    def __init__(self, writer: str = "") -> None:
        self.writer = writer
        self._seen: tuple[int, int] | None = None
        #: What the copies hold: file name -> luod's fd it was copied from.
        self._held: dict[str, int] | None = None
        #: Each kept session's print as the copies hold it, and the session's
        #: :attr:`~liveupdate.core.session.Session.changed_at` it was taken at.
        self._prints: dict[Place, Print] = {}
        self._stamps: dict[Place, int] = {}
        #: How many kept files have each copy (by name): a copy goes when none does.
        self._refs: dict[str, int] = {}
        self._seq = 0
        self._next_sync = 0.0
        #: Since the last full snapshot: its size, the deltas' count and bytes.
        self._full_size = 0
        self._delta_count = 0
        self._delta_bytes = 0
        self.error = 0

    def hold_off(self, seconds: float) -> None:
        """No sync for ``seconds`` (the first turns after a live update: the
        copies still hold the previous generation's sessions, which a
        restart would give back as incoming, as the handover did; only what
        changes meanwhile is not copied yet)."""
        self._next_sync = time.monotonic() + seconds

    def sync(self, luo: Orchestrator) -> float | None:
        """Bring the copies up to date if due; seconds until the next try.

        A full snapshot costs time in proportion to what luod holds (an
        image of 2000 sessions takes ~0.15 s): a sync that took more than
        :data:`QUICK_SYNC` is followed by a pause of :data:`PAUSE_FACTOR`
        times its duration, so that the copies never take more than a fifth
        of the loop; a quicker one by :data:`COALESCE` (a burst of changes
        goes in one update).
        """
        mark = (id(luo), luo.sessions.mutations)
        if mark == self._seen:
            return None
        wait = self._next_sync - time.monotonic()
        if wait > 0:
            return wait
        began = time.monotonic()
        self._sync(luo, mark)
        took = time.monotonic() - began
        self._next_sync = began + (took * PAUSE_FACTOR if took > QUICK_SYNC else COALESCE)
        return None

    def _full_due(self, luo: Orchestrator) -> bool:
        return (
            not self.deltas
            or self._held is None
            or self._seen is None
            or self._seen[0] != id(luo)
            or self._delta_count >= MAX_DELTAS
            or self._delta_bytes >= max(DELTA_LOG_MIN, self._full_size)
        )

    def _sync(self, luo: Orchestrator, mark: tuple[int, int]) -> None:
        try:
            self._seq += 1
            if self._full_due(luo):
                self._sync_full(luo)
            else:
                self._sync_delta(luo)
        except (OSError, ValueError) as exc:
            err = (exc.errno if isinstance(exc, OSError) else 0) or errno.EIO
            if err != self.error:
                event(
                    f"{self.name}-failed",
                    logging.ERROR,
                    error=str(exc),
                    consequence="if luod dies now, what changed since is lost",
                )
            self.error = err
            self._held = None  # resend everything next time
            return
        if self.error:
            event(f"{self.name}-recovered")
        self.error = 0
        self._seen = mark

    def _sync_full(self, luo: Orchestrator) -> None:
        snap = snapshot(luo, self.writer, self._seq)
        full = self._held is None
        held = self._held or {}
        adds = {k: fd for k, fd in snap.files.items() if held.get(k) != fd}
        removes = [k for k in held if k not in snap.files]
        self._send(adds, snap.data, removes, full)
        self._held = snap.files
        self._prints, self._stamps, self._refs = {}, {}, {}
        if self.deltas:
            for place, session in _sessions(luo):
                fp = self._prints[place] = _print(session)
                self._stamps[place] = session.changed_at
                for _token, _fd, key in fp[2]:
                    if key is not None:
                        name = key_name(key)
                        self._refs[name] = self._refs.get(name, 0) + 1
        self._full_size = len(snap.data)
        self._delta_count = self._delta_bytes = 0

    def _sync_delta(self, luo: Orchestrator) -> None:
        """Send what changed since the last sync: only sessions whose stamp
        moved are looked at (O(sessions) plus the changed sessions' files),
        and a session whose files alone changed sends only those."""
        held = self._held if self._held is not None else {}
        records: list[dict[str, object]] = []
        #: Per copy name: the change in how many kept files have it, and an fd.
        counts: dict[str, list[int]] = {}

        def count(entries: Entries, step: int) -> None:
            for _token, fd, key in entries:
                if key is not None:
                    entry = counts.setdefault(key_name(key), [0, fd])
                    entry[0] += step
                    if step > 0:
                        entry[1] = fd

        live = set()
        for place, session in _sessions(luo):
            live.add(place)
            if self._stamps.get(place) == session.changed_at and place in self._prints:
                continue
            fp = _print(session)
            old = self._prints.get(place)
            self._prints[place] = fp
            self._stamps[place] = session.changed_at
            if old == fp:
                continue
            dropped, added = ((), fp[2]) if old is None else _diff(old, fp)
            record = None
            if old is not None:
                record = files_record(place, session, old, fp, dropped, added)
            records.append(record if record is not None else delta_record(place, session, fp))
            count(dropped, -1)
            count(added, +1)
        for place in [p for p in self._prints if p not in live]:
            count(self._prints.pop(place)[2], -1)
            self._stamps.pop(place, None)
            records.append(delta_record(place, None, None))
        if not records:
            return
        adds: dict[str, int] = {}
        removes: list[str] = []
        for name, (step, fd) in counts.items():
            refs = self._refs.get(name, 0) + step
            if refs > 0:
                self._refs[name] = refs
                if held.get(name) != fd and (step > 0 or name not in held):
                    adds[name] = fd
            else:
                self._refs.pop(name, None)
                if name in held:
                    removes.append(name)
        line = delta_line(records)
        if len(line) > MAX_DELTA_LINE:  # a big session changed whole: a snapshot is as cheap
            self._sync_full(luo)
            return
        self._send_delta(adds, line, removes)
        for name in removes:
            held.pop(name, None)
        held.update(adds)
        self._held = held
        self._delta_count += 1
        self._delta_bytes += len(line) + 1

    def _send(self, adds: dict[str, int], state: bytes, removes: list[str], full: bool) -> None:
        raise NotImplementedError

    def _send_delta(self, adds: dict[str, int], line: bytes, removes: list[str]) -> None:
        raise NotImplementedError

    def capacity(self, limits: Limits) -> tuple[int, str] | None:
        """How many files these copies can hold, and what bounds it (for an
        error message); ``None``: nothing known bounds them but luod's own table."""
        return None

    def stop(self) -> None:
        """A clean stop: the sessions were released on purpose, drop the copies."""

    def close(self) -> None:
        """This process stops using the copies (they stay)."""


class FdStoreCopies(Copies):
    """The copies in systemd's fd store (``FileDescriptorStoreMax=``)."""

    name = "fdstore"
    kind = LuodCopies.FDSTORE

    def __init__(
        self, writer: str = "", given_back: Mapping[str, int] | None = None, seq: int = 0
    ) -> None:
        super().__init__(writer)
        self._state_slot = 0
        # What systemd gave back at the start is in the store already: the
        # first sync sends only what changed, and the newest state is kept
        # until a newer one is whole.
        self._seq = seq
        if given_back is not None:
            self._held = {k: -1 for k in given_back if k.startswith(FILE_PREFIX)}
            if given_back.get(f"{STATE_NAME}-0") is not None and seq_slot(given_back, seq) == 0:
                self._state_slot = 1

    def _send(self, adds: dict[str, int], state: bytes, removes: list[str], full: bool) -> None:
        for name, fd in adds.items():
            if not systemd.notify_fds(["FDSTORE=1", f"FDNAME={name}"], [fd]):
                raise OSError(errno.EPIPE, "the service manager refused an fd")
        memfd = sealed_memfd(state, STATE_MEMFD_NAME)
        try:
            slot = self._state_slot
            if not systemd.notify_fds(["FDSTORE=1", f"FDNAME={STATE_NAME}-{slot}"], [memfd]):
                raise OSError(errno.EPIPE, "the service manager refused the state")
        finally:
            os.close(memfd)
        systemd.notify("FDSTOREREMOVE=1", f"FDNAME={STATE_NAME}-{1 - slot}")
        self._state_slot = 1 - slot
        for name in removes:
            systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def capacity(self, limits: Limits) -> tuple[int, str] | None:
        """``FileDescriptorStoreMax=``, less the state's slots: systemd drops
        (and only logs) what does not fit, so luod must not accept more."""
        most = systemd.fd_store_max()
        return max(0, most - STATE_SLOTS), (
            f"FileDescriptorStoreMax={most}, less {STATE_SLOTS} for the state"
        )

    def stop(self) -> None:
        for name in list(self._held or ()):
            systemd.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
        for slot in (0, 1):
            systemd.notify("FDSTOREREMOVE=1", f"FDNAME={STATE_NAME}-{slot}")


def seq_slot(given: Mapping[str, int], seq: int) -> int:
    """Which slot holds the snapshot numbered ``seq`` (0 or 1)."""
    fd = given.get(f"{STATE_NAME}-0")
    if fd is not None:
        try:
            if snapshot_seq(read_memfd(fd)) == seq:
                return 0
        except OSError:
            pass
    return 1


def snapshot_seq(data: bytes) -> int:
    """The number of a snapshot (-1: unreadable)."""
    try:
        end = data.index(b"\n", len(MAGIC))
        return int(json.loads(data[len(MAGIC) : end])["seq"]) if data.startswith(MAGIC) else -1
    except (ValueError, KeyError, TypeError):
        return -1


def given_back_state(given: Mapping[str, int]) -> tuple[bytes, int] | None:
    """The newest snapshot among fds the service manager gave back, and its number."""
    best: tuple[bytes, int] | None = None
    for name in (f"{STATE_NAME}-0", f"{STATE_NAME}-1"):
        fd = given.get(name)
        if fd is None:
            continue
        try:
            data = read_memfd(fd)
        except OSError:
            continue
        seq = snapshot_seq(data)
        if seq >= 0 and (best is None or seq > best[1]):
            best = (data, seq)
    return best
