"""The Live Update Orchestrator userspace API, byte for byte.

This module is the Python twin of Linux's ``include/uapi/linux/liveupdate.h``
plus the extension blocks that only ``luod`` implements. Everything the other
layers know about the ABI comes from here: ioctl numbers, struct layouts
(``ctypes``), which fields carry file descriptors and which session direction
an operation is valid on.

Design rules the structs follow (from the review of the LUO ioctl interface):

* every ioctl has its own struct, whose first field is ``u32 size``;
* ioctl numbers are ``_IO(LIVEUPDATE_IOCTL_TYPE, nr)``: no direction, no size;
* numbers are packed from a named base inside one enum-like block, so that two
  additions can never take the same number;
* fields are fixed-width, file descriptors are ``s32``, ``u64`` is 8-aligned,
  there is no implicit padding;
* the documentation lives on the struct (``struct NAME - ioctl(IOCTL_NAME)``,
  then one line per field), and the API reference is generated from it.

Struct class names keep the Linux spelling on purpose, so that C headers,
kernel documentation and this module can be read side by side.

Longer than the ~500 lines other modules keep to, on purpose: it is the
whole ABI in one place, like the header it mirrors, and splitting it would
separate a struct from its number and its registry entry.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "IOCTLS",
    "LIVEUPDATE_CMD_BASE",
    "LIVEUPDATE_CMD_SESSION_BASE",
    "LIVEUPDATE_IOCTL_CREATE_SESSION",
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
    "LIVEUPDATE_IOCTL_TYPE",
    "LIVEUPDATE_SESSION_FINISH",
    "LIVEUPDATE_SESSION_GET_NAME",
    "LIVEUPDATE_SESSION_NAME_LENGTH",
    "LIVEUPDATE_SESSION_PRESERVE_FD",
    "LIVEUPDATE_SESSION_RETRIEVE_FD",
    "LUOD_CMD_BASE",
    "LUOD_CMD_SESSION_BASE",
    "LUOD_ERROR_LENGTH",
    "LUOD_IOCTL_GET_STATE",
    "LUOD_IOCTL_LIST_SESSIONS",
    "LUOD_IOCTL_REGISTER_PARTICIPANT",
    "LUOD_IOCTL_SET_EVENT",
    "LUOD_LIST_FILES",
    "LUOD_LIST_FLAGS",
    "LUOD_PARTICIPANT_ANSWER_DATA",
    "LUOD_PARTICIPANT_ANSWER_FLAGS",
    "LUOD_PARTICIPANT_DATA_MAX",
    "LUOD_PARTICIPANT_TIMEOUT_MS",
    "LUOD_REBOOT_NO_EXEC",
    "LUOD_SERVICE_PID_MAX",
    "LUOD_SESSION_FLAGS",
    "LUOD_SESSION_KEEP_ON_CLOSE",
    "LUOD_SESSION_SET_FLAGS",
    "LUOD_SESSION_SET_SERVICE",
    "LUOD_SESSION_SYNC",
    "LUOD_SESSION_UNPRESERVE_FD",
    "LUOD_SESSION_UPDATE",
    "LUOD_SET_EVENT_FLAGS",
    "LUOD_STATE_LOST_INCOMPLETE",
    "PARTICIPANT_MESSAGES",
    "_IO",
    "_IOC_DIR_SIZE",
    "_IOC_NR",
    "_IOC_TYPE",
    "FdKind",
    "IoctlInfo",
    "LiveupdateCmd",
    "LiveupdateSessionCmd",
    "LuodCmd",
    "LuodCopies",
    "LuodEvent",
    "LuodParticipantEvent",
    "LuodSessionCmd",
    "LuodState",
    "MessageInfo",
    "SessionDirection",
    "liveupdate_ioctl_create_session",
    "liveupdate_ioctl_retrieve_session",
    "liveupdate_session_finish",
    "liveupdate_session_get_name",
    "liveupdate_session_preserve_fd",
    "liveupdate_session_retrieve_fd",
    "luod_get_state",
    "luod_list_sessions",
    "luod_participant_answer",
    "luod_participant_event",
    "luod_register_participant",
    "luod_session_set_flags",
    "luod_session_set_service",
    "luod_session_sync",
    "luod_session_unpreserve_fd",
    "luod_session_update",
    "luod_set_event",
    "min_size",
]

# ---------------------------------------------------------------------------
# Number encoding (x86-64, arm64, riscv: the asm-generic layout)
# ---------------------------------------------------------------------------

#: The ioctl type byte of every LUO command.
LIVEUPDATE_IOCTL_TYPE: Final = 0xBA

#: Size of a session name field, terminating NUL included.
LIVEUPDATE_SESSION_NAME_LENGTH: Final = 64

_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS


def _IO(type_: int, nr: int) -> int:
    """Build an ioctl number with no direction and no size, like ``_IO()``."""
    return (type_ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def _IOC_TYPE(cmd: int) -> int:
    """The type byte of an ioctl number."""
    return (cmd >> _IOC_TYPESHIFT) & 0xFF


def _IOC_NR(cmd: int) -> int:
    """The command number within its type."""
    return (cmd >> _IOC_NRSHIFT) & 0xFF


def _IOC_DIR_SIZE(cmd: int) -> int:
    """Direction and size bits (16..31); zero for every valid LUO number."""
    return (cmd >> _IOC_SIZESHIFT) & 0xFFFF


# ---------------------------------------------------------------------------
# Command blocks. Each block is packed from its base: a new command is added
# at the end of its block and takes the next number automatically.
# ---------------------------------------------------------------------------

#: First command nr on the device (``/dev/liveupdate`` or luod's socket).
LIVEUPDATE_CMD_BASE: Final = 0x00
#: First command nr on a session fd.
LIVEUPDATE_CMD_SESSION_BASE: Final = 0x40
#: First nr of luod's device extensions (never used by upstream Linux).
LUOD_CMD_BASE: Final = 0x80
#: First nr of luod's session extensions (never used by upstream Linux).
LUOD_CMD_SESSION_BASE: Final = 0xC0


class LiveupdateCmd(enum.IntEnum):
    """Upstream device commands (``LIVEUPDATE_CMD_*``)."""

    CREATE_SESSION = LIVEUPDATE_CMD_BASE
    RETRIEVE_SESSION = enum.auto()


class LiveupdateSessionCmd(enum.IntEnum):
    """Upstream session commands (``LIVEUPDATE_CMD_SESSION_*``)."""

    PRESERVE_FD = LIVEUPDATE_CMD_SESSION_BASE
    RETRIEVE_FD = enum.auto()
    FINISH = enum.auto()
    GET_NAME = enum.auto()


class LuodCmd(enum.IntEnum):
    """luod's device extensions (``LUOD_CMD_*``), packed from 0x80.

    New extensions are appended at the end, so they can never collide with
    each other or with upstream numbers.
    """

    GET_STATE = LUOD_CMD_BASE
    SET_EVENT = enum.auto()
    LIST_SESSIONS = enum.auto()
    REGISTER_PARTICIPANT = enum.auto()


class LuodSessionCmd(enum.IntEnum):
    """luod's session extensions (``LUOD_CMD_SESSION_*``), packed from 0xC0."""

    UPDATE = LUOD_CMD_SESSION_BASE
    SET_FLAGS = enum.auto()
    UNPRESERVE_FD = enum.auto()
    SYNC = enum.auto()
    SET_SERVICE = enum.auto()


