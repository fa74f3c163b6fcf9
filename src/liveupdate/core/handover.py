"""The handover image: what one generation of ``luod`` tells the next.

This is the userspace analog of the Kexec HandOver (KHO) tree that Linux's
Live Update Orchestrator leaves for the next kernel. When ``luod`` reboots
(re-executes itself), everything the new process needs to rebuild its incoming
sessions travels in two channels: the preserved files themselves, inherited as
file descriptors, and this image, which says which inherited fd belongs to
which session, under which token, and which handler must restore it with which
serialized data.

The image is a Flattened Device Tree (DTB, format version 17), the format KHO
uses, so that standard tools (``dtc -I dtb -O dts``, ``fdtdump``) can show an
operator what a generation handed over without any project code. Layout
(version 1, see ``docs/concepts/handover.md`` for the full reference)::

    / {
        compatible = "luo-v1";
        luo,version = <1>;
        liveupdate-number = <hi lo>;      // u64: generation that wrote this
        writer = "luod 0.1.0 pid 123";
        session-count = <N>;
        handlers = "memfd-v1", ...;        // compatible strings, indexed below
        session-0 {
            session-name = "db";           // name bytes + NUL
            owner = <uid gid pid>;
            created = <hi lo>;             // u64 nanoseconds since the epoch
            flags = <0>;
            file-count = <n>;
            file-tokens = <...>;           // n x u64
            file-fds = <...>;              // n x s32 (-1: no fd carried)
            file-handlers = <...>;         // n x u32 index into /handlers
            file-data-sizes = <...>;       // n x u32
            file-data = [...];             // the n data blobs, concatenated
        };
        ...
    };

Files are packed into per-session arrays rather than one node per file
because measured with the ``fdt`` library a node per file costs seconds for
10000 files (see the concept document for the numbers).

Writing goes through the ``fdt`` library. Reading uses a strict parser of
this module: ``fdt.parse_dtb`` accepts malformed trees (unbalanced nodes,
nodes after the root), raises arbitrary exception types on garbage and is
quadratic in the number of sibling nodes, none of which is acceptable for the
one input that decides whether a whole generation of preserved state can be
restored. ``decode_image(..., cross_check=True)`` additionally parses the image
with ``fdt`` and requires both readers to agree.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Final

__all__ = [
    "IMAGE_COMPATIBLE",
    "IMAGE_VERSION",
    "MAX_SESSION_NAME_LENGTH",
    "SUPPORTED_VERSIONS",
    "CorruptImageError",
    "FileRecord",
    "HandoverError",
    "HandoverImage",
    "SessionRecord",
    "UnknownVersionError",
    "decode_image",
    "encode_image",
    "image_to_dict",
]

IMAGE_COMPATIBLE: Final = "luo-v1"
"""Root ``compatible`` string of the images this module writes.

The version is part of the string, as for KHO and handler compatibles, so
that a generic FDT tool identifies the format and its revision at a glance.
"""

IMAGE_VERSION: Final = 1
"""Integer format version written into ``luo,version``.

Bumped whenever a reader of the previous version could misread a new image;
adding a property that older readers may safely ignore does not bump it.
"""

SUPPORTED_VERSIONS: Final = frozenset({1})
"""Image versions :func:`decode_image` can read.

