"""The handover image codec: records to DTB and back, on libfdt.

:mod:`liveupdate.handover_abi` says what an image contains; this module turns
a :class:`~liveupdate.handover_abi.HandoverImage` into the bytes of a
Flattened Device Tree and back, and into the JSON that ``luoctl inspect``
prints. It sits at the ABI layer beside :mod:`liveupdate.wire` (which plays
the same role for :mod:`liveupdate.uapi`), so that the server and the core
write and read images with it and ``luoctl`` reads them without importing
the core.

The tree is written and read through :mod:`liveupdate.flattree`, i.e. by
libfdt, the FDT code of the ``dtc`` project and of the kernel's KHO; this
module adds the LUO schema on top: version first, then every node and
property. Decoding is all or nothing: an image either decodes completely or
raises :class:`~liveupdate.handover_abi.HandoverError`, whose reason names
the node and property at fault.
"""

from __future__ import annotations

import math
import re
import struct
from fractions import Fraction
from typing import Any, Final

from liveupdate import flattree
from liveupdate import handover_abi as abi
from liveupdate.flattree import FlatNode, FlatTreeError, Properties
from liveupdate.handover_abi import (
    CorruptImageError,
    FileRecord,
    HandoverImage,
    ParticipantRecord,
    SessionRecord,
    UnknownVersionError,
)

__all__ = [
    "decode_image",
    "encode_image",
    "image_to_dict",
    "restamped_reboot_times",
    "stamp_reboot_times",
]

_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_S32_MAX: Final = 0x7FFF_FFFF

# At most 9 digits: the version must fit a u32 like luo,version, and int()
# must never be handed an unbounded digit string from a corrupt image.
_COMPATIBLE_RE: Final = re.compile(re.escape(abi.COMPATIBLE_PREFIX) + r"(\d{1,9})")

# Below this many seconds (year 2540), created certainly fits in u64
# nanoseconds: the exact (and slow) Fraction check is only needed above it.
_CREATED_ALWAYS_FITS: Final = 18_000_000_000


# --------------------------------------------------------------------------
# Validation shared by the writer and the reader
# --------------------------------------------------------------------------


def _name_repr(name: bytes) -> str:
    """Render a session name for error messages without assuming UTF-8."""
    return repr(bytes(name))


def _is_compatible_string(value: str) -> bool:
    """Whether ``value`` can be a handler compatible string in the image.

    Printable ASCII only: the strings are stored as an FDT string list, which
    ``dtc`` can only print as strings if they are printable.
    """
    return bool(value) and value.isascii() and value.isprintable()


def _file_problem(
    record: FileRecord, where: str, tokens: set[int], fds: dict[int, str]
) -> str | None:
    """Return the first rule the file ``record`` breaks, or None if it is valid.

    ``tokens`` holds the tokens of the session's earlier files and ``fds``
    maps every fd number already claimed in the image to the file that
    claimed it: the same number inherited for two files would hand one open
    file to two records. Both are updated.
    """
    token = record.token
    if not isinstance(token, int) or not 0 <= token <= _U64_MAX:
        return f"{where}: token {token!r} is not a u64"
    if token in tokens:
        return f"{where}: duplicate token {token}"
    tokens.add(token)
    where = f"{where} (token {token})"
    if not isinstance(record.compatible, str) or not _is_compatible_string(record.compatible):
        return (
            f"{where}: handler compatible {record.compatible!r} "
            "is not a non-empty printable ASCII string"
        )
    fd = record.fd
    if not isinstance(fd, int) or not -1 <= fd <= _S32_MAX:
        return f"{where}: fd {fd!r} is neither -1 nor a descriptor number"
    if fd >= 0:
        if fd in fds:
            return f"{where}: fd {fd} is already carried by {fds[fd]}"
        fds[fd] = where
    if not isinstance(record.data, bytes | bytearray):
        return f"{where}: data must be bytes, not {type(record.data).__name__}"
    if len(record.data) > _U32_MAX:
        return f"{where}: data of {len(record.data)} bytes exceeds the u32 size field"
    return None