LIVEUPDATE_IOCTL_CREATE_SESSION: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LiveupdateCmd.CREATE_SESSION)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION: Final = _IO(
    LIVEUPDATE_IOCTL_TYPE, LiveupdateCmd.RETRIEVE_SESSION
)
LIVEUPDATE_SESSION_PRESERVE_FD: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LiveupdateSessionCmd.PRESERVE_FD)
LIVEUPDATE_SESSION_RETRIEVE_FD: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LiveupdateSessionCmd.RETRIEVE_FD)
LIVEUPDATE_SESSION_FINISH: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LiveupdateSessionCmd.FINISH)
LIVEUPDATE_SESSION_GET_NAME: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LiveupdateSessionCmd.GET_NAME)
LUOD_IOCTL_GET_STATE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodCmd.GET_STATE)
LUOD_IOCTL_SET_EVENT: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodCmd.SET_EVENT)
LUOD_IOCTL_LIST_SESSIONS: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodCmd.LIST_SESSIONS)
LUOD_IOCTL_REGISTER_PARTICIPANT: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodCmd.REGISTER_PARTICIPANT)
LUOD_SESSION_UPDATE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodSessionCmd.UPDATE)
LUOD_SESSION_SET_FLAGS: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodSessionCmd.SET_FLAGS)
LUOD_SESSION_UNPRESERVE_FD: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodSessionCmd.UNPRESERVE_FD)
LUOD_SESSION_SYNC: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodSessionCmd.SYNC)
LUOD_SESSION_SET_SERVICE: Final = _IO(LIVEUPDATE_IOCTL_TYPE, LuodSessionCmd.SET_SERVICE)


# ---------------------------------------------------------------------------
# Structs
# ---------------------------------------------------------------------------

_NameField = ctypes.c_uint8 * LIVEUPDATE_SESSION_NAME_LENGTH


class liveupdate_ioctl_create_session(ctypes.Structure):
    """struct liveupdate_ioctl_create_session - ioctl(LIVEUPDATE_IOCTL_CREATE_SESSION)

    @size: Input; sizeof(struct liveupdate_ioctl_create_session).
    @fd: Output; the new session's file descriptor (close-on-exec). Its input value is ignored.
    @name: Input; the session name: 1 to 63 bytes followed by a NUL.

    Creates an outgoing session: a named group of files that is preserved
    across the next live update for as long as its fd stays open.

    Return: 0 and the session fd in @fd; EINVAL for an empty name or one
    without a NUL, ENOMEM when the session limit is reached, EEXIST when an
    outgoing session already has this name.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("name", _NameField),
    ]


class liveupdate_ioctl_retrieve_session(ctypes.Structure):
    """struct liveupdate_ioctl_retrieve_session - ioctl(LIVEUPDATE_IOCTL_RETRIEVE_SESSION)

    @size: Input; sizeof(struct liveupdate_ioctl_retrieve_session).
    @fd: Output; the retrieved session's file descriptor (close-on-exec).
    @name: Input; the name of an incoming session, NUL-terminated.

    Opens a session handed over by the previous generation. A session can
    be retrieved once; its files are then taken back with
    LIVEUPDATE_SESSION_RETRIEVE_FD and it is closed with LIVEUPDATE_SESSION_FINISH.

    Return: 0 and the session fd in @fd; ENOENT when no incoming session has
    this name, EINVAL when it was already retrieved or the name is malformed.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("name", _NameField),
    ]


