"""The handover image ABI: the schema one ``luod`` generation leaves the next.

This module is the Python twin of Linux's ``include/linux/kho/abi/luo.h``: it
describes the image and does nothing else. The node and property names, the
byte layout of every property, the format versions, the root compatible
string and the session flags that only exist in the image live here, next to
the records an image decodes to and the errors a reader raises. Whoever reads
or writes an image imports it: the codec (:mod:`liveupdate.handover_codec`),
the core (which fills and consumes the records) and ``luoctl inspect`` (which
must not import the core). Like :mod:`liveupdate.uapi`, it is stdlib only.

The image is a Flattened Device Tree (DTB, format version 17), the format of
Kexec HandOver (KHO), so that standard tools (``dtc -I dtb -O dts``,
``fdtdump``) show an operator what a generation handed over without any
project code. Version 1 of the schema::

    / {
        compatible = "luo-v1";             // IMAGE_COMPATIBLE
        luo,version = <1>;                 // IMAGE_VERSION, u32
        liveupdate-number = <hi lo>;       // u64: generation that wrote this
        writer = "luod 0.1.0 pid 123";     // diagnostics only
        session-count = <N>;               // u32: number of session-K nodes
        handlers = "memfd-v1", ...;        // string list, indexed below
        cold-started = <hi lo>;            // u64 ns, optional: the line's cold start
        reboot-started = <hi lo>;          // u64 ns, optional: REBOOT began
        frozen = <hi lo>;                  // u64 ns, optional: the freeze began
        participant-count = <M>;           // u32, optional (absent: 0)
        session-0 {                        // SESSION_NODE_PREFIX + index
            session-name = "db";           // name bytes + NUL
            owner = <uid gid pid>;         // OWNER_LAYOUT
            created = <hi lo>;             // u64 nanoseconds since the epoch
            flags = <0>;                   // u32, see IMAGE_FLAG_*
            file-count = <n>;              // u32
            file-tokens = <...>;           // n x u64
            file-fds = <...>;              // n x s32 (FD_NONE: no fd carried)
            file-handlers = <...>;         // n x u32 index into /handlers
            file-data-sizes = <...>;       // n x u32
            file-data = [...];             // the n data blobs, concatenated
        };
        ...
        participant-0 {                    // PARTICIPANT_NODE_PREFIX + index, after sessions
            participant-name = "vmm";      // name bytes + NUL
            owner = <uid gid pid>;         // OWNER_LAYOUT
            participant-data = [...];      // 0 to 256 bytes (LUOD_PARTICIPANT_DATA_MAX)
        };
        ...
    };

Every multi-byte value is big-endian, as everywhere in an FDT. Files are
packed into per-session arrays rather than one node per file: a node per
file multiplies the node count by the file count for no gain in what a tool
can show (see ``docs/concepts/handover.md`` for the measurements).

Participants (``LUOD_IOCTL_REGISTER_PARTICIPANT``) were added to version 1
without a version bump: an image without participants is byte for byte what
it was, and a reader older than them refuses an image with participant
nodes as corrupt (an unexpected child node), which the pre-flight turns into
a failed PREPARE or REBOOT: nothing is misread, nothing is lost.

Versioning rule: a change that a reader of the previous version could
misread bumps :data:`IMAGE_VERSION` and the compatible string together; an
added property that older readers may ignore does not (readers ignore
properties they do not know).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "COMPATIBLE_PREFIX",
    "FDT_FORMAT_VERSION",
    "FD_NONE",
    "FILE_ARRAYS",
    "IMAGE_COMPATIBLE",
    "IMAGE_FLAG_AWAITING_SUCCESSOR",
    "IMAGE_VERSION",
    "MAX_PARTICIPANT_DATA",
    "MAX_SESSION_NAME_LENGTH",
    "NS_PER_S",
    "OWNER_LAYOUT",
    "PARTICIPANT_NODE_PREFIX",
    "PROP_COLD_STARTED",
    "PROP_COMPATIBLE",
    "PROP_CREATED",
    "PROP_FILE_COUNT",
    "PROP_FILE_DATA",
    "PROP_FILE_DATA_SIZES",
    "PROP_FILE_FDS",
    "PROP_FILE_HANDLERS",
    "PROP_FILE_TOKENS",
    "PROP_FLAGS",
    "PROP_FROZEN",
    "PROP_HANDLERS",
    "PROP_LIVEUPDATE_NUMBER",
    "PROP_OWNER",
    "PROP_PARTICIPANT_COUNT",
    "PROP_PARTICIPANT_DATA",
    "PROP_PARTICIPANT_NAME",
    "PROP_REBOOT_STARTED",
    "PROP_SESSION_COUNT",
    "PROP_SESSION_NAME",
    "PROP_VERSION",
    "PROP_WRITER",
    "REBOOT_TIME_PROPS",
    "SESSION_NODE_PREFIX",
    "SUPPORTED_VERSIONS",
    "U32_LAYOUT",
    "U64_LAYOUT",
    "CorruptImageError",
    "FileRecord",
    "HandoverError",
    "HandoverImage",
    "ParticipantRecord",
    "SessionRecord",
    "UnknownVersionError",
]

# --------------------------------------------------------------------------
# Versions and identification
# --------------------------------------------------------------------------

COMPATIBLE_PREFIX: Final = "luo-v"
"""Root ``compatible`` strings of LUO images are this prefix plus the version.