A new ``luod`` must keep reading every version an older ``luod`` may have
written, otherwise an upgrade by live update would strand the preserved state.
"""

MAX_SESSION_NAME_LENGTH: Final = 63
"""Longest session name in bytes: the 64-byte UAPI field minus its NUL."""

_U32_MAX: Final = 0xFFFF_FFFF
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
_S32_MAX: Final = 0x7FFF_FFFF
_NS_PER_S: Final = 1_000_000_000

# Flattened Device Tree constants (devicetree specification, chapter 5).
_FDT_MAGIC: Final = 0xD00DFEED
_FDT_VERSION: Final = 17
_FDT_BEGIN_NODE: Final = 0x1
_FDT_END_NODE: Final = 0x2
_FDT_PROP: Final = 0x3
_FDT_NOP: Final = 0x4
_FDT_END: Final = 0x9
_FDT_HEADER: Final = struct.Struct(">10I")
_FDT_MAX_DEPTH: Final = 32

_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_OWNER: Final = struct.Struct(">3I")
_PROP_HEAD: Final = struct.Struct(">II")

# At most 9 digits: the version must fit a u32 like luo,version, and int()
# must never be handed an unbounded digit string from a corrupt image.
_COMPATIBLE_RE: Final = re.compile(r"luo-v(\d{1,9})")
_SESSION_NODE_PREFIX: Final = "session-"


# --------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------


@dataclass
class FileRecord:
    """One preserved file as the next generation must find it.

    The record carries no file: the file itself is inherited across the exec
    at descriptor number :attr:`fd`; the record only says how to turn that
    descriptor back into the file a client preserved.

    Attributes:
        token: The client's 64-bit key for the file within its session (any
            u64, 0 included); ``RETRIEVE_FD`` looks files up by it.
        compatible: Compatible string of the handler that preserved the file
            (e.g. ``"memfd-v1"``); the next generation hands :attr:`data` to
            the handler registered under exactly this string, so a handler
            that changes its data format must change its compatible string.
        fd: Descriptor number at which the file is inherited across the
            exec, or -1 when the handler carries the file some other way
            (everything it needs is then in :attr:`data`).
        data: The handler's serialized state, opaque to the orchestrator.
    """

    token: int
    compatible: str
    fd: int
    data: bytes


@dataclass
class SessionRecord:
    """One outgoing session at the reboot, as an incoming session to be.

    Attributes:
        name: The session name, 1 to 63 bytes without NUL. Names are bytes,
            not text, because the UAPI compares them byte for byte and does
            not require UTF-8.
        uid: User id of the session's creator (``SO_PEERCRED``), kept so that
            owner checks still apply to the incoming session.
        gid: Group id of the creator.
        pid: Process id of the creator, for diagnostics (the process may be
            gone by the time the image is read).
        created: Unix time at which the session was created. Stored as whole
            nanoseconds: every clock reading (and every value with at most 9
            decimals) survives an encode/decode round trip exactly.
        flags: Session flags (u32), e.g. keep-on-close; opaque here.
        files: The preserved files, in preservation order: the order in which
            the next generation restores them and, in reverse, releases them.
    """

    name: bytes
    uid: int
    gid: int
    pid: int
    created: float
    flags: int = 0
    files: list[FileRecord] = field(default_factory=list)


@dataclass
class HandoverImage:
    """Everything one generation hands to the next, besides the fds.

    Attributes:
        liveupdate_number: The generation that wrote the image (u64). It only
            grows (1, 2, ...), which lets the next generation number itself
            and lets an operator tell two images apart.
        sessions: The sessions handed over, in creation order.
        version: Format version of the image; :func:`encode_image` only
            writes :data:`IMAGE_VERSION`, :func:`decode_image` reports what
            it read.
        writer: Free text naming the program that wrote the image (e.g.
            ``"luod 0.1.0 pid 123"``), only for diagnostics.
    """

    liveupdate_number: int
    sessions: list[SessionRecord]
    version: int = IMAGE_VERSION
    writer: str = ""


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class HandoverError(Exception):
    """An image cannot be restored; nothing it describes may be released.

    :func:`decode_image` raises only this family on any input, so a daemon can
    catch it in one place, refuse the device with ``EIO`` and keep holding the
    image and every inherited fd for inspection or a retry by a fixed version.

    Attributes:
        reason: Human-readable explanation, suitable for logs and ``luoctl``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownVersionError(HandoverError):
    """The image is a LUO handover image of a version this code cannot read.

    Typically a downgrade: an older ``luod`` started on an image written by a
    newer one. The remedy is to run a version that lists the found version in
    its :data:`SUPPORTED_VERSIONS`, which is why both are reported.

    Attributes:
        found: The version found: the integer from ``luo,version`` or from the
            root compatible string ``"luo-v<N>"``.
        supported: The versions this code reads.
    """

    def __init__(self, found: int, supported: frozenset[int] = SUPPORTED_VERSIONS) -> None:
        self.found = found
        self.supported = supported
        versions = ", ".join(str(v) for v in sorted(supported))
        super().__init__(
            f"handover image version {found} is not supported (this luod reads: {versions})"
        )