class liveupdate_session_preserve_fd(ctypes.Structure):
    """struct liveupdate_session_preserve_fd - ioctl(LIVEUPDATE_SESSION_PRESERVE_FD)

    @size: Input; sizeof(struct liveupdate_session_preserve_fd).
    @fd: Input; the file descriptor to preserve (on luod's socket it travels as SCM_RIGHTS).
    @token: Input; a 64-bit key, unique within the session, to retrieve the file by.

    Adds a file to an outgoing session. The orchestrator keeps its own
    reference: the caller may close @fd afterwards.

    Return: 0; EINVAL on an incoming session, EEXIST when @token is taken,
    ENOSPC when the session is full, EBADF for an unusable fd, ENOENT when no
    handler can preserve this kind of file, EBUSY when the file is already
    preserved.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("token", ctypes.c_uint64),
    ]


class liveupdate_session_retrieve_fd(ctypes.Structure):
    """struct liveupdate_session_retrieve_fd - ioctl(LIVEUPDATE_SESSION_RETRIEVE_FD)

    @size: Input; sizeof(struct liveupdate_session_retrieve_fd).
    @fd: Output; a new file descriptor for the preserved file (close-on-exec).
    @token: Input; the token the file was preserved under.

    Takes a file back from an incoming session. It may be repeated: every
    success returns a new fd to the same open file; a failure is sticky.

    Return: 0 and the fd in @fd; EINVAL on an outgoing session, ENOENT for an
    unknown token or after FINISH.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("token", ctypes.c_uint64),
    ]


class liveupdate_session_finish(ctypes.Structure):
    """struct liveupdate_session_finish - ioctl(LIVEUPDATE_SESSION_FINISH)

    @size: Input; sizeof(struct liveupdate_session_finish).
    @reserved: Input; must be 0.

    Completes an incoming session: every file is first asked whether it can
    finish, then all are finished; files never retrieved are discarded. A
    second FINISH succeeds and does nothing.

    Return: 0; EINVAL on an outgoing session or when @reserved is not 0,
    EBUSY when a file refuses to finish yet (nothing changed).
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class liveupdate_session_get_name(ctypes.Structure):
    """struct liveupdate_session_get_name - ioctl(LIVEUPDATE_SESSION_GET_NAME)

    @size: Input; sizeof(struct liveupdate_session_get_name).
    @reserved: Input; must be 0.
    @name: Output; the session's name, NUL-terminated.

    Reads the name of any session, outgoing or incoming.

    Return: 0 and the name in @name; EINVAL when @reserved is not 0.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("name", _NameField),
    ]


# -- luod device extensions ---------------------------------------------------


class LuodState(enum.IntEnum):
    """``luod_get_state.state``: the v2 state machine's states."""

    #: Serving; no update under way.
    NORMAL = 0
    #: PREPARE passed its pre-flight; a REBOOT is expected.
    PREPARED = 1
    #: Transient, during a reboot: sessions frozen, image being written.
    FROZEN = 2
    #: Incoming sessions exist that are not all finished yet.
    UPDATED = 3


class LuodEvent(enum.IntEnum):
    """``luod_set_event.event``: what to do to the state machine."""

    #: Pre-flight: the code that runs next must read this generation's image.
    PREPARE = 1
    #: Back from PREPARED.
    CANCEL = 2
    #: The live update of luod: freeze, hand over, re-execute.
    REBOOT = 3
    #: Finish every incoming session.
    FINISH = 4


#: ``luod_set_event.flags`` for REBOOT: start the next generation within the
#: same process, without exec.
LUOD_REBOOT_NO_EXEC: Final = 1 << 0
#: Every flag bit this implementation knows.
LUOD_SET_EVENT_FLAGS: Final = LUOD_REBOOT_NO_EXEC
#: Size of ``luod_get_state.last_error``.
LUOD_ERROR_LENGTH: Final = 256
#: ``luod_get_state.flags``: the loss report at start is incomplete (a stale journal).
LUOD_STATE_LOST_INCOMPLETE: Final = 1 << 0


class LuodCopies(enum.IntEnum):
    """``luod_get_state.copies``: where luod keeps a copy of every preserved fd,
    so that its crash loses nothing (``docs/concepts/crash-safety.md``)."""

    #: No copies (``--keeper off``, or they could not start): a crash loses what luod holds.
    OFF = 0
    #: luod's keeper process.
    KEEPER = 1
    #: systemd's fd store (``FileDescriptorStoreMax=``).
    FDSTORE = 2