def _session_problem(session: SessionRecord, where: str, fds: dict[int, str]) -> str | None:
    """Return the first rule ``session`` breaks, or None if it is valid."""
    name = session.name
    if not isinstance(name, bytes | bytearray):
        return f"{where}: name must be bytes, not {type(name).__name__}"
    if not 1 <= len(name) <= abi.MAX_SESSION_NAME_LENGTH:
        return (
            f"{where}: name {_name_repr(name)} is {len(name)} bytes long, "
            f"expected 1 to {abi.MAX_SESSION_NAME_LENGTH}"
        )
    if 0 in name:
        return f"{where}: name {_name_repr(name)} contains a NUL byte"
    for attr in ("uid", "gid", "pid", "flags"):
        value = getattr(session, attr)
        if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
            return f"{where}: {attr} {value!r} is not a u32"
    created = session.created
    if not isinstance(created, int | float) or not math.isfinite(created) or created < 0:
        return f"{where}: created {created!r} is not a finite non-negative time"
    if created >= _CREATED_ALWAYS_FITS and round(Fraction(created) * abi.NS_PER_S) > _U64_MAX:
        return f"{where}: created {created!r} does not fit in u64 nanoseconds"
    tokens: set[int] = set()
    for index, record in enumerate(session.files):
        problem = _file_problem(record, f"{where} file {index}", tokens, fds)
        if problem is not None:
            return problem
    return None


def _participant_problem(participant: ParticipantRecord, where: str) -> str | None:
    """Return the first rule ``participant`` breaks, or None if it is valid."""
    name = participant.name
    if not isinstance(name, bytes | bytearray):
        return f"{where}: name must be bytes, not {type(name).__name__}"
    if not 1 <= len(name) <= abi.MAX_SESSION_NAME_LENGTH or 0 in name:
        return (
            f"{where}: name {_name_repr(name)} must be 1 to "
            f"{abi.MAX_SESSION_NAME_LENGTH} bytes without NUL"
        )
    for attr in ("uid", "gid", "pid"):
        value = getattr(participant, attr)
        if not isinstance(value, int) or not 0 <= value <= _U32_MAX:
            return f"{where}: {attr} {value!r} is not a u32"
    data = participant.data
    if not isinstance(data, bytes | bytearray) or len(data) > abi.MAX_PARTICIPANT_DATA:
        return f"{where}: data must be at most {abi.MAX_PARTICIPANT_DATA} bytes"
    return None


def _image_problem(image: HandoverImage) -> str | None:
    """Return the first rule ``image`` breaks, or None if it is valid.

    The writer and the reader apply the same rules, so that an image the
    writer accepts is always one the reader accepts, and a reader error always
    means the bytes changed (or were not written by this module).
    """
    number = image.liveupdate_number
    if not isinstance(number, int) or not 0 <= number <= _U64_MAX:
        return f"liveupdate number {number!r} is not a u64"
    if not isinstance(image.writer, str) or "\0" in image.writer:
        return f"writer {image.writer!r} must be a string without NUL"
    for what, value in (
        ("cold start time", image.cold_started_ns),
        ("reboot start time", image.reboot_started_ns),
        ("freeze time", image.frozen_ns),
    ):
        if not isinstance(value, int) or not 0 <= value <= _U64_MAX:
            return f"{what} {value!r} is not a u64"
    names: dict[bytes, int] = {}
    fds: dict[int, str] = {}
    for index, session in enumerate(image.sessions):
        where = f"session {index}"
        problem = _session_problem(session, where, fds)
        if problem is not None:
            return problem
        name = bytes(session.name)
        if name in names:
            return f"{where}: name {_name_repr(name)} is already used by session {names[name]}"
        names[name] = index
    participants: set[bytes] = set()
    for index, participant in enumerate(image.participants):
        where = f"participant {index}"
        problem = _participant_problem(participant, where)
        if problem is not None:
            return problem
        if bytes(participant.name) in participants:
            return f"{where}: name {_name_repr(participant.name)} is used twice"
        participants.add(bytes(participant.name))
    return None


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def _cstr(value: bytes) -> bytes:
    """NUL-terminate ``value``: the FDT encoding of one string."""
    return value + b"\0"


