"""The session listing (``LUOD_IOCTL_LIST_SESSIONS``) as typed objects.

luod answers the listing with a JSON document in a sealed memfd
(``docs/concepts/sessions.md``). :func:`parse_listing` turns it into a
:class:`SessionListing` of :class:`SessionInfo` and :class:`FileInfo`. It is
strict about the fields it knows (a missing one, or one of the wrong type,
is ``EPROTO``: not luod's listing) and tolerant of the others: a newer luod
may add fields, which are kept in ``extra`` and given back by ``to_dict``.
A file's description beyond ``token``, ``handler`` and ``type`` is its
handler's own (``size``, ``address``...): it is kept, in order, in
``FileInfo.details``.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from liveupdate import uapi
from liveupdate.client.errors import LiveUpdateError, error_from_errno

__all__ = [
    "FileInfo",
    "ParticipantAnswer",
    "ParticipantInfo",
    "ServiceInfo",
    "SessionInfo",
    "SessionListing",
    "parse_listing",
]

T = TypeVar("T")


class _Fields:
    """The known fields of one JSON object, taken one by one; the rest is ``extra``."""

    def __init__(self, obj: object, what: str) -> None:
        if not isinstance(obj, dict):
            raise _malformed(f"{what} is not an object")
        self._obj: dict[str, Any] = obj
        self._taken: set[str] = set()
        self.what = what

    def take(self, key: str, kind: type[T]) -> T:
        value = self._obj.get(key)
        self._taken.add(key)
        # bool is an int to Python, never to JSON: an int field refuses it.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _malformed(f"{self.what}: {key!r} is {value!r}, not a {kind.__name__}")
        return value

    def number(self, key: str) -> float:
        value = self._obj.get(key)
        self._taken.add(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _malformed(f"{self.what}: {key!r} is {value!r}, not a number")
        return value  # as sent: an int stays an int in to_dict()

    def number_or_none(self, key: str) -> float | None:
        if self._obj.get(key) is None:
            self._taken.add(key)
            return None
        return self.number(key)

    def object_or_none(self, key: str) -> dict[str, Any] | None:
        if self._obj.get(key) is None:
            self._taken.add(key)
            return None
        return self.take(key, dict)

    def has(self, key: str) -> bool:
        return key in self._obj

    def extra(self) -> dict[str, Any]:
        return {k: v for k, v in self._obj.items() if k not in self._taken}


def _malformed(reason: str) -> LiveUpdateError:
    return error_from_errno(
        errno.EPROTO, "LUOD_IOCTL_LIST_SESSIONS", f"malformed listing: {reason}"
    )


def _enum_member(
    enum: type[uapi.SessionDirection] | type[uapi.LuodState], name: str, what: str
) -> Any:
    try:
        return enum[name.upper()]
    except KeyError:
        raise _malformed(f"{what} {name!r} is not a {enum.__name__}") from None


@dataclass(frozen=True)
class FileInfo:
    """One preserved file of a listed session."""

    token: int
    #: The compatible string of its handler (``"memfd-v1"``).
    handler: str
    #: What the handler calls it (``"memfd"``, ``"socket"``...); ``None`` if it said nothing.
    type: str | None
    #: The rest of the handler's description, in its order (``size``, ``address``...).
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object) -> FileInfo:
        fields = _Fields(obj, "file")
        token = fields.take("token", int)
        handler = fields.take("handler", str)
        kind = fields.take("type", str) if fields.has("type") else None
        return cls(token, handler, kind, fields.extra())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object luod sent."""
        head: dict[str, Any] = {"token": self.token, "handler": self.handler}
        if self.type is not None:
            head["type"] = self.type
        return {**head, **self.details}