class luod_get_state(ctypes.Structure):
    """struct luod_get_state - ioctl(LUOD_IOCTL_GET_STATE)

    @size: Input; sizeof(struct luod_get_state).
    @state: Output; the state machine's state (enum LuodState: NORMAL, PREPARED, FROZEN, UPDATED).
    @generation: Output; this generation's live update number (1 after a cold start).
    @outgoing_sessions: Output; sessions created in this generation and still open.
    @incoming_sessions: Output; sessions handed over and not yet released.
    @preserved_files: Output; files held in those sessions.
    @max_sessions: Output; the outgoing session limit (CREATE_SESSION answers ENOMEM beyond).
    @max_files: Output; the per-session file limit (PRESERVE_FD answers ENOSPC beyond).
    @lost_sessions: Output; sessions reported lost at start because the previous holder died.
    @last_error: Output; why the last state event failed (NUL-terminated text, empty if none;
     a CANCEL keeps the reason of the failure before it).
    @journal_error: Output; errno of the journal's last failed write, 0 when it is up to date
     or disabled. While not 0, a death of luod would lose files without a full report.
    @flags: Output; LUOD_STATE_LOST_INCOMPLETE when the previous holder's journal was out of
     date as it died, so that @lost_sessions is only a lower bound.
    @pid: Output; the process id of the luod serving this generation.
    @copies: Output; where the crash copies of every preserved fd are kept (enum LuodCopies:
     OFF, KEEPER, FDSTORE).
    @copies_error: Output; errno of the last failed copy, 0 when every preserved fd and the
     state are copied. With @copies OFF, why the copies could not start (0: turned off).
    @last_reboot_error: Output; errno of the last REBOOT that failed in this generation
     (0: none failed; a REBOOT that succeeds ends the generation).
    @recovered_sessions: Output; sessions given back by the crash copies at this start.
    @recovered_files: Output; files given back by the crash copies at this start.
    @fd_limit: Output; luod's RLIMIT_NOFILE soft limit (0xffffffff: unlimited).
    @fds_open: Output; file descriptors luod has open now.
    @fd_reserve: Output; fds of @fd_limit kept free for luod's own work (a reboot):
     CREATE_SESSION and PRESERVE_FD that would use them fail with EMFILE.
    @fds_per_file: Output; fds one preserved file costs: 2 with the copies on (one in luod,
     one in the keeper or the fd store), 1 without.
    @started_ns: Output; CLOCK_REALTIME nanoseconds when this generation started serving.
    @cold_started_ns: Output; CLOCK_REALTIME nanoseconds of the cold start of this line of
     generations (a live update keeps it, a restart after a crash begins a new line).
    @last_reboot_ns: Output; CLOCK_REALTIME nanoseconds when the live update that started this
     generation ended (0: it was a cold start).
    @last_reboot_blackout_ns: Output; nanoseconds from the freeze of that live update to this
     generation serving (0: a cold start, or not known).

    Reads the orchestrator's state. Only @size up to @generation is mandatory:
    an older, shorter struct gets the fields it knows (@journal_error and
    @flags were appended later, then @pid to @last_reboot_blackout_ns). Every
    field is computed when asked, never on the path of the other calls.

    Return: 0.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("state", ctypes.c_uint32),
        ("generation", ctypes.c_uint64),
        ("outgoing_sessions", ctypes.c_uint32),
        ("incoming_sessions", ctypes.c_uint32),
        ("preserved_files", ctypes.c_uint32),
        ("max_sessions", ctypes.c_uint32),
        ("max_files", ctypes.c_uint32),
        ("lost_sessions", ctypes.c_uint32),
        ("last_error", ctypes.c_uint8 * LUOD_ERROR_LENGTH),
        ("journal_error", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("copies", ctypes.c_uint32),
        ("copies_error", ctypes.c_uint32),
        ("last_reboot_error", ctypes.c_uint32),
        ("recovered_sessions", ctypes.c_uint32),
        ("recovered_files", ctypes.c_uint32),
        ("fd_limit", ctypes.c_uint32),
        ("fds_open", ctypes.c_uint32),
        ("fd_reserve", ctypes.c_uint32),
        ("fds_per_file", ctypes.c_uint32),
        ("started_ns", ctypes.c_uint64),
        ("cold_started_ns", ctypes.c_uint64),
        ("last_reboot_ns", ctypes.c_uint64),
        ("last_reboot_blackout_ns", ctypes.c_uint64),
    ]


class luod_set_event(ctypes.Structure):
    """struct luod_set_event - ioctl(LUOD_IOCTL_SET_EVENT)

    @size: Input; sizeof(struct luod_set_event).
    @event: Input; what to do (enum LuodEvent: PREPARE, CANCEL, REBOOT, FINISH).
    @flags: Input; LUOD_REBOOT_NO_EXEC with REBOOT, else 0.
    @reserved: Input; must be 0.
    @generation: Output; the generation that handled the event (a REBOOT's next one is this + 1).

    Drives the v2 state machine. PREPARE asks every participant to PREPARE,
    runs the pre-flight (the installed luod, in a check mode, must read this
    generation's handover image) and moves NORMAL to PREPARED; CANCEL moves
    PREPARED back (participants get CANCEL); REBOOT freezes the participants
    (LUOD_IOCTL_REGISTER_PARTICIPANT), then every outgoing session (rolling
    back on failure), and starts the next generation once this reply is
    sent, closing every device, session and participant fd of this one;
    FINISH finishes every incoming session and the participants' data.

    Return: 0; EOPNOTSUPP for an unknown @event or flag, EINVAL when @reserved
    is not 0 or the event does not fit the state, EIO when the pre-flight
    failed (the reason is in luod_get_state.last_error), EBUSY when a file
    refuses to finish, or the errno of the file whose freeze failed. At
    PREPARE and REBOOT: the errno a participant refused with, ETIMEDOUT when
    one missed its deadline, ECONNRESET when one closed its fd, EPROTO for a
    malformed answer (the participant is named in luod_get_state.last_error).
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("event", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("generation", ctypes.c_uint64),
    ]


#: ``luod_list_sessions.flags``: also list every file of every session.
LUOD_LIST_FILES: Final = 1 << 0
LUOD_LIST_FLAGS: Final = LUOD_LIST_FILES


class luod_list_sessions(ctypes.Structure):
    """struct luod_list_sessions - ioctl(LUOD_IOCTL_LIST_SESSIONS)

    @size: Input; sizeof(struct luod_list_sessions).
    @fd: Output; a sealed, read-only memfd holding the listing as UTF-8 JSON (close-on-exec).
    @flags: Input; LUOD_LIST_FILES to include every session's files, else 0.
    @count: Output; how many sessions the listing holds.
    @hidden: Output; sessions of other users left out (non-root callers see their own only).
    @reserved: Input; must be 0.
    @name: Input; list only this session (NUL-terminated), or all sessions when empty.

    Lists sessions for observability; upstream LUO deliberately has no
    enumeration, luod offers it to the operator. The document is
    ``{"generation": N, "sessions": [{"name", "direction", "uid", "gid",
    "pid", "created", "flags", "retrieved", "finished", "files": [{"token",
    "handler", "type", ...}]}]}``, extensible by adding keys. A listing is
    unbounded, hence an fd rather than a fixed-size struct.

    Return: 0 and the memfd in @fd; EOPNOTSUPP for unknown @flags, EINVAL
    when @reserved is not 0 or @name has no NUL, ENOENT when @name names no
    session, EACCES when it names another user's session and the caller is
    not root.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("hidden", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("name", _NameField),
    ]


# -- participants ---------------------------------------------------------------

#: Largest blob of its own data a participant carries across a live update
#: (``luod_register_participant.data``, ``luod_participant_answer.data``).
LUOD_PARTICIPANT_DATA_MAX: Final = 256
#: Default deadline of a PREPARE, FREEZE, CANCEL or FINISH event, in
#: milliseconds (``luod --participant-timeout-ms``).
LUOD_PARTICIPANT_TIMEOUT_MS: Final = 5000
#: ``luod_participant_answer.flags``: the answer's @data replaces the data the
#: participant carries to the next generation (PREPARE and FREEZE only).
LUOD_PARTICIPANT_ANSWER_DATA: Final = 1 << 0
#: Every answer flag this implementation knows.
LUOD_PARTICIPANT_ANSWER_FLAGS: Final = LUOD_PARTICIPANT_ANSWER_DATA

_ParticipantData = ctypes.c_uint8 * LUOD_PARTICIPANT_DATA_MAX


class LuodParticipantEvent(enum.IntEnum):
    """``luod_participant_event.event``: the phase a participant is asked to take part in."""

    #: A live update is being prepared: get ready; refusing aborts it.
    PREPARE = 1
    #: The live update happens now: stop (pause vCPUs, stop writes); refusing aborts it.
    FREEZE = 2
    #: The live update was abandoned after this participant's PREPARE or FREEZE: resume.
    CANCEL = 3
    #: The live update this participant's data came through is over: drop what it kept for it.
    FINISH = 4


class luod_register_participant(ctypes.Structure):
    """struct luod_register_participant - ioctl(LUOD_IOCTL_REGISTER_PARTICIPANT)

    @size: Input; sizeof(struct luod_register_participant).
    @fd: Output; the participant fd (close-on-exec): a SOCK_SEQPACKET socket on which
     the events of every live update arrive. Its input value is ignored.
    @flags: Input; must be 0.
    @data_len: Output; bytes in @data: what this participant's name carried across the
     live update that started this generation, 0 when nothing.
    @name: Input; the participant's name: 1 to 63 bytes followed by a NUL.
    @data: Output; the data itself (@data_len bytes, the rest zero).

    Makes the caller a participant of every live update, the userspace
    analog of the LUO v2 subsystems: as long as @fd stays open, luod sends
    on it one struct luod_participant_event per phase (PREPARE, FREEZE,
    CANCEL, FINISH) and waits, up to the event's deadline, for one struct
    luod_participant_answer. Both are plain messages: read() and write() on
    @fd, poll() for POLLIN, no library needed. A refusal, a missed deadline
    or a closed @fd at PREPARE or FREEZE aborts the live update, naming the
    participant in luod_get_state.last_error. Closing @fd unregisters.

    A name registered again in the next generation gets back the data its
    answers set (LUOD_PARTICIPANT_ANSWER_DATA), then FINISH at the global
    FINISH, after which the data is gone. Only a privileged caller (root,
    luod's user, its --admin-group) may register: a participant can veto
    every live update of the machine.

    Return: 0 and the participant fd in @fd; EINVAL for a malformed name,
    EOPNOTSUPP for unknown @flags, EACCES for an unprivileged caller or a
    name whose data belongs to another user, EEXIST when a participant of
    this name is registered, ENOMEM when the participant limit is reached,
    EBUSY while a live update is frozen.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("name", _NameField),
        ("data", _ParticipantData),
    ]


class luod_participant_event(ctypes.Structure):
    """struct luod_participant_event - message(luod to participant)

    @size: Output; sizeof(struct luod_participant_event) as luod knows it.
    @event: Output; the phase (enum LuodParticipantEvent: PREPARE, FREEZE, CANCEL, FINISH).
    @seq: Output; this event's number, to be copied into the answer.
    @timeout_ms: Output; how long luod waits for the answer, in milliseconds, from the send.
    @reserved: Output; 0.
    @generation: Output; the generation that sends the event.

    One message on a participant fd, written by luod. A reader must accept a
    larger @size (later fields appended) and use the fields it knows.
    Events of one participant never overlap: the next one is only sent once
    this one is answered or its deadline passed.

    Return: the participant answers with one struct luod_participant_answer
    carrying the same @seq before @timeout_ms elapse.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("event", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("timeout_ms", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("generation", ctypes.c_uint64),
    ]


class luod_participant_answer(ctypes.Structure):
    """struct luod_participant_answer - message(participant to luod)

    @size: Input; the length written: sizeof(struct luod_participant_answer), or up to the
     end of @data_len when the answer carries no data.
    @flags: Input; LUOD_PARTICIPANT_ANSWER_DATA to set the data carried to the next
     generation (PREPARE and FREEZE only), else 0.
    @seq: Input; the @seq of the event answered.
    @error: Input; 0 to accept, or a positive errno to refuse (PREPARE, FREEZE) or to
     report a failure (CANCEL, FINISH: logged, never returned).
    @data_len: Input; bytes in @data, at most LUOD_PARTICIPANT_DATA_MAX.
    @data: Input; with LUOD_PARTICIPANT_ANSWER_DATA, the data itself.

    One message on a participant fd, written by the participant. An answer
    whose @seq is not the event's is stale and skipped. Data set at PREPARE
    may be replaced at FREEZE; without LUOD_PARTICIPANT_ANSWER_DATA the data
    set before is kept.

    Return: a malformed answer (@size not the message's length or short of
    @data_len, non-zero bytes past the struct, unknown @flags, @data_len too
    large, @error beyond 4095) is a refusal with EPROTO.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("error", ctypes.c_uint32),
        ("data_len", ctypes.c_uint32),
        ("data", _ParticipantData),
    ]


# -- luod session extensions ---------------------------------------------------

#: Session flag: when the session's last fd closes without a hand-over (its
#: holder crashed), hand the session over instead of unpreserving it.
LUOD_SESSION_KEEP_ON_CLOSE: Final = 1 << 0
#: Every session flag this implementation knows.
LUOD_SESSION_FLAGS: Final = LUOD_SESSION_KEEP_ON_CLOSE


class luod_session_update(ctypes.Structure):
    """struct luod_session_update - ioctl(LUOD_SESSION_UPDATE)

    @size: Input; sizeof(struct luod_session_update).
    @reserved: Input; must be 0.

    Per-session update: hands this outgoing session to its successor without
    rebooting luod. Its files are frozen in preservation order (rolled back
    on failure), then it becomes an incoming session under the same name,
    ready for RETRIEVE_SESSION. This session fd is dead afterwards: every
    call on it fails with ENODEV.

    Return: 0; EINVAL on an incoming session or when @reserved is not 0,
    EACCES when the caller is neither the session's owner nor root, EEXIST
    when an incoming session of this name exists and is not finished, or
    the errno of the file whose freeze failed (nothing changed).
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class luod_session_set_flags(ctypes.Structure):
    """struct luod_session_set_flags - ioctl(LUOD_SESSION_SET_FLAGS)

    @size: Input; sizeof(struct luod_session_set_flags).
    @flags: Input; the session's new flags (LUOD_SESSION_KEEP_ON_CLOSE or 0).
    @old_flags: Output; the flags before the call.

    Sets an outgoing session's flags; they travel with it through updates
    and reboots. With LUOD_SESSION_KEEP_ON_CLOSE, closing the session's last
    fd hands it over (as LUOD_SESSION_UPDATE does) instead of unpreserving
    its files, so a service restarted after a crash retrieves its state.

    Return: 0; EOPNOTSUPP for unknown flags, EINVAL on an incoming session.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_flags", ctypes.c_uint32),
    ]