The version is part of the string, as for KHO and handler compatibles, so
that a generic FDT tool identifies the format and its revision at a glance,
and so that a reader can tell "a LUO image of another version" (EIO with the
version named) from "not a LUO image at all".
"""

IMAGE_VERSION: Final = 1
"""Format version written into ``luo,version`` (and the compatible string).

Bumped whenever a reader of the previous version could misread a new image;
adding a property that older readers may safely ignore does not bump it.
"""

IMAGE_COMPATIBLE: Final = f"{COMPATIBLE_PREFIX}{IMAGE_VERSION}"
"""Root ``compatible`` string of the images this version writes (``luo-v1``)."""

SUPPORTED_VERSIONS: Final = frozenset({1})
"""Image versions this code reads.

A new ``luod`` must keep reading every version an older ``luod`` may have
written, otherwise an upgrade by live update would strand the preserved state.
"""

FDT_FORMAT_VERSION: Final = 17
"""Flattened Device Tree format version of the container.

Version 17 is the one KHO and every current tool use; it is the first with
``size_dt_struct`` in the header, which lets a reader bound the structure
block without walking it. Older FDT versions are refused.
"""

# --------------------------------------------------------------------------
# Node and property names
# --------------------------------------------------------------------------

PROP_COMPATIBLE: Final = "compatible"
"""Root: exactly one string, :data:`COMPATIBLE_PREFIX` + version.

Read before anything else, so that an image of an unknown version is reported
as such rather than as corruption.
"""

PROP_VERSION: Final = "luo,version"
"""Root, u32: the format version, which must agree with the compatible string.

Vendor-prefixed (``luo,``) as the devicetree conventions ask of properties
that are not standard, so no generic binding can give it another meaning.
"""

PROP_LIVEUPDATE_NUMBER: Final = "liveupdate-number"
"""Root, u64: the generation that wrote the image (it only grows)."""

PROP_WRITER: Final = "writer"
"""Root, one NUL-terminated string: who wrote the image, for diagnostics only.

A reader never acts on it, so a mangled writer never costs the sessions.
"""

PROP_SESSION_COUNT: Final = "session-count"
"""Root, u32: the number of session nodes that follow.

Redundant with the nodes on purpose: a node lost or added by corruption is
then detected instead of silently dropping or inventing a session.
"""

PROP_HANDLERS: Final = "handlers"
"""Root, string list: every handler compatible the files use, each once.