def _root_properties(image: HandoverImage, handlers: dict[str, int]) -> Properties:
    """The root node's properties, values packed as the schema says."""
    # Only with participants: an image without any stays readable by older readers.
    count = len(image.participants)
    participants = [(abi.PROP_PARTICIPANT_COUNT, abi.U32_LAYOUT.pack(count))] if count else []
    return [
        (abi.PROP_COMPATIBLE, _cstr(abi.IMAGE_COMPATIBLE.encode())),
        (abi.PROP_VERSION, abi.U32_LAYOUT.pack(abi.IMAGE_VERSION)),
        (abi.PROP_LIVEUPDATE_NUMBER, abi.U64_LAYOUT.pack(image.liveupdate_number)),
        (abi.PROP_WRITER, _cstr(image.writer.encode("utf-8"))),
        (abi.PROP_SESSION_COUNT, abi.U32_LAYOUT.pack(len(image.sessions))),
        (abi.PROP_HANDLERS, b"".join(_cstr(h.encode("ascii")) for h in handlers)),
        # Always written, 0 when unknown: stamp_reboot_times() replaces the
        # last two in place.
        (abi.PROP_COLD_STARTED, abi.U64_LAYOUT.pack(image.cold_started_ns)),
        (abi.PROP_REBOOT_STARTED, abi.U64_LAYOUT.pack(image.reboot_started_ns)),
        (abi.PROP_FROZEN, abi.U64_LAYOUT.pack(image.frozen_ns)),
        *participants,
    ]


def _participant_properties(participant: ParticipantRecord) -> Properties:
    """One participant node's properties."""
    owner = abi.OWNER_LAYOUT.pack(participant.uid, participant.gid, participant.pid)
    return [
        (abi.PROP_PARTICIPANT_NAME, _cstr(bytes(participant.name))),
        (abi.PROP_OWNER, owner),
        (abi.PROP_PARTICIPANT_DATA, bytes(participant.data)),
    ]


def _session_properties(session: SessionRecord, handlers: dict[str, int]) -> Properties:
    """One session node's properties, values packed as the schema says."""
    files = session.files
    count = len(files)
    columns: dict[str, list[int]] = {
        abi.PROP_FILE_TOKENS: [f.token for f in files],
        abi.PROP_FILE_FDS: [f.fd for f in files],
        abi.PROP_FILE_HANDLERS: [handlers[f.compatible] for f in files],
        abi.PROP_FILE_DATA_SIZES: [len(f.data) for f in files],
    }
    owner = abi.OWNER_LAYOUT.pack(session.uid, session.gid, session.pid)
    return [
        (abi.PROP_SESSION_NAME, _cstr(bytes(session.name))),
        (abi.PROP_OWNER, owner),
        (abi.PROP_CREATED, abi.U64_LAYOUT.pack(round(Fraction(session.created) * abi.NS_PER_S))),
        (abi.PROP_FLAGS, abi.U32_LAYOUT.pack(session.flags)),
        (abi.PROP_FILE_COUNT, abi.U32_LAYOUT.pack(count)),
        *((name, struct.pack(f">{count}{code}", *columns[name])) for name, code in abi.FILE_ARRAYS),
        (abi.PROP_FILE_DATA, b"".join(f.data for f in files)),
    ]