class luod_session_unpreserve_fd(ctypes.Structure):
    """struct luod_session_unpreserve_fd - ioctl(LUOD_SESSION_UNPRESERVE_FD)

    @size: Input; sizeof(struct luod_session_unpreserve_fd).
    @reserved: Input; must be 0.
    @token: Input; the token of the file to drop.

    Removes one file from an outgoing session (a service's connection that
    closed), releasing luod's reference. Upstream LUO has no such call: a
    kernel session only shrinks by being closed.

    Return: 0; EINVAL on an incoming session or when @reserved is not 0,
    ENOENT for an unknown token.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("token", ctypes.c_uint64),
    ]


class luod_session_sync(ctypes.Structure):
    """struct luod_session_sync - ioctl(LUOD_SESSION_SYNC)

    @size: Input; sizeof(struct luod_session_sync).
    @reserved: Input; must be 0.
    @cookie: Input; any value, chosen by the caller; the reply carries it back
        unchanged.

    Does nothing but answer, on a session fd of either direction. Replies on a
    session fd come back in request order, so a caller that shares a session
    fd with code it does not control (a supervisor) finds the end of replies
    meant for someone else: it sends SYNC with a fresh random cookie and
    discards replies until the one carrying that cookie.

    Return: 0 with @cookie unchanged; EINVAL when @reserved is not 0.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("cookie", ctypes.c_uint64),
    ]