@dataclass(frozen=True)
class ServiceInfo:
    """The service a supervisor (``luoctl run``) said runs on a session
    (``LUOD_SESSION_SET_SERVICE``)."""

    pid: int
    #: Times its supervisor restarted it after it exited.
    restarts: int
    #: How it last exited: its status (>= 0), minus the killing signal (< 0), 0: never.
    last_exit: int

    @classmethod
    def from_json(cls, obj: object, what: str) -> ServiceInfo:
        fields = _Fields(obj, f"{what}: service")
        return cls(
            pid=fields.take("pid", int),
            restarts=fields.take("restarts", int),
            last_exit=fields.take("last_exit", int),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object luod sent."""
        return {"pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit}


@dataclass(frozen=True)
class SessionInfo:
    """One listed session."""

    name: str
    direction: uapi.SessionDirection
    uid: int
    gid: int
    #: The process that created it (for one handed over: the original creator).
    pid: int
    #: When it was created (seconds since the epoch).
    created: float
    flags: int
    keep_on_close: bool
    #: Incoming sessions: retrieved by a successor / finished.
    retrieved: bool
    finished: bool
    nfiles: int
    #: Its files; ``None`` when listed without them (``files=False``).
    files: tuple[FileInfo, ...] | None = None
    #: Fields this client does not know (a newer luod's).
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The service its supervisor said runs on it; ``None``: none said.
    service: ServiceInfo | None = None

    @classmethod
    def from_json(cls, obj: object) -> SessionInfo:
        fields = _Fields(obj, "session")
        name = fields.take("name", str)
        fields.what = f"session {name!r}"
        direction = _enum_member(uapi.SessionDirection, fields.take("direction", str), "direction")
        files = None
        if fields.has("files"):
            files = tuple(FileInfo.from_json(f) for f in fields.take("files", list))
        service = None
        if fields.has("service"):
            service = ServiceInfo.from_json(fields.take("service", dict), fields.what)
        return cls(
            name=name,
            direction=direction,
            uid=fields.take("uid", int),
            gid=fields.take("gid", int),
            pid=fields.take("pid", int),
            created=fields.number("created"),
            flags=fields.take("flags", int),
            keep_on_close=fields.take("keep_on_close", bool),
            retrieved=fields.take("retrieved", bool),
            finished=fields.take("finished", bool),
            nfiles=fields.take("nfiles", int),
            files=files,
            extra=fields.extra(),
            service=service,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object luod sent (the direction as its lower-case name)."""
        doc: dict[str, Any] = {
            "name": self.name,
            "direction": self.direction.name.lower(),
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "created": self.created,
            "flags": self.flags,
            "keep_on_close": self.keep_on_close,
            "retrieved": self.retrieved,
            "finished": self.finished,
            "nfiles": self.nfiles,
        }
        if self.files is not None:
            doc["files"] = [f.to_dict() for f in self.files]
        if self.service is not None:
            doc["service"] = self.service.to_dict()
        return {**doc, **self.extra}


@dataclass(frozen=True)
class ParticipantAnswer:
    """How a participant answered its last event (or failed to)."""

    #: ``"prepare"``, ``"freeze"``, ``"cancel"`` or ``"finish"``.
    event: str
    #: ``""``: accepted; else the errno's name (``"EBUSY"``, ``"ETIMEDOUT"``...).
    error: str
    reason: str
    #: When (seconds since the epoch).
    at: float

    @classmethod
    def from_json(cls, obj: object, what: str) -> ParticipantAnswer:
        fields = _Fields(obj, f"{what}: last")
        return cls(
            event=fields.take("event", str),
            error=fields.take("error", str),
            reason=fields.take("reason", str),
            at=fields.number("at"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.event, "error": self.error, "reason": self.reason, "at": self.at}


@dataclass(frozen=True)
class ParticipantInfo:
    """One participant of the listing (``docs/concepts/participants.md``)."""

    name: str
    uid: int
    gid: int
    pid: int
    #: When it registered; ``None`` for data of the previous generation whose
    #: participant has not registered again (``phase`` ``"waiting"``).
    registered: float | None
    #: ``"idle"``, ``"prepared"``, ``"frozen"`` or ``"waiting"``.
    phase: str
    #: Bytes it carries to the next generation.
    data_len: int
    #: Bytes its name carried from the previous generation (until FINISH).
    carried: int
    last: ParticipantAnswer | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object) -> ParticipantInfo:
        fields = _Fields(obj, "participant")
        name = fields.take("name", str)
        fields.what = f"participant {name!r}"
        registered = fields.number_or_none("registered")
        last_obj = fields.object_or_none("last")
        return cls(
            name=name,
            uid=fields.take("uid", int),
            gid=fields.take("gid", int),
            pid=fields.take("pid", int),
            registered=registered,
            phase=fields.take("phase", str),
            data_len=fields.take("data_len", int),
            carried=fields.take("carried", int),
            last=None if last_obj is None else ParticipantAnswer.from_json(last_obj, fields.what),
            extra=fields.extra(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object luod sent."""
        doc: dict[str, Any] = {
            "name": self.name,
            "uid": self.uid,
            "gid": self.gid,
            "pid": self.pid,
            "registered": self.registered,
            "phase": self.phase,
            "data_len": self.data_len,
            "carried": self.carried,
            "last": None if self.last is None else self.last.to_dict(),
        }
        return {**doc, **self.extra}


@dataclass(frozen=True)
class SessionListing:
    """What ``LUOD_IOCTL_LIST_SESSIONS`` answered."""

    generation: int
    state: uapi.LuodState
    sessions: tuple[SessionInfo, ...]
    #: Sessions of other users this caller may not see (counted, not listed).
    hidden: int = 0
    #: Top-level fields this client does not know (a newer luod's).
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The participants this caller may see; ``None`` when not listed (a
    #: listing of one named session, or an older luod).
    participants: tuple[ParticipantInfo, ...] | None = None
    #: Participants of other users left out.
    hidden_participants: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The JSON document luod sent, with ``hidden`` added (``luoctl --json sessions``)."""
        doc: dict[str, Any] = {
            "generation": self.generation,
            "state": self.state.name.lower(),
            "sessions": [s.to_dict() for s in self.sessions],
            **self.extra,
            "hidden": self.hidden,
        }
        if self.participants is not None:
            doc["participants"] = [p.to_dict() for p in self.participants]
            doc["hidden_participants"] = self.hidden_participants
        return doc


def parse_listing(doc: object, hidden: int = 0) -> SessionListing:
    """The listing in luod's JSON document ``doc``; ``EPROTO`` when it is not one."""
    fields = _Fields(doc, "listing")
    generation = fields.take("generation", int)
    state = _enum_member(uapi.LuodState, fields.take("state", str), "state")
    sessions = tuple(SessionInfo.from_json(s) for s in fields.take("sessions", list))
    participants = None
    hidden_participants = 0
    if fields.has("participants"):
        participants = tuple(
            ParticipantInfo.from_json(p) for p in fields.take("participants", list)
        )
        hidden_participants = fields.take("hidden_participants", int)
    return SessionListing(
        generation=generation,
        state=state,
        sessions=sessions,
        hidden=hidden,
        extra=fields.extra(),
        participants=participants,
        hidden_participants=hidden_participants,
    )