def encode_image(image: HandoverImage) -> bytes:
    """Serialize ``image`` into a DTB that :func:`decode_image` will accept.

    The image is checked first against the same rules the reader applies
    (name lengths, duplicate names, tokens and fds, value ranges), so a bug in
    the daemon shows up here, in the old generation where nothing is lost yet,
    rather than as an unrestorable image in the new one.

    The output is deterministic: equal images give equal bytes.

    Raises:
        ValueError: The image breaks a rule of the format, or is written for
            a version other than :data:`abi.IMAGE_VERSION`, or does not fit in
            the 2 GiB libfdt can write.
    """
    if image.version != abi.IMAGE_VERSION:
        raise ValueError(
            f"cannot write handover image version {image.version}: "
            f"this writer produces version {abi.IMAGE_VERSION} only"
        )
    problem = _image_problem(image)
    if problem is not None:
        raise ValueError(f"invalid handover image: {problem}")
    handlers: dict[str, int] = {}
    for session in image.sessions:
        for record in session.files:
            handlers.setdefault(record.compatible, len(handlers))
    nodes = [
        (f"{abi.SESSION_NODE_PREFIX}{index}", _session_properties(session, handlers))
        for index, session in enumerate(image.sessions)
    ]
    nodes += [
        (f"{abi.PARTICIPANT_NODE_PREFIX}{index}", _participant_properties(participant))
        for index, participant in enumerate(image.participants)
    ]
    return flattree.write_tree(_root_properties(image, handlers), nodes)


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------


def _corrupt(reason: str) -> CorruptImageError:
    """Build the error for a malformed image (raised by the caller)."""
    return CorruptImageError(f"corrupt handover image: {reason}")


# --------------------------------------------------------------------------
# Reader: the LUO schema
# --------------------------------------------------------------------------


def _raw(node: FlatNode, name: str) -> bytearray:
    """Return the value of a required property."""
    try:
        return node.props[name]
    except KeyError:
        raise _corrupt(f"{node.path}: missing property {name!r}") from None


def _sized(node: FlatNode, name: str, size: int) -> bytearray:
    """Return the value of a required property that must be ``size`` bytes."""
    value = _raw(node, name)
    if len(value) != size:
        raise _corrupt(f"{node.path}: property {name!r} is {len(value)} bytes, expected {size}")
    return value


def _get_u32(node: FlatNode, name: str) -> int:
    """Read a required one-cell property."""
    value: int = abi.U32_LAYOUT.unpack(_sized(node, name, abi.U32_LAYOUT.size))[0]
    return value


def _get_u64(node: FlatNode, name: str) -> int:
    """Read a required two-cell (big-endian u64) property."""
    value: int = abi.U64_LAYOUT.unpack(_sized(node, name, abi.U64_LAYOUT.size))[0]
    return value


def _get_optional_u64(node: FlatNode, name: str) -> int:
    """Read an optional two-cell property: 0 when absent (an older writer's image)."""
    if name not in node.props:
        return 0
    return _get_u64(node, name)


def _get_string_list(node: FlatNode, name: str) -> list[bytes]:
    """Read a required string list (possibly empty) as bytes without NULs."""
    value = _raw(node, name)
    if not value:
        return []
    if value[-1] != 0:
        raise _corrupt(f"{node.path}: property {name!r} is not NUL-terminated")
    return bytes(value[:-1]).split(b"\0")


def _get_array(node: FlatNode, name: str, code: str, count: int) -> tuple[int, ...]:
    """Read a required packed array of ``count`` items of ``struct`` code ``code``."""
    value = _raw(node, name)
    expected = struct.calcsize(code) * count
    if len(value) != expected:
        raise _corrupt(
            f"{node.path}: property {name!r} is {len(value)} bytes, "
            f"expected {expected} for {count} files"
        )
    return struct.unpack(f">{count}{code}", value)


def _check_version(root: FlatNode) -> int:
    """Identify the image format before trusting anything else in it.

    Returns the version. Reading the version first is what lets a reader
    report "image of version 9" rather than a misleading corruption when a
    newer writer changed the layout.
    """
    compatible = _get_string_list(root, abi.PROP_COMPATIBLE)
    if len(compatible) != 1:
        raise _corrupt(f"/: compatible must be exactly one string, found {len(compatible)}")
    try:
        text = compatible[0].decode("ascii")
    except UnicodeDecodeError:
        raise _corrupt(f"/: compatible {compatible[0]!r} is not ASCII") from None
    match = _COMPATIBLE_RE.fullmatch(text)
    if match is None:
        raise _corrupt(f"/: compatible is {text!r}: not a LUO handover image")
    compatible_version = int(match.group(1))
    if compatible_version not in abi.SUPPORTED_VERSIONS:
        raise UnknownVersionError(compatible_version)
    version = _get_u32(root, abi.PROP_VERSION)
    if version not in abi.SUPPORTED_VERSIONS:
        raise UnknownVersionError(version)
    if version != compatible_version:
        raise _corrupt(f"/: {abi.PROP_VERSION} is {version} but compatible is {text!r}")
    return version