#: Largest ``luod_session_set_service.pid``: Linux's PID_MAX_LIMIT (4194304) minus one.
LUOD_SERVICE_PID_MAX: Final = (1 << 22) - 1


class luod_session_set_service(ctypes.Structure):
    """struct luod_session_set_service - ioctl(LUOD_SESSION_SET_SERVICE)

    @size: Input; sizeof(struct luod_session_set_service).
    @flags: Input; must be 0.
    @pid: Input; the process id of the service that uses this session, or 0 to say that
     none runs now (the other fields are then ignored).
    @restarts: Input; how many times its supervisor restarted it after it exited.
    @last_exit: Input; how it last exited: its exit status (>= 0), or minus the signal
     that killed it (< 0); 0 when it never exited.
    @reserved: Input; must be 0.

    Says which service runs on this outgoing session, for the operator:
    LUOD_IOCTL_LIST_SESSIONS then shows it as the session's ``service``
    (``luoctl status``, ``luoctl sessions``). A supervisor (``luoctl run``)
    calls it when it starts the service, after each restart and after
    re-binding the session to a new generation. luod never acts on it and
    keeps it with the session only: it is not handed over (the supervisor
    says it again to the next generation), and a session handed over with
    LUOD_SESSION_UPDATE or kept on close loses it.

    Return: 0; EINVAL on an incoming session, when @reserved is not 0 or
    @pid is beyond LUOD_SERVICE_PID_MAX, EOPNOTSUPP for unknown @flags,
    EACCES when the caller is neither the session's owner nor root.
    """

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pid", ctypes.c_uint32),
        ("restarts", ctypes.c_uint32),
        ("last_exit", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
    ]