class CorruptImageError(HandoverError):
    """The bytes are not a well-formed handover image of a supported version.

    Raised for anything from a truncated file or a wrong magic number to an
    inconsistent record (a duplicate token, array lengths that disagree). The
    reason names the node and property at fault.
    """


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


def _session_problem(session: SessionRecord, where: str, fds: dict[int, str]) -> str | None:
    """Return the first rule ``session`` breaks, or None if it is valid.

    ``fds`` maps every fd number already claimed by an earlier file to that
    file's description; the same number inherited for two files would hand
    one open file to two records.
    """
    name = session.name
    if not isinstance(name, bytes | bytearray):
        return f"{where}: name must be bytes, not {type(name).__name__}"
    if not 1 <= len(name) <= MAX_SESSION_NAME_LENGTH:
        return (
            f"{where}: name {_name_repr(name)} is {len(name)} bytes long, "
            f"expected 1 to {MAX_SESSION_NAME_LENGTH}"
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
    if round(Fraction(created) * _NS_PER_S) > _U64_MAX:
        return f"{where}: created {created!r} does not fit in u64 nanoseconds"
    tokens: set[int] = set()
    for index, record in enumerate(session.files):
        file_where = f"{where} file {index}"
        token = record.token
        if not isinstance(token, int) or not 0 <= token <= _U64_MAX:
            return f"{file_where}: token {token!r} is not a u64"
        if token in tokens:
            return f"{file_where}: duplicate token {token}"
        tokens.add(token)
        file_where = f"{file_where} (token {token})"
        if not isinstance(record.compatible, str) or not _is_compatible_string(record.compatible):
            return (
                f"{file_where}: handler compatible {record.compatible!r} "
                "is not a non-empty printable ASCII string"
            )
        fd = record.fd
        if not isinstance(fd, int) or not -1 <= fd <= _S32_MAX:
            return f"{file_where}: fd {fd!r} is neither -1 nor a descriptor number"
        if fd >= 0:
            if fd in fds:
                return f"{file_where}: fd {fd} is already carried by {fds[fd]}"
            fds[fd] = file_where
        if not isinstance(record.data, bytes | bytearray):
            return f"{file_where}: data must be bytes, not {type(record.data).__name__}"
        if len(record.data) > _U32_MAX:
            return f"{file_where}: data of {len(record.data)} bytes exceeds the u32 size field"
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
    return None


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def _fdt() -> Any:
    """The ``fdt`` library, imported on first use: a restoring luod only reads
    images (with the parser below) and need not pay for importing it."""
    import fdt

    return fdt


def _prop(name: str, value: bytes) -> Any:
    """Build an ``fdt`` property holding exactly ``value``.

    Every property is given as raw bytes, packed here with :mod:`struct`:
    FDT properties are untyped byte strings and the typed ``fdt`` classes
    would only add a per-word cost. ``dtc`` chooses how to print a property
    from its bytes, not from how it was built.
    """
    return _fdt().PropBytes(name, data=value)


def _cstr(value: bytes) -> bytes:
    """NUL-terminate ``value``: the FDT encoding of one string."""
    return value + b"\0"


def _attach(parent: Any, child: Any) -> None:
    """Add ``child`` to ``parent`` in constant time.

    ``fdt.Node.append`` scans every existing sibling for a duplicate name,
    which makes building a root with 2000 sessions quadratic (about 0.18 s
    measured). Session node names are unique by construction here, so the
    scan is skipped by appending to the node list directly.
    """
    parent.nodes.append(child)
    child.set_parent(parent)


def encode_image(image: HandoverImage) -> bytes:
    """Serialize ``image`` into a DTB that :func:`decode_image` will accept.

    The image is checked first against the same rules the reader applies
    (name lengths, duplicate names, tokens and fds, value ranges), so a bug in
    the daemon shows up here, in the old generation where nothing is lost yet,
    rather than as an unrestorable image in the new one.

    The output is deterministic: equal images give equal bytes.

    Raises:
        ValueError: The image breaks a rule of the format, or is written for
            a version other than :data:`IMAGE_VERSION`, or does not fit in
            the 4 GiB an FDT can address.
    """
    if image.version != IMAGE_VERSION:
        raise ValueError(
            f"cannot write handover image version {image.version}: "
            f"this writer produces version {IMAGE_VERSION} only"
        )
    problem = _image_problem(image)
    if problem is not None:
        raise ValueError(f"invalid handover image: {problem}")

    handlers: dict[str, int] = {}
    for session in image.sessions:
        for record in session.files:
            handlers.setdefault(record.compatible, len(handlers))

    fdt = _fdt()
    tree = fdt.FDT()
    tree.header.version = _FDT_VERSION
    root = tree.root
    root.append(_prop("compatible", _cstr(IMAGE_COMPATIBLE.encode())))
    root.append(_prop("luo,version", _U32.pack(IMAGE_VERSION)))
    root.append(_prop("liveupdate-number", _U64.pack(image.liveupdate_number)))
    root.append(_prop("writer", _cstr(image.writer.encode("utf-8"))))
    root.append(_prop("session-count", _U32.pack(len(image.sessions))))
    root.append(_prop("handlers", b"".join(_cstr(h.encode("ascii")) for h in handlers)))

    for index, session in enumerate(image.sessions):
        files = session.files
        count = len(files)
        node = fdt.Node(f"{_SESSION_NODE_PREFIX}{index}")
        created_ns = round(Fraction(session.created) * _NS_PER_S)
        node.append(_prop("session-name", _cstr(bytes(session.name))))
        node.append(_prop("owner", _OWNER.pack(session.uid, session.gid, session.pid)))
        node.append(_prop("created", _U64.pack(created_ns)))
        node.append(_prop("flags", _U32.pack(session.flags)))
        node.append(_prop("file-count", _U32.pack(count)))
        node.append(_prop("file-tokens", struct.pack(f">{count}Q", *(f.token for f in files))))
        node.append(_prop("file-fds", struct.pack(f">{count}i", *(f.fd for f in files))))
        node.append(
            _prop(
                "file-handlers",
                struct.pack(f">{count}I", *(handlers[f.compatible] for f in files)),
            )
        )
        node.append(
            _prop("file-data-sizes", struct.pack(f">{count}I", *(len(f.data) for f in files)))
        )
        node.append(_prop("file-data", b"".join(f.data for f in files)))
        _attach(root, node)

    try:
        blob = tree.to_dtb()
    except struct.error as exc:
        # The header's size fields are u32: the library fails while packing them.
        raise ValueError(f"handover image too large for a flattened device tree: {exc}") from exc
    return bytes(blob)


# --------------------------------------------------------------------------
# Reader: generic, strict FDT parsing
# --------------------------------------------------------------------------


class _Node:
    """A parsed FDT node: its name, raw property values and children."""

    __slots__ = ("child_names", "children", "name", "path", "props")

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.props: dict[str, bytes] = {}
        self.children: list[_Node] = []
        self.child_names: set[str] = set()


def _corrupt(reason: str) -> CorruptImageError:
    """Build the error for a malformed image (raised by the caller)."""
    return CorruptImageError(f"corrupt handover image: {reason}")


def _parse_fdt(data: bytes) -> _Node:
    """Parse ``data`` as a DTB, checking every offset, length and nesting rule.

    Version-independent on purpose: the generic tree is built before the
    root compatible is read, so an image of an unknown LUO version is
    reported as such and not as corruption.
    """
    size = len(data)
    if size < _FDT_HEADER.size:
        raise _corrupt(f"{size} bytes is shorter than an FDT header ({_FDT_HEADER.size} bytes)")
    (
        magic,
        totalsize,
        off_struct,
        off_strings,
        off_rsvmap,
        version,
        last_comp_version,
        _boot_cpuid,
        size_strings,
        size_struct,
    ) = _FDT_HEADER.unpack_from(data, 0)
    if magic != _FDT_MAGIC:
        raise _corrupt(
            f"magic is 0x{magic:08x}, not 0x{_FDT_MAGIC:08x}: not a flattened device tree"
        )
    if version < _FDT_VERSION or last_comp_version > _FDT_VERSION:
        raise _corrupt(
            f"FDT format version {version} (compatible with {last_comp_version}) "
            f"cannot be read as version {_FDT_VERSION}"
        )
    if totalsize != size:
        raise _corrupt(f"header says {totalsize} bytes but the image has {size} bytes")

    struct_end = off_struct + size_struct
    strings_end = off_strings + size_strings
    if off_struct % 4 or size_struct % 4:
        raise _corrupt("structure block is not 4-byte aligned")
    if off_rsvmap % 8:
        raise _corrupt("memory reservation block is not 8-byte aligned")
    for label, start, end in (
        ("memory reservation block", off_rsvmap, off_rsvmap),
        ("structure block", off_struct, struct_end),
        ("strings block", off_strings, strings_end),
    ):
        if start < _FDT_HEADER.size or end > size:
            raise _corrupt(f"{label} [{start}, {end}) lies outside the image")
    if off_struct < strings_end and off_strings < struct_end:
        raise _corrupt("structure and strings blocks overlap")

    # The reservation map is meaningless for a handover image, but it must be
    # terminated: a tool walking it must not run off the end.
    pos = off_rsvmap
    while True:
        if pos + 16 > size:
            raise _corrupt("memory reservation block is not terminated")
        if not any(data[pos : pos + 16]):
            break
        pos += 16

    names: dict[int, str] = {}

    def prop_name(offset: int) -> str:
        cached = names.get(offset)
        if cached is not None:
            return cached
        if offset >= size_strings:
            raise _corrupt(f"property name offset {offset} is outside the strings block")
        start = off_strings + offset
        nul = data.find(b"\0", start, strings_end)
        if nul <= start:
            raise _corrupt(f"property name at strings offset {offset} is empty or unterminated")
        try:
            name = data[start:nul].decode("ascii")
        except UnicodeDecodeError:
            raise _corrupt(f"property name at strings offset {offset} is not ASCII") from None
        names[offset] = name
        return name

    unpack_u32 = _U32.unpack_from
    unpack_prop = _PROP_HEAD.unpack_from
    root: _Node | None = None
    stack: list[_Node] = []
    pos = off_struct
    while True:
        if pos + 4 > struct_end:
            raise _corrupt("structure block ends before FDT_END")
        (tag,) = unpack_u32(data, pos)
        pos += 4
        if tag == _FDT_PROP:
            if not stack:
                raise _corrupt(f"property outside any node at offset {pos - 4}")
            if pos + 8 > struct_end:
                raise _corrupt(f"property header at offset {pos - 4} is truncated")
            length, nameoff = unpack_prop(data, pos)
            pos += 8
            if length > struct_end - pos:
                raise _corrupt(f"property at offset {pos - 12} runs past the structure block")
            node = stack[-1]
            pname = prop_name(nameoff)
            if pname in node.props:
                raise _corrupt(f"{node.path}: duplicate property {pname!r}")
            node.props[pname] = data[pos : pos + length]
            pos = (pos + length + 3) & ~3
        elif tag == _FDT_BEGIN_NODE:
            nul = data.find(b"\0", pos, struct_end)
            if nul < 0:
                raise _corrupt(f"node name at offset {pos} is unterminated")
            try:
                name = data[pos:nul].decode("ascii")
            except UnicodeDecodeError:
                raise _corrupt(f"node name at offset {pos} is not ASCII") from None
            pos = (nul + 4) & ~3
            if not stack:
                if root is not None:
                    raise _corrupt("more than one root node")
                if name:
                    raise _corrupt(f"root node has a name ({name!r})")
                root = _Node("", "/")
                stack.append(root)
                continue
            parent = stack[-1]
            if not name or "/" in name:
                raise _corrupt(f"{parent.path}: child node name {name!r} is invalid")
            if name in parent.child_names:
                raise _corrupt(f"{parent.path}: duplicate node {name!r}")
            if len(stack) >= _FDT_MAX_DEPTH:
                raise _corrupt(f"nodes nested deeper than {_FDT_MAX_DEPTH} levels")
            path = f"/{name}" if parent is root else f"{parent.path}/{name}"
            child = _Node(name, path)
            parent.children.append(child)
            parent.child_names.add(name)
            stack.append(child)
        elif tag == _FDT_END_NODE:
            if not stack:
                raise _corrupt(f"FDT_END_NODE without a node at offset {pos - 4}")
            stack.pop()
        elif tag == _FDT_NOP:
            continue
        elif tag == _FDT_END:
            if stack:
                raise _corrupt(f"FDT_END inside node {stack[-1].path}")
            if root is None:
                raise _corrupt("structure block has no root node")
            if pos != struct_end:
                raise _corrupt(f"{struct_end - pos} bytes follow FDT_END in the structure block")
            return root
        else:
            raise _corrupt(f"unknown structure tag 0x{tag:08x} at offset {pos - 4}")


# --------------------------------------------------------------------------
# Reader: the LUO schema
# --------------------------------------------------------------------------


def _raw(node: _Node, name: str) -> bytes:
    """Return the value of a required property."""
    try:
        return node.props[name]
    except KeyError:
        raise _corrupt(f"{node.path}: missing property {name!r}") from None


def _sized(node: _Node, name: str, size: int) -> bytes:
    """Return the value of a required property that must be ``size`` bytes."""
    value = _raw(node, name)
    if len(value) != size:
        raise _corrupt(f"{node.path}: property {name!r} is {len(value)} bytes, expected {size}")
    return value


def _get_u32(node: _Node, name: str) -> int:
    """Read a required one-cell property."""
    value: int = _U32.unpack(_sized(node, name, 4))[0]
    return value


def _get_u64(node: _Node, name: str) -> int:
    """Read a required two-cell (big-endian u64) property."""
    value: int = _U64.unpack(_sized(node, name, 8))[0]
    return value


def _get_string_list(node: _Node, name: str) -> list[bytes]:
    """Read a required string list (possibly empty) as bytes without NULs."""
    value = _raw(node, name)
    if not value:
        return []
    if value[-1] != 0:
        raise _corrupt(f"{node.path}: property {name!r} is not NUL-terminated")
    return value[:-1].split(b"\0")


def _get_array(node: _Node, name: str, fmt: str, count: int) -> tuple[int, ...]:
    """Read a required packed array of ``count`` items of ``struct`` code ``fmt``."""
    value = _raw(node, name)
    expected = struct.calcsize(fmt) * count
    if len(value) != expected:
        raise _corrupt(
            f"{node.path}: property {name!r} is {len(value)} bytes, "
            f"expected {expected} for {count} files"
        )
    return struct.unpack(f">{count}{fmt}", value)


def _check_version(root: _Node) -> int:
    """Identify the image format before trusting anything else in it.

    Returns the version. Reading the version first is what lets a reader
    report "image of version 9" rather than a misleading corruption when a
    newer writer changed the layout.
    """
    compatible = _get_string_list(root, "compatible")
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
    if compatible_version not in SUPPORTED_VERSIONS:
        raise UnknownVersionError(compatible_version)
    version = _get_u32(root, "luo,version")
    if version not in SUPPORTED_VERSIONS:
        raise UnknownVersionError(version)
    if version != compatible_version:
        raise _corrupt(f"/: luo,version is {version} but compatible is {text!r}")
    return version


def _decode_session(node: _Node, handlers: list[str]) -> SessionRecord:
    """Decode one ``session-N`` node of a version 1 image."""
    if node.children:
        raise _corrupt(f"{node.path}: unexpected child node {node.children[0].name!r}")
    raw_name = _raw(node, "session-name")
    if not raw_name or raw_name[-1] != 0:
        raise _corrupt(f"{node.path}: session-name is not NUL-terminated")
    uid, gid, pid = _OWNER.unpack(_sized(node, "owner", _OWNER.size))
    created_ns = _get_u64(node, "created")
    flags = _get_u32(node, "flags")
    count = _get_u32(node, "file-count")
    tokens = _get_array(node, "file-tokens", "Q", count)
    fds = _get_array(node, "file-fds", "i", count)
    handler_ids = _get_array(node, "file-handlers", "I", count)
    sizes = _get_array(node, "file-data-sizes", "I", count)
    blob = _raw(node, "file-data")
    if sum(sizes) != len(blob):
        raise _corrupt(
            f"{node.path}: file-data is {len(blob)} bytes "
            f"but file-data-sizes add up to {sum(sizes)}"
        )
    nhandlers = len(handlers)
    files: list[FileRecord] = []
    offset = 0
    for index in range(count):
        handler = handler_ids[index]
        if handler >= nhandlers:
            raise _corrupt(
                f"{node.path}: file {index} uses handler {handler}, "
                f"but /handlers has {nhandlers} entries"
            )
        end = offset + sizes[index]
        files.append(FileRecord(tokens[index], handlers[handler], fds[index], blob[offset:end]))
        offset = end
    return SessionRecord(
        name=raw_name[:-1],
        uid=uid,
        gid=gid,
        pid=pid,
        created=created_ns / _NS_PER_S,
        flags=flags,
        files=files,
    )


def _decode_v1(root: _Node) -> HandoverImage:
    """Decode the body of a version 1 image whose version was checked."""
    number = _get_u64(root, "liveupdate-number")
    writer_raw = _raw(root, "writer")
    if not writer_raw or writer_raw[-1] != 0 or 0 in writer_raw[:-1]:
        raise _corrupt("/: writer is not a single NUL-terminated string")
    # Diagnostics only: a mangled writer string must not cost the sessions.
    writer = writer_raw[:-1].decode("utf-8", errors="replace")
    handlers: list[str] = []
    for entry in _get_string_list(root, "handlers"):
        text = entry.decode("ascii", errors="replace")
        if not _is_compatible_string(text):
            raise _corrupt(f"/: handlers entry {entry!r} is not a printable ASCII string")
        if text in handlers:
            raise _corrupt(f"/: handlers lists {text!r} twice")
        handlers.append(text)
    count = _get_u32(root, "session-count")
    if count != len(root.children):
        raise _corrupt(f"/: session-count is {count} but {len(root.children)} nodes follow")
    sessions: list[SessionRecord] = []
    for index, node in enumerate(root.children):
        expected = f"{_SESSION_NODE_PREFIX}{index}"
        if node.name != expected:
            raise _corrupt(f"/: child node {index} is {node.name!r}, expected {expected!r}")
        sessions.append(_decode_session(node, handlers))
    image = HandoverImage(liveupdate_number=number, sessions=sessions, version=1, writer=writer)
    problem = _image_problem(image)
    if problem is not None:
        raise _corrupt(problem)
    return image


def _fdt_raw_value(prop: Any) -> bytes:
    """Recover the raw bytes of a property parsed by the ``fdt`` library.

    The library guesses a type per property (strings, 32-bit words, bytes or
    empty); each guess is lossless, so the raw value can be rebuilt.
    """
    fdt = _fdt()
    if isinstance(prop, fdt.PropStrings):
        return b"".join(_cstr(s.encode("ascii")) for s in prop.data)
    if isinstance(prop, fdt.PropWords):
        return struct.pack(f">{len(prop.data)}I", *prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def _cross_check(data: bytes, root: _Node) -> None:
    """Require the ``fdt`` library to read the same tree as :func:`_parse_fdt`.

    Two independent readers agreeing is evidence that the image is what it
    claims to be and that standard tools will show an operator the same
    thing the daemon acts on.
    """
    try:
        tree = _fdt().parse_dtb(data)
    except Exception as exc:  # the library raises bare Exception, AssertionError, ...
        raise _corrupt(f"the fdt library cannot parse the image: {exc!r}") from exc
    pending: list[tuple[Any, _Node]] = [(tree.root, root)]
    while pending:
        theirs, ours = pending.pop()
        their_props = {p.name: _fdt_raw_value(p) for p in theirs.props}
        if their_props != ours.props:
            raise _corrupt(f"{ours.path}: the fdt library reads different properties")
        if [n.name for n in theirs.nodes] != [n.name for n in ours.children]:
            raise _corrupt(f"{ours.path}: the fdt library reads different child nodes")
        pending.extend(zip(theirs.nodes, ours.children, strict=True))


def decode_image(
    data: bytes | bytearray | memoryview, *, cross_check: bool = False
) -> HandoverImage:
    """Parse and fully validate a handover image.

    Every offset, length and count is checked, as are the record rules the
    writer enforces (name lengths, duplicate session names, duplicate tokens
    within a session, an fd number carried twice), so that a generation never
    restores half of an image: either all of it decodes, or nothing is
    touched and the caller keeps every inherited fd.

    Args:
        data: The image bytes, exactly as written (the FDT ``totalsize`` must
            equal ``len(data)``: trailing bytes are treated as corruption).
        cross_check: Also parse the image with the ``fdt`` library and
            require it to see the same tree. Costs about 0.4 s for 2000
            sessions, so it is meant for pre-flight checks and inspection
            tools rather than the reboot path.

    Raises:
        UnknownVersionError: The root compatible is ``"luo-v<N>"`` or
            ``luo,version`` is N, with N not in :data:`SUPPORTED_VERSIONS`.
        CorruptImageError: Anything else is wrong, including a root
            compatible that is not a LUO one at all.
        TypeError: ``data`` is not a bytes-like object (a caller bug, not
            a property of the image).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode_image() expects bytes, not {type(data).__name__}")
    buffer = bytes(data)
    root = _parse_fdt(buffer)
    _check_version(root)
    image = _decode_v1(root)
    if cross_check:
        _cross_check(buffer, root)
    return image


# --------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------


def _name_to_json(name: bytes) -> tuple[str, str]:
    """Return ``(text, encoding)`` for a name: UTF-8 when possible, else hex."""
    try:
        return name.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return name.hex(), "hex"


def image_to_dict(image: HandoverImage) -> dict[str, Any]:
    """Convert ``image`` into plain JSON types for ``luoctl inspect --json``.

    Session names become text when they are valid UTF-8 and hex otherwise;
    ``name_encoding`` says which, because a hex string is also valid UTF-8
    and a consumer could not tell them apart. Handler data is always hex (it
    is opaque), with its size alongside so a reader need not count digits.
    """
    sessions: list[dict[str, Any]] = []
    for session in image.sessions:
        name, encoding = _name_to_json(bytes(session.name))
        sessions.append(
            {
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
        )
    return {
        "compatible": f"luo-v{image.version}",
        "version": image.version,
        "liveupdate_number": image.liveupdate_number,
        "writer": image.writer,
        "sessions": sessions,
    }