def _decode_files(node: FlatNode, handlers: list[str]) -> list[FileRecord]:
    """Decode the per-file arrays of a version 1 session node."""
    count = _get_u32(node, abi.PROP_FILE_COUNT)
    tokens, fds, handler_ids, sizes = (
        _get_array(node, name, code, count) for name, code in abi.FILE_ARRAYS
    )
    blob = bytes(_raw(node, abi.PROP_FILE_DATA))
    if sum(sizes) != len(blob):
        raise _corrupt(
            f"{node.path}: {abi.PROP_FILE_DATA} is {len(blob)} bytes "
            f"but {abi.PROP_FILE_DATA_SIZES} add up to {sum(sizes)}"
        )
    files: list[FileRecord] = []
    offset = 0
    for index in range(count):
        handler = handler_ids[index]
        if handler >= len(handlers):
            raise _corrupt(
                f"{node.path}: file {index} uses handler {handler}, "
                f"but /{abi.PROP_HANDLERS} has {len(handlers)} entries"
            )
        end = offset + sizes[index]
        files.append(FileRecord(tokens[index], handlers[handler], fds[index], blob[offset:end]))
        offset = end
    return files


def _decode_session(node: FlatNode, handlers: list[str]) -> SessionRecord:
    """Decode one ``session-N`` node of a version 1 image."""
    if node.children:
        raise _corrupt(f"{node.path}: unexpected child node {node.children[0][0]!r}")
    raw_name = _raw(node, abi.PROP_SESSION_NAME)
    if not raw_name or raw_name[-1] != 0:
        raise _corrupt(f"{node.path}: {abi.PROP_SESSION_NAME} is not NUL-terminated")
    uid, gid, pid = abi.OWNER_LAYOUT.unpack(_sized(node, abi.PROP_OWNER, abi.OWNER_LAYOUT.size))
    return SessionRecord(
        name=bytes(raw_name[:-1]),
        uid=uid,
        gid=gid,
        pid=pid,
        created=_get_u64(node, abi.PROP_CREATED) / abi.NS_PER_S,
        flags=_get_u32(node, abi.PROP_FLAGS),
        files=_decode_files(node, handlers),
    )


def _decode_participant(node: FlatNode) -> ParticipantRecord:
    """Decode one ``participant-N`` node."""
    if node.children:
        raise _corrupt(f"{node.path}: unexpected child node {node.children[0][0]!r}")
    raw_name = _raw(node, abi.PROP_PARTICIPANT_NAME)
    if not raw_name or raw_name[-1] != 0:
        raise _corrupt(f"{node.path}: {abi.PROP_PARTICIPANT_NAME} is not NUL-terminated")
    uid, gid, pid = abi.OWNER_LAYOUT.unpack(_sized(node, abi.PROP_OWNER, abi.OWNER_LAYOUT.size))
    data = bytes(_raw(node, abi.PROP_PARTICIPANT_DATA))
    return ParticipantRecord(bytes(raw_name[:-1]), uid, gid, pid, data)


def _decode_handlers(root: FlatNode) -> list[str]:
    """Read ``/handlers``: distinct, printable ASCII compatible strings."""
    handlers: list[str] = []
    for entry in _get_string_list(root, abi.PROP_HANDLERS):
        text = entry.decode("ascii", errors="replace")
        if not _is_compatible_string(text):
            raise _corrupt(
                f"/: {abi.PROP_HANDLERS} entry {entry!r} is not a printable ASCII string"
            )
        if text in handlers:
            raise _corrupt(f"/: {abi.PROP_HANDLERS} lists {text!r} twice")
        handlers.append(text)
    return handlers