# ---------------------------------------------------------------------------
# Facts about each ioctl, shared by the dispatcher, the wire and the client
# ---------------------------------------------------------------------------


class FdKind(enum.Enum):
    """Which kind of file descriptor an ioctl is issued on."""

    DEVICE = "device"
    SESSION = "session"


class SessionDirection(enum.IntEnum):
    """Direction of a session: created in this generation, or handed over."""

    OUTGOING = 1
    INCOMING = 2


@dataclass(frozen=True)
class IoctlInfo:
    """Everything the ABI says about one ioctl.

    Attributes:
        name: The Linux (or luod extension) name, e.g. ``LIVEUPDATE_IOCTL_CREATE_SESSION``.
        cmd: The full ioctl number.
        struct: The ``ctypes`` structure the ioctl takes.
        last_field: The struct's last mandatory field; the minimum accepted
            ``size`` is the offset of the end of this field.
        on: Whether the ioctl is issued on the device or on a session fd.
        direction: The session direction it is valid on (``None``: any).
        fd_in: The struct's ``fd`` field names a file the caller hands over
            (sent as ``SCM_RIGHTS`` on luod's socket).
        fd_out: A successful call returns a new fd in the struct's ``fd`` field.
    """

    name: str
    cmd: int
    struct: type[ctypes.Structure]
    last_field: str
    on: FdKind
    direction: SessionDirection | None = None
    fd_in: bool = False
    fd_out: bool = False

    @property
    def min_size(self) -> int:
        """Smallest ``size`` a caller may pass: the end of the last mandatory field."""
        return min_size(self.struct, self.last_field)

    @property
    def sizeof(self) -> int:
        """Size of the struct as this implementation knows it."""
        return ctypes.sizeof(self.struct)


def min_size(struct: type[ctypes.Structure], last_field: str) -> int:
    """Offset of the end of ``last_field`` in ``struct``."""
    field = getattr(struct, last_field)
    return int(field.offset + field.size)


#: Every ioctl this project knows, by number. Extensions are added as they
#: are implemented; the dispatch tables of the core are built from these.
IOCTLS: dict[int, IoctlInfo] = {}


def _register(info: IoctlInfo) -> IoctlInfo:
    assert info.cmd not in IOCTLS, f"ioctl number {info.cmd:#x} used twice"
    IOCTLS[info.cmd] = info
    return info