Files refer to handlers by index (``file-handlers``) so that 10000 memfds do
not repeat ``"memfd-v1"`` 10000 times. Printable ASCII only, so ``dtc``
prints the list as strings.
"""

PROP_COLD_STARTED: Final = "cold-started"
"""Root, u64, optional: when the cold start of this line of generations
happened, in nanoseconds since the epoch (``CLOCK_REALTIME``); each live
update carries it on, so that the operator sees the daemon's uptime. Absent
(an older writer) or 0: unknown, and the reader takes its own start.
"""

PROP_REBOOT_STARTED: Final = "reboot-started"
"""Root, u64, optional: when the REBOOT that wrote this image began, in
nanoseconds since the epoch (0 or absent: unknown). With the next
generation's start it gives the reboot's duration.
"""

PROP_FROZEN: Final = "frozen"
"""Root, u64, optional: when this image's freeze began, in nanoseconds since
the epoch (0 or absent: unknown): from then on no call is served until the
next generation serves, which measures the blackout from it.
"""

REBOOT_TIME_PROPS: Final = (PROP_REBOOT_STARTED, PROP_FROZEN)
"""The root properties a writer stamps at the freeze, after the pre-flight
checked the image's bytes: fixed-size u64 cells, always written, so that the
stamp replaces them in place (the pre-flight's bytes are reused, not encoded
again, and the successor still recognises the image it checked).
"""

SESSION_NODE_PREFIX: Final = "session-"
"""Session nodes are named this prefix plus 0, 1, ... in order, without gaps.

Session names are arbitrary bytes and cannot be node names (which are ASCII
with a restricted alphabet), hence numbered nodes carrying the name in
:data:`PROP_SESSION_NAME`. The order is the sessions' creation order, the
order in which the next generation restores them.
"""

PROP_SESSION_NAME: Final = "session-name"
"""Session, name bytes + NUL: 1 to :data:`MAX_SESSION_NAME_LENGTH` bytes, no NUL inside."""

PROP_OWNER: Final = "owner"
"""Session, :data:`OWNER_LAYOUT`: the creator's uid, gid and pid.

Kept so that owner checks still apply to the session in the next generation.
"""

PROP_CREATED: Final = "created"
"""Session, u64: creation time in whole nanoseconds since the epoch.

Integer nanoseconds, not a float, so every clock reading round-trips exactly.
"""

PROP_FLAGS: Final = "flags"
"""Session, u32: the ``LUOD_SESSION_*`` flags plus the image-only ``IMAGE_FLAG_*`` bits."""

PROP_FILE_COUNT: Final = "file-count"
"""Session, u32: the number of files, which sizes each of :data:`FILE_ARRAYS`."""

PROP_FILE_TOKENS: Final = "file-tokens"
"""Session, ``file-count`` x u64: each file's token (unique within the session)."""

PROP_FILE_FDS: Final = "file-fds"
"""Session, ``file-count`` x s32: the descriptor each file is inherited at, or :data:`FD_NONE`.

No descriptor number appears twice in an image: one inherited open file
belongs to exactly one record.
"""

PROP_FILE_HANDLERS: Final = "file-handlers"
"""Session, ``file-count`` x u32: each file's index into :data:`PROP_HANDLERS`."""

PROP_FILE_DATA_SIZES: Final = "file-data-sizes"
"""Session, ``file-count`` x u32: the size of each file's handler data."""

PROP_FILE_DATA: Final = "file-data"
"""Session, bytes: the handlers' data, concatenated in file order.

Its length must equal the sum of :data:`PROP_FILE_DATA_SIZES`.
"""

PROP_PARTICIPANT_COUNT: Final = "participant-count"
"""Root, u32, optional (absent: 0): the number of participant nodes after the
session nodes. Written only when there are participants, so that an image
without any is the one older readers know."""

PARTICIPANT_NODE_PREFIX: Final = "participant-"
"""Participant nodes are named this prefix plus 0, 1, ..., after every session
node, in the participants' registration order (the order they were frozen)."""

PROP_PARTICIPANT_NAME: Final = "participant-name"
"""Participant, name bytes + NUL: 1 to :data:`MAX_SESSION_NAME_LENGTH` bytes, no NUL inside."""

PROP_PARTICIPANT_DATA: Final = "participant-data"
"""Participant, bytes: the data its answers set (0 to :data:`MAX_PARTICIPANT_DATA` bytes).

A participant node also has :data:`PROP_OWNER`: the next generation gives the
data back to a participant of the same uid (or root) only.
"""

MAX_PARTICIPANT_DATA: Final = 256
"""Largest ``participant-data``: ``LUOD_PARTICIPANT_DATA_MAX`` of the UAPI."""