def _decode_v1(buffer: bytearray, root: FlatNode) -> HandoverImage:
    """Decode the body of a version 1 image whose version was checked."""
    number = _get_u64(root, abi.PROP_LIVEUPDATE_NUMBER)
    writer_raw = _raw(root, abi.PROP_WRITER)
    if not writer_raw or writer_raw[-1] != 0 or 0 in writer_raw[:-1]:
        raise _corrupt(f"/: {abi.PROP_WRITER} is not a single NUL-terminated string")
    # Diagnostics only: a mangled writer string must not cost the sessions.
    writer = writer_raw[:-1].decode("utf-8", errors="replace")
    handlers = _decode_handlers(root)
    count = _get_u32(root, abi.PROP_SESSION_COUNT)
    participant_count = (
        _get_u32(root, abi.PROP_PARTICIPANT_COUNT)
        if abi.PROP_PARTICIPANT_COUNT in root.props
        else 0
    )
    if count + participant_count != len(root.children):
        counts = f"{abi.PROP_SESSION_COUNT} is {count}"
        if participant_count:
            counts += f" and {abi.PROP_PARTICIPANT_COUNT} {participant_count}"
        raise _corrupt(f"/: {counts} but {len(root.children)} nodes follow")
    sessions: list[SessionRecord] = []
    participants: list[ParticipantRecord] = []
    for index, (name, offset) in enumerate(root.children):
        if index < count:
            expected = f"{abi.SESSION_NODE_PREFIX}{index}"
        else:
            expected = f"{abi.PARTICIPANT_NODE_PREFIX}{index - count}"
        if name != expected:
            raise _corrupt(f"/: child node {index} is {name!r}, expected {expected!r}")
        node = flattree.read_node(buffer, offset, f"/{name}")
        if index < count:
            sessions.append(_decode_session(node, handlers))
        else:
            participants.append(_decode_participant(node))
    image = HandoverImage(
        liveupdate_number=number,
        sessions=sessions,
        version=1,
        writer=writer,
        cold_started_ns=_get_optional_u64(root, abi.PROP_COLD_STARTED),
        reboot_started_ns=_get_optional_u64(root, abi.PROP_REBOOT_STARTED),
        frozen_ns=_get_optional_u64(root, abi.PROP_FROZEN),
        participants=participants,
    )
    problem = _image_problem(image)
    if problem is not None:
        raise _corrupt(problem)
    return image


def decode_image(data: bytes | bytearray | memoryview) -> HandoverImage:
    """Parse and fully validate a handover image.

    Every offset, length and count is checked, as are the record rules the
    writer enforces (name lengths, duplicate session names, duplicate tokens
    within a session, an fd number carried twice), so that a generation never
    restores half of an image: either all of it decodes, or nothing is
    touched and the caller keeps every inherited fd.

    Args:
        data: The image bytes, exactly as written (the FDT ``totalsize`` must
            equal ``len(data)``: trailing bytes are treated as corruption).

    Raises:
        UnknownVersionError: The root compatible is ``"luo-v<N>"`` or
            ``luo,version`` is N, with N not in :data:`abi.SUPPORTED_VERSIONS`.
        CorruptImageError: Anything else is wrong, including a root
            compatible that is not a LUO one at all.
        TypeError: ``data`` is not a bytes-like object (a caller bug, not
            a property of the image).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image() expects bytes, not {type(data).__name__}")
    buffer = bytearray(data)
    try:
        flattree.check_tree(buffer)
        root = flattree.read_node(buffer, 0, "/")
        _check_version(root)
        return _decode_v1(buffer, root)
    except FlatTreeError as exc:
        raise _corrupt(exc.reason) from None


# --------------------------------------------------------------------------
# The reboot times, stamped in place
# --------------------------------------------------------------------------


def _reboot_time_spans(data: bytearray) -> dict[str, slice] | None:
    """Where the reboot times' u64 values lie in ``data``; ``None`` if it lacks one."""
    spans = flattree.root_value_spans(data, abi.REBOOT_TIME_PROPS)
    for name in abi.REBOOT_TIME_PROPS:
        span = spans.get(name)
        if span is None or span.stop - span.start != abi.U64_LAYOUT.size:
            return None
    return spans