CREATE_SESSION: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_IOCTL_CREATE_SESSION",
        LIVEUPDATE_IOCTL_CREATE_SESSION,
        liveupdate_ioctl_create_session,
        "name",
        FdKind.DEVICE,
        fd_out=True,
    )
)
RETRIEVE_SESSION: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_IOCTL_RETRIEVE_SESSION",
        LIVEUPDATE_IOCTL_RETRIEVE_SESSION,
        liveupdate_ioctl_retrieve_session,
        "name",
        FdKind.DEVICE,
        fd_out=True,
    )
)
PRESERVE_FD: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_SESSION_PRESERVE_FD",
        LIVEUPDATE_SESSION_PRESERVE_FD,
        liveupdate_session_preserve_fd,
        "token",
        FdKind.SESSION,
        SessionDirection.OUTGOING,
        fd_in=True,
    )
)
RETRIEVE_FD: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_SESSION_RETRIEVE_FD",
        LIVEUPDATE_SESSION_RETRIEVE_FD,
        liveupdate_session_retrieve_fd,
        "token",
        FdKind.SESSION,
        SessionDirection.INCOMING,
        fd_out=True,
    )
)
FINISH: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_SESSION_FINISH",
        LIVEUPDATE_SESSION_FINISH,
        liveupdate_session_finish,
        "reserved",
        FdKind.SESSION,
        SessionDirection.INCOMING,
    )
)
GET_NAME: Final = _register(
    IoctlInfo(
        "LIVEUPDATE_SESSION_GET_NAME",
        LIVEUPDATE_SESSION_GET_NAME,
        liveupdate_session_get_name,
        "name",
        FdKind.SESSION,
    )
)


GET_STATE: Final = _register(
    IoctlInfo(
        "LUOD_IOCTL_GET_STATE",
        LUOD_IOCTL_GET_STATE,
        luod_get_state,
        "generation",
        FdKind.DEVICE,
    )
)
SET_EVENT: Final = _register(
    IoctlInfo(
        "LUOD_IOCTL_SET_EVENT",
        LUOD_IOCTL_SET_EVENT,
        luod_set_event,
        "flags",
        FdKind.DEVICE,
    )
)


LIST_SESSIONS: Final = _register(
    IoctlInfo(
        "LUOD_IOCTL_LIST_SESSIONS",
        LUOD_IOCTL_LIST_SESSIONS,
        luod_list_sessions,
        "flags",
        FdKind.DEVICE,
        fd_out=True,
    )
)
REGISTER_PARTICIPANT: Final = _register(
    IoctlInfo(
        "LUOD_IOCTL_REGISTER_PARTICIPANT",
        LUOD_IOCTL_REGISTER_PARTICIPANT,
        luod_register_participant,
        "data",
        FdKind.DEVICE,
        fd_out=True,
    )
)
SESSION_UPDATE: Final = _register(
    IoctlInfo(
        "LUOD_SESSION_UPDATE",
        LUOD_SESSION_UPDATE,
        luod_session_update,
        "reserved",
        FdKind.SESSION,
        SessionDirection.OUTGOING,
    )
)
SESSION_SET_FLAGS: Final = _register(
    IoctlInfo(
        "LUOD_SESSION_SET_FLAGS",
        LUOD_SESSION_SET_FLAGS,
        luod_session_set_flags,
        "flags",
        FdKind.SESSION,
        SessionDirection.OUTGOING,
    )
)
SESSION_UNPRESERVE_FD: Final = _register(
    IoctlInfo(
        "LUOD_SESSION_UNPRESERVE_FD",
        LUOD_SESSION_UNPRESERVE_FD,
        luod_session_unpreserve_fd,
        "token",
        FdKind.SESSION,
        SessionDirection.OUTGOING,
    )
)
SESSION_SYNC: Final = _register(
    IoctlInfo(
        "LUOD_SESSION_SYNC",
        LUOD_SESSION_SYNC,
        luod_session_sync,
        "cookie",
        FdKind.SESSION,
    )
)
SESSION_SET_SERVICE: Final = _register(
    IoctlInfo(
        "LUOD_SESSION_SET_SERVICE",
        LUOD_SESSION_SET_SERVICE,
        luod_session_set_service,
        "reserved",
        FdKind.SESSION,
        SessionDirection.OUTGOING,
    )
)


@dataclass(frozen=True)
class MessageInfo:
    """A message of the participant fd's protocol (not an ioctl: read() and write()).

    Attributes:
        name: The message's name in the documentation.
        struct: Its ``ctypes`` structure, size first like an ioctl's.
        last_field: The last mandatory field: shorter messages are malformed.
        sender: ``"luod"`` or ``"participant"``.
    """

    name: str
    struct: type[ctypes.Structure]
    last_field: str
    sender: str

    @property
    def min_size(self) -> int:
        return min_size(self.struct, self.last_field)


#: The two messages of a participant fd (``LUOD_IOCTL_REGISTER_PARTICIPANT``).
PARTICIPANT_MESSAGES: Final = (
    MessageInfo("participant event", luod_participant_event, "generation", "luod"),
    MessageInfo("participant answer", luod_participant_answer, "data_len", "participant"),
)


def info_by_name(name: str) -> IoctlInfo:
    """Look an ioctl up by its Linux/luod name."""
    for info in IOCTLS.values():
        if info.name == name:
            return info
    raise KeyError(name)


def encode_name(name: str | bytes) -> bytes:
    """Encode a session name for the 64-byte ``name`` field (no validation).

    ``str`` names are encoded as UTF-8. The result is not NUL-padded; a
    ``ctypes`` array assignment pads it.
    """
    return name.encode() if isinstance(name, str) else bytes(name)


def decode_name(field: ctypes.Array[ctypes.c_uint8] | bytes) -> bytes:
    """The bytes of a ``name`` field up to (not including) its first NUL."""
    raw = bytes(field)
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]