# --------------------------------------------------------------------------
# Value layouts
# --------------------------------------------------------------------------

U32_LAYOUT: Final = struct.Struct(">I")
"""One FDT cell: ``luo,version``, ``session-count``, ``flags``, ``file-count``."""

U64_LAYOUT: Final = struct.Struct(">Q")
"""Two FDT cells, most significant first: ``liveupdate-number``, ``created``."""

OWNER_LAYOUT: Final = struct.Struct(">3I")
"""``owner``: uid, gid, pid as three u32 cells."""

FILE_ARRAYS: Final = (
    (PROP_FILE_TOKENS, "Q"),
    (PROP_FILE_FDS, "i"),
    (PROP_FILE_HANDLERS, "I"),
    (PROP_FILE_DATA_SIZES, "I"),
)
"""The per-file arrays of a session node and the :mod:`struct` code of one item.

Each holds exactly ``file-count`` items, big-endian; item ``i`` of every
array describes the same file.
"""

FD_NONE: Final = -1
"""``file-fds`` entry of a file carried without a descriptor (all in its data)."""

NS_PER_S: Final = 1_000_000_000
"""Unit of ``created``: nanoseconds."""

MAX_SESSION_NAME_LENGTH: Final = 63
"""Longest session name in bytes: the 64-byte UAPI field minus its NUL."""

# --------------------------------------------------------------------------
# Session flags that exist only in the image
# --------------------------------------------------------------------------

IMAGE_FLAG_AWAITING_SUCCESSOR: Final = 1 << 31
"""The session was handed over (per-session update or keep-on-close) and
still waits for its successor to retrieve it.

The state must survive the reboot, or the next generation would release a
session whose successor has not come yet. Bit 31 is far from the
``LUOD_SESSION_*`` flags of the UAPI, which grow from bit 0, so the two never
meet; the bit is never visible to clients (the core strips it on restore).
"""

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
            exec, or :data:`FD_NONE` when the handler carries the file some
            other way (everything it needs is then in :attr:`data`).
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
        flags: Session flags (u32): the UAPI's plus :data:`IMAGE_FLAG_AWAITING_SUCCESSOR`.
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
class ParticipantRecord:
    """One participant at the freeze, and the data it carries to the next generation.

    Attributes:
        name: The participant's name, 1 to 63 bytes without NUL.
        uid: User id of the process that registered it (owner checks).
        gid: Its group id.
        pid: Its process id, for diagnostics.
        data: What its answers set, 0 to :data:`MAX_PARTICIPANT_DATA` bytes.
    """

    name: bytes
    uid: int
    gid: int
    pid: int
    data: bytes = b""


@dataclass
class HandoverImage:
    """Everything one generation hands to the next, besides the fds.

    Attributes:
        liveupdate_number: The generation that wrote the image (u64). It only
            grows (1, 2, ...), which lets the next generation number itself
            and lets an operator tell two images apart.
        sessions: The sessions handed over, in creation order.
        version: Format version of the image; the writer only writes
            :data:`IMAGE_VERSION`, the reader reports what it read.
        writer: Free text naming the program that wrote the image (e.g.
            ``"luod 0.1.0 pid 123"``), only for diagnostics.
        cold_started_ns: :data:`PROP_COLD_STARTED` (0: unknown).
        reboot_started_ns: :data:`PROP_REBOOT_STARTED` (0: unknown).
        frozen_ns: :data:`PROP_FROZEN` (0: unknown). This field and the one
            above are left out of comparisons: two images that hand over the
            same sessions are equal whenever their reboot began.
        participants: The participants frozen, in registration order.
    """

    liveupdate_number: int
    sessions: list[SessionRecord]
    version: int = IMAGE_VERSION
    writer: str = ""
    cold_started_ns: int = 0
    reboot_started_ns: int = field(default=0, compare=False)
    frozen_ns: int = field(default=0, compare=False)
    participants: list[ParticipantRecord] = field(default_factory=list)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class HandoverError(Exception):
    """An image cannot be restored; nothing it describes may be released.

    A reader raises only this family on any input, so a daemon can catch it
    in one place, refuse the device with ``EIO`` and keep holding the image
    and every inherited fd for inspection or a retry by a fixed version.

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