def stamp_reboot_times(data: bytes, reboot_started_ns: int, frozen_ns: int) -> bytes | None:
    """``data``, an image :func:`encode_image` wrote, with its reboot times
    (:data:`~liveupdate.handover_abi.REBOOT_TIME_PROPS`) replaced in place.

    What a reboot does with the pre-flight's bytes: encoding thousands of
    sessions again would lengthen the blackout. ``None`` when ``data`` does
    not hold both properties (the caller encodes the image instead).
    """
    stamped = bytearray(data)
    spans = _reboot_time_spans(stamped)
    if spans is None:
        return None
    for name, value in zip(abi.REBOOT_TIME_PROPS, (reboot_started_ns, frozen_ns), strict=True):
        stamped[spans[name]] = abi.U64_LAYOUT.pack(value)
    return bytes(stamped)


def restamped_reboot_times(checked: bytes, data: bytes) -> tuple[int, int] | None:
    """The reboot times of ``data`` if it is ``checked`` (an image already
    decoded) with nothing but its reboot times changed, else ``None``.

    Lets a successor use the image it checked at the pre-flight instead of
    decoding the same bytes again: every byte outside the two values must be
    equal, so nothing unchecked is trusted.
    """
    if len(checked) != len(data):
        return None
    merged = bytearray(checked)
    spans = _reboot_time_spans(merged)
    if spans is None:
        return None
    times: list[int] = []
    for name in abi.REBOOT_TIME_PROPS:
        span = spans[name]
        merged[span] = data[span]
        times.append(abi.U64_LAYOUT.unpack(data[span])[0])
    if merged != data:
        return None
    return times[0], times[1]


# --------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------


def _name_to_json(name: bytes) -> tuple[str, str]:
    """Return ``(text, encoding)`` for a name: UTF-8 when possible, else hex."""
    try:
        return name.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return name.hex(), "hex"


def _session_to_dict(session: SessionRecord) -> dict[str, Any]:
    """One session of :func:`image_to_dict`."""
    name, encoding = _name_to_json(bytes(session.name))
    return {
        "name": name,
        "name_encoding": encoding,
        "uid": session.uid,
        "gid": session.gid,
        "pid": session.pid,
        "created": session.created,
        "flags": session.flags,
        "files": [
            {
                "token": record.token,
                "compatible": record.compatible,
                "fd": record.fd,
                "size": len(record.data),
                "data": bytes(record.data).hex(),
            }
            for record in session.files
        ],
    }


def image_to_dict(image: HandoverImage) -> dict[str, Any]:
    """Convert ``image`` into plain JSON types for ``luoctl inspect --json``.

    Session names become text when they are valid UTF-8 and hex otherwise;
    ``name_encoding`` says which, because a hex string is also valid UTF-8
    and a consumer could not tell them apart. Handler data is always hex (it
    is opaque), with its size alongside so a reader need not count digits.
    """
    doc: dict[str, Any] = {
        "compatible": f"{abi.COMPATIBLE_PREFIX}{image.version}",
        "version": image.version,
        "liveupdate_number": image.liveupdate_number,
        "writer": image.writer,
        "cold_started_ns": image.cold_started_ns,
        "reboot_started_ns": image.reboot_started_ns,
        "frozen_ns": image.frozen_ns,
        "sessions": [_session_to_dict(session) for session in image.sessions],
    }
    if image.participants:  # absent when none, as in the image itself
        doc["participants"] = [_participant_to_dict(p) for p in image.participants]
    return doc


def _participant_to_dict(participant: ParticipantRecord) -> dict[str, Any]:
    """One participant of :func:`image_to_dict`."""
    name, encoding = _name_to_json(bytes(participant.name))
    return {
        "name": name,
        "name_encoding": encoding,
        "uid": participant.uid,
        "gid": participant.gid,
        "pid": participant.pid,
        "size": len(participant.data),
        "data": bytes(participant.data).hex(),
    }
