"""The high-level client API: :class:`Device` and :class:`Session`.

::

    import os, liveupdate

    with liveupdate.open_device() as dev:
        session = dev.create_session("vm-memory")
    mfd = os.memfd_create("guest-ram")
    os.write(mfd, b"hello")
    session.preserve(mfd, token=0x1A)
    # ... keep `session` open across the live update; in the next generation:
    with liveupdate.open_device() as dev, dev.retrieve_session("vm-memory") as s:
        fd = s.retrieve(0x1A)
        s.finish()

The same code runs against ``luod`` and against a kernel's ``/dev/liveupdate``:
only the :mod:`~liveupdate.client.transport` differs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from liveupdate import paths, uapi
from liveupdate.client.errors import InvalidArgumentError, LiveUpdateError, error_from_errno
from liveupdate.client.listing import SessionListing, parse_listing
from liveupdate.client.transport import (
    Buffer,
    KernelTransport,
    SocketTransport,
    open_with_retry,
    transport_for_fd,
    transport_for_path,
)

if TYPE_CHECKING:
    from liveupdate.client.participant import Participant

__all__ = ["Device", "Session", "StateInfo", "open_device"]


class HasFileno(Protocol):
    def fileno(self) -> int: ...


AnyTransport = KernelTransport | SocketTransport


#: Tokens are u64: 0 <= token < 2**64.
_TOKEN_LIMIT = 1 << 64


def _token(token: int) -> int:
    """``token`` checked to fit the ABI's u64 (ctypes would wrap it silently).

    Raises :class:`TypeError` for a non-integer (``bool`` included) and
    :class:`ValueError` naming the token when it is out of range.
    """
    if not isinstance(token, int) or isinstance(token, bool):
        raise TypeError(f"token must be an int, not {type(token).__name__}")
    if not 0 <= token < _TOKEN_LIMIT:
        raise ValueError(f"token {token} is out of range: tokens are 0 <= token < 2**64")
    return token


def _first_failure(failures: dict[int, LiveUpdateError]) -> LiveUpdateError:
    """The first error of a batch, carrying all of them (``failures``)."""
    first = next(iter(failures.values()))
    first.failures = failures
    return first


def _name_bytes(name: str | bytes) -> bytes:
    # bytes(5) would be five NUL bytes: anything but text or bytes is refused.
    if not isinstance(name, (str, bytes, bytearray)):
        raise TypeError(f"session name must be str or bytes, not {type(name).__name__}")
    raw = uapi.encode_name(name)
    if not raw or b"\0" in raw or len(raw) >= uapi.LIVEUPDATE_SESSION_NAME_LENGTH:
        raise InvalidArgumentError(
            errno.EINVAL, f"session name must be 1 to 63 bytes without NUL, got {raw!r}"
        )
    return raw


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _FdObject:
    """An owned fd with ``ioctl``, ``close`` and context-manager support.

    Over luod's socket a call is a request then its reply, and processes
    sharing one fd (after ``fork``, ``exec`` or ``SCM_RIGHTS``) would share
    one queue of replies. So only the process that received the fd from luod
    calls on it directly; any other process binds its own *channel* to it
    (wire 1.1, :meth:`~liveupdate.client.transport.SocketTransport.bind`) at
    its first call, and luod answers that process there. Threads of one
    process share the route and take turns (a lock).
    """

    def __init__(self, fd: int, transport: AnyTransport, *, shared: bool = False) -> None:
        self._fd = fd
        self.transport = transport
        self._lock = threading.Lock()
        #: Calls go straight to the fd (this process got it from luod, or
        #: the transport needs no channel); else through :attr:`_channel`.
        self._direct = not shared
        #: This process's channel to the fd (-1: none bound yet).
        self._channel = -1
        _live_objects.add(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the fd is shared with the parent from now on."""
        # The lock may have been held by a thread that does not exist here.
        self._lock = threading.Lock()
        self._direct = False
        if self._channel >= 0:
            # The parent's channel: this copy is closed, the parent keeps its own.
            _close_quietly(self._channel)
            self._channel = -1

    def _route(self) -> int:
        """The fd this process's calls go through (the lock is held)."""
        fd = self.fileno()
        if self._direct:
            return fd
        if self._channel < 0:
            channel = self.transport.bind(fd)
            if channel == fd:  # a kernel's fd, or a luod without channels
                self._direct = True
                return fd
            self._channel = channel
        return self._channel

    def _drop_channel(self) -> None:
        if self._channel >= 0:
            channel, self._channel = self._channel, -1
            _close_quietly(channel)

    def fileno(self) -> int:
        """The underlying fd (owned by this object until :meth:`close` or :meth:`detach`)."""
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ioctl(self, cmd: int, buf: Buffer | ctypes.Structure) -> int:
        """Issue ``cmd`` with ``buf`` exactly like ``ioctl(2)`` would.

        ``buf`` is a writable buffer (``bytearray``, ``memoryview`` or a
        ``ctypes`` struct) holding the struct, ``size`` first. On success the
        reply is written back into it, including the number of a returned fd
        in the ``fd`` field; the caller then owns that fd. Raises a
        :class:`~liveupdate.LiveUpdateError` subclass on failure.

        Calls through one object are serialized across threads. Processes
        that share the fd may call at the same time, each gets its own
        reply: see the class's description.
        """
        with self._lock:
            return self.transport.ioctl(self._route(), cmd, buf)  # type: ignore[arg-type]

    def ioctl_many(
        self, cmd: int, bufs: Sequence[Buffer | ctypes.Structure]
    ) -> list[LiveUpdateError | None]:
        """Issue ``cmd`` once per buffer, pipelined over luod's socket; each call's error or None.

        Every call is made, in order, whatever the others answer; each buffer
        is written back like :meth:`ioctl`'s where its entry is None. Over a
        kernel's device it is one ``ioctl(2)`` per buffer. See
        :meth:`~liveupdate.client.transport.SocketTransport.ioctl_many`.
        """
        with self._lock:
            return self.transport.ioctl_many(self._route(), cmd, bufs)  # type: ignore[arg-type]

    def replace_fd(self, fd: int) -> None:
        """Put the open ``fd`` under this object's fd number (``dup2``), then close ``fd``.

        For a holder that got the session's new fd after luod rebooted:
        whatever was built on :meth:`fileno` still holds. The new fd counts
        as shared (it came from another process): the next call binds a
        channel to it.
        """
        with self._lock:
            self._drop_channel()
            self._direct = False
            os.dup2(fd, self.fileno(), inheritable=False)
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd and return it."""
        fd, self._fd = self.fileno(), -1
        self._drop_channel()
        return fd

    def close(self) -> None:
        """Close the fd (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            self._drop_channel()
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: Every open device and session object, told when this process forks.
_live_objects: weakref.WeakSet[_FdObject] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for obj in list(_live_objects):
        obj._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Session(_FdObject):
    """A session fd: a named group of preserved files.

    Closing an *outgoing* session (one you created) unpreserves its files;
    keep it open across the live update. Closing a *retrieved* session
    finishes it.
    """

    def __init__(
        self,
        fd: int,
        transport: AnyTransport,
        name: bytes | None = None,
        direction: uapi.SessionDirection | None = None,
        *,
        shared: bool = False,
    ) -> None:
        super().__init__(fd, transport, shared=shared)
        self._name = name
        #: Outgoing or incoming, when known (``None`` for an inherited fd).
        self.direction = direction

    @classmethod
    def from_fd(cls, fd: int, direction: uapi.SessionDirection | None = None) -> Session:
        """Adopt an open session fd (inherited from a parent, received...).

        The fd may be shared with the process it came from: calls go
        through a channel of this process's own (see :meth:`ioctl`).
        """
        return cls(fd, transport_for_fd(fd), direction=direction, shared=True)

    @property
    def raw_name(self) -> bytes:
        """The name as the ABI holds it (bytes, no NUL); asked once with GET_NAME."""
        if self._name is None:
            self._name = self.get_name()
        return self._name

    @property
    def name(self) -> str:
        """The name as text (undecodable bytes escaped)."""
        return self.raw_name.decode(errors="surrogateescape")

    def get_name(self) -> bytes:
        """LIVEUPDATE_SESSION_GET_NAME: the session's name, asked of the orchestrator."""
        arg = uapi.liveupdate_session_get_name(size=ctypes.sizeof(uapi.liveupdate_session_get_name))
        self.ioctl(uapi.LIVEUPDATE_SESSION_GET_NAME, arg)
        return uapi.decode_name(arg.name)

    def preserve(self, file: int | HasFileno, token: int) -> None:
        """LIVEUPDATE_SESSION_PRESERVE_FD: keep ``file`` across the update under ``token``.

        ``file`` is an fd or any object with ``fileno()``. The orchestrator
        holds its own reference; the caller may close its own afterwards.
        ``token`` is a u64 (``0 <= token < 2**64``): anything else is a
        :class:`ValueError` (out of range) or :class:`TypeError` (not an int),
        raised before anything is sent.
        """
        token = _token(token)
        fd = file if isinstance(file, int) else file.fileno()
        arg = uapi.liveupdate_session_preserve_fd(
            size=ctypes.sizeof(uapi.liveupdate_session_preserve_fd), fd=fd, token=token
        )
        self.ioctl(uapi.LIVEUPDATE_SESSION_PRESERVE_FD, arg)

    def retrieve(self, token: int) -> int:
        """LIVEUPDATE_SESSION_RETRIEVE_FD: a new fd (close-on-exec) for the file ``token``.

        May be called again: each call returns a new fd to the same open file.
        The caller owns the fd (wrap it with :func:`os.fdopen` or ``socket.socket(fileno=...)``).
        """
        arg = uapi.liveupdate_session_retrieve_fd(
            size=ctypes.sizeof(uapi.liveupdate_session_retrieve_fd), fd=-1, token=_token(token)
        )
        self.ioctl(uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, arg)
        return int(arg.fd)

    def retrieve_many(self, tokens: Iterable[int]) -> dict[int, int]:
        """:meth:`retrieve` each of ``tokens`` in one batch: ``{token: fd}``, in order.

        Over luod's socket the requests are pipelined (about one round trip
        for the whole batch instead of one per file); over a kernel's device
        it loops over :meth:`retrieve`. All or nothing: when any token fails,
        every fd the batch returned is closed (each can be retrieved again)
        and the first failure is raised, the same exception :meth:`retrieve`
        raises (unknown token: :class:`~liveupdate.NotFoundError`), with
        :attr:`~liveupdate.LiveUpdateError.failures` naming every token that
        failed. A token given twice, or not a u64, is a :class:`ValueError`
        or :class:`TypeError` before anything is sent.
        """
        checked = [_token(token) for token in tokens]
        if len(set(checked)) != len(checked):
            raise ValueError("a token is given twice: one fd per token")
        args = [
            uapi.liveupdate_session_retrieve_fd(
                size=ctypes.sizeof(uapi.liveupdate_session_retrieve_fd), fd=-1, token=token
            )
            for token in checked
        ]
        results = self.ioctl_many(uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, args)
        outcomes = list(zip(checked, args, results, strict=True))
        fds = {tok: int(arg.fd) for tok, arg, err in outcomes if err is None}
        failures = {tok: err for tok, _arg, err in outcomes if err is not None}
        if failures:
            for fd in fds.values():
                os.close(fd)
            raise _first_failure(failures)
        return fds

    def preserve_many(self, items: Iterable[tuple[int | HasFileno, int]]) -> None:
        """:meth:`preserve` each ``(file, token)`` of ``items`` in one batch.

        Pipelined over luod's socket like :meth:`retrieve_many`; a loop over
        :meth:`preserve` over a kernel's device. Every item is tried: when
        some fail, the others stay preserved and the first failure is raised
        (the exception :meth:`preserve` raises: a token in use,
        :class:`~liveupdate.AlreadyExistsError`), its
        :attr:`~liveupdate.LiveUpdateError.failures` naming every token that
        failed. Tokens are checked before anything is sent, as by :meth:`preserve`.
        """
        pairs = [
            (file if isinstance(file, int) else file.fileno(), _token(token))
            for file, token in items
        ]
        args = [
            uapi.liveupdate_session_preserve_fd(
                size=ctypes.sizeof(uapi.liveupdate_session_preserve_fd), fd=fd, token=token
            )
            for fd, token in pairs
        ]
        results = self.ioctl_many(uapi.LIVEUPDATE_SESSION_PRESERVE_FD, args)
        failures = {
            tok: err for (_fd, tok), err in zip(pairs, results, strict=True) if err is not None
        }
        if failures:
            raise _first_failure(failures)

    def finish(self) -> None:
        """LIVEUPDATE_SESSION_FINISH: complete an incoming session (idempotent).

        Files never retrieved are discarded; fds already retrieved stay valid.
        """
        arg = uapi.liveupdate_session_finish(size=ctypes.sizeof(uapi.liveupdate_session_finish))
        self.ioctl(uapi.LIVEUPDATE_SESSION_FINISH, arg)

    # -- luod extensions (Linux answers EINVAL for them, luod's own
    # unknown numbers are ENOTTY: catch both as "not supported") -----------------

    def update(self) -> None:
        """LUOD_SESSION_UPDATE: hand this outgoing session to a successor.

        The session becomes incoming under the same name (RETRIEVE_SESSION
        then returns it) and this object's fd is dead: it is closed here.
        """
        arg = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update))
        self.ioctl(uapi.LUOD_SESSION_UPDATE, arg)
        self.close()
        self.direction = uapi.SessionDirection.INCOMING

    def set_flags(self, flags: int) -> int:
        """LUOD_SESSION_SET_FLAGS: set the session's flags; returns the old ones."""
        arg = uapi.luod_session_set_flags(
            size=ctypes.sizeof(uapi.luod_session_set_flags), flags=flags
        )
        self.ioctl(uapi.LUOD_SESSION_SET_FLAGS, arg)
        return int(arg.old_flags)

    def set_service(self, pid: int, restarts: int = 0, last_exit: int = 0) -> None:
        """LUOD_SESSION_SET_SERVICE: say which service uses this outgoing session.

        ``pid`` 0 says that none runs now. ``restarts``: how many times its
        supervisor restarted it; ``last_exit``: how it last exited (its status,
        or minus the killing signal; 0: never). Shown by ``luoctl status``.
        Values that do not fit the struct are a :class:`ValueError` (ctypes
        would wrap them silently).
        """
        for what, value, low, high in (
            ("pid", pid, 0, uapi.LUOD_SERVICE_PID_MAX),
            ("restarts", restarts, 0, 0xFFFF_FFFF),
            ("last_exit", last_exit, -(1 << 31), (1 << 31) - 1),
        ):
            if not low <= value <= high:
                raise ValueError(f"{what} {value} is out of range ({low}..{high})")
        arg = uapi.luod_session_set_service(
            size=ctypes.sizeof(uapi.luod_session_set_service),
            pid=pid,
            restarts=restarts,
            last_exit=last_exit,
        )
        self.ioctl(uapi.LUOD_SESSION_SET_SERVICE, arg)

    def keep_on_close(self, enabled: bool = True) -> None:
        """Hand the session over, rather than unpreserve it, if its holder dies."""
        self.set_flags(uapi.LUOD_SESSION_KEEP_ON_CLOSE if enabled else 0)

    def unpreserve(self, token: int) -> None:
        """LUOD_SESSION_UNPRESERVE_FD: drop one file from an outgoing session."""
        arg = uapi.luod_session_unpreserve_fd(
            size=ctypes.sizeof(uapi.luod_session_unpreserve_fd), token=_token(token)
        )
        self.ioctl(uapi.LUOD_SESSION_UNPRESERVE_FD, arg)

    def fence(self, timeout: float | None = 10.0) -> int:
        """LUOD_SESSION_SYNC: discard the replies waiting on this fd for another process.

        For a process that shares the session fd (a supervisor and its
        service): once the other one is gone, replies to the requests it had
        in flight wait on the fd and would be read as answers to this
        process's next calls. The fence sends SYNC with a random cookie and
        reads up to its answer (see
        :meth:`~liveupdate.client.transport.SocketTransport.fence`); returns
        how many replies were discarded. On a kernel's fd it does nothing:
        ``ioctl(2)`` has no queue of replies. Raises ``ETIMEDOUT`` after
        ``timeout`` seconds and :class:`~liveupdate.StaleGenerationError`
        when luod rebooted.
        """
        with self._lock:
            return self.transport.fence(self._route(), timeout)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        name = self._name.decode(errors="backslashreplace") if self._name else "?"
        return f"<liveupdate.Session {name!r} {state} via {self.transport.name}>"


_NS_PER_S = 1_000_000_000


def _copies_name(value: int) -> str:
    """``luod_get_state.copies`` as StateInfo says it (an unknown value as its number)."""
    try:
        return uapi.LuodCopies(value).name.lower()
    except ValueError:
        return str(value)


@dataclass(frozen=True)
class StateInfo:
    """The orchestrator's state as ``LUOD_IOCTL_GET_STATE`` reports it."""

    state: uapi.LuodState
    generation: int
    outgoing_sessions: int
    incoming_sessions: int
    preserved_files: int
    max_sessions: int
    max_files: int
    lost_sessions: int
    last_error: str
    #: errno of the journal's last failed write (0: up to date, or no journal).
    journal_error: int = 0
    #: ``lost_sessions`` is a lower bound: the previous holder's journal was out of date.
    lost_incomplete: bool = False
    # Appended to GET_STATE later: a luod that does not know them leaves them
    # at these defaults (its reply is shorter, the tail stays zero).
    #: The serving luod's pid (0: not said).
    pid: int = 0
    #: Where luod keeps crash copies of what it holds: ``"off"``, ``"keeper"``, ``"fdstore"``.
    copies: str = "off"
    #: errno of the copies' last failure, or why they could not start (0: healthy, or off).
    copies_error: int = 0
    #: When this generation started serving (Unix time, seconds; 0.0: not said).
    started: float = 0.0
    #: When this line of generations started cold: luod's uptime counts from it.
    cold_started: float = 0.0
    #: When the live update that started this generation ended (0.0: a cold start).
    last_reboot: float = 0.0
    #: That live update's blackout in seconds, freeze to serving (0.0: none, or unknown).
    last_reboot_blackout: float = 0.0
    #: errno of the last REBOOT that failed in this generation (0: none).
    last_reboot_error: int = 0
    #: Sessions and files the crash copies gave back at this start.
    recovered_sessions: int = 0
    recovered_files: int = 0
    #: luod's RLIMIT_NOFILE soft limit, the fds it has open, and those it keeps free.
    fd_limit: int = 0
    fds_open: int = 0
    fd_reserve: int = 0
    #: fds one preserved file costs: 2 with the copies on, 1 without.
    fds_per_file: int = 0


class Device(_FdObject):
    """The open device: creates and retrieves sessions.

    Only one process may have the device open at a time; close it (or use
    ``with``) as soon as sessions are created: sessions live on their own fds.
    """

    def __init__(self, fd: int, transport: AnyTransport, path: str) -> None:
        super().__init__(fd, transport)
        #: The path it was opened at.
        self.path = path

    def _session_call(self, cmd: int, name: str | bytes) -> int:
        raw = _name_bytes(name)
        struct_type = uapi.IOCTLS[cmd].struct
        arg = struct_type(size=ctypes.sizeof(struct_type), fd=-1)
        ctypes.memmove(arg.name, raw, len(raw))
        self.ioctl(cmd, arg)
        return int(arg.fd)

    def create_session(self, name: str | bytes) -> Session:
        """LIVEUPDATE_IOCTL_CREATE_SESSION: a new outgoing session called ``name``."""
        fd = self._session_call(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, name)
        return Session(fd, self.transport, _name_bytes(name), uapi.SessionDirection.OUTGOING)

    def retrieve_session(self, name: str | bytes) -> Session:
        """LIVEUPDATE_IOCTL_RETRIEVE_SESSION: the incoming session ``name``."""
        fd = self._session_call(uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, name)
        return Session(fd, self.transport, _name_bytes(name), uapi.SessionDirection.INCOMING)

    def get_state(self) -> StateInfo:
        """LUOD_IOCTL_GET_STATE (luod only: Linux answers EINVAL, InvalidArgumentError)."""
        arg = uapi.luod_get_state(size=ctypes.sizeof(uapi.luod_get_state))
        self.ioctl(uapi.LUOD_IOCTL_GET_STATE, arg)
        # ctypes reads an integer field as a Python int already: no int() around them.
        return StateInfo(
            state=uapi.LuodState(arg.state),
            generation=arg.generation,
            outgoing_sessions=arg.outgoing_sessions,
            incoming_sessions=arg.incoming_sessions,
            preserved_files=arg.preserved_files,
            max_sessions=arg.max_sessions,
            max_files=arg.max_files,
            lost_sessions=arg.lost_sessions,
            last_error=uapi.decode_name(arg.last_error).decode(errors="replace"),
            journal_error=arg.journal_error,
            lost_incomplete=bool(arg.flags & uapi.LUOD_STATE_LOST_INCOMPLETE),
            pid=arg.pid,
            copies=_copies_name(arg.copies),
            copies_error=arg.copies_error,
            started=arg.started_ns / _NS_PER_S,
            cold_started=arg.cold_started_ns / _NS_PER_S,
            last_reboot=arg.last_reboot_ns / _NS_PER_S,
            last_reboot_blackout=arg.last_reboot_blackout_ns / _NS_PER_S,
            last_reboot_error=arg.last_reboot_error,
            recovered_sessions=arg.recovered_sessions,
            recovered_files=arg.recovered_files,
            fd_limit=arg.fd_limit,
            fds_open=arg.fds_open,
            fd_reserve=arg.fd_reserve,
            fds_per_file=arg.fds_per_file,
        )

    def set_event(self, event: uapi.LuodEvent, flags: int = 0) -> int:
        """LUOD_IOCTL_SET_EVENT: drive the state machine; returns the generation
        that handled it. After a REBOOT this device fd is dead (the reboot
        closes it); open the device again to talk to the next generation."""
        arg = uapi.luod_set_event(size=ctypes.sizeof(uapi.luod_set_event), event=event, flags=flags)
        self.ioctl(uapi.LUOD_IOCTL_SET_EVENT, arg)
        return int(arg.generation)

    def list_sessions(self, name: str | bytes | None = None, files: bool = True) -> SessionListing:
        """LUOD_IOCTL_LIST_SESSIONS: the sessions this caller may see.

        A :class:`~liveupdate.SessionListing` (generation, state, the
        :class:`~liveupdate.SessionInfo` of each session with, unless
        ``files`` is false, the :class:`~liveupdate.FileInfo` of each of its
        files, and how many sessions of other users are hidden). Non-root
        callers see their own sessions only; naming another user's session
        raises :class:`~liveupdate.PermissionDeniedError`. A listing that is
        not valid JSON, or lacks a field this library knows, is ``EPROTO``.
        """
        arg = uapi.luod_list_sessions(
            size=ctypes.sizeof(uapi.luod_list_sessions),
            fd=-1,
            flags=uapi.LUOD_LIST_FILES if files else 0,
        )
        if name is not None:
            raw = _name_bytes(name)
            ctypes.memmove(arg.name, raw, len(raw))
        self.ioctl(uapi.LUOD_IOCTL_LIST_SESSIONS, arg)
        with os.fdopen(int(arg.fd), "rb") as listing:
            try:
                doc = json.load(listing)
            except ValueError as exc:
                raise error_from_errno(
                    errno.EPROTO, "LUOD_IOCTL_LIST_SESSIONS", f"malformed listing: {exc}"
                ) from None
        return parse_listing(doc, int(arg.hidden))

    def register_participant(self, name: str | bytes) -> Participant:
        """LUOD_IOCTL_REGISTER_PARTICIPANT: take part in every live update
        (luod only); see :func:`liveupdate.register_participant`."""
        from liveupdate.client.participant import register_participant

        return register_participant(self, name)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<liveupdate.Device {self.path!r} {state} via {self.transport.name}>"


def open_device(path: str | os.PathLike[str] | None = None, timeout: float = 0.0) -> Device:
    """Open the LUO device.

    Args:
        path: A kernel character device or luod's socket. Default: the
            ``LIVEUPDATE_DEVICE`` environment variable, else ``/dev/liveupdate``
            when it exists, else luod's default socket.
        timeout: Seconds to keep retrying while the device is busy (``EBUSY``:
            another process has it open). 0 fails at once.

    Raises:
        DeviceBusyError: still busy after ``timeout``.
        OrchestratorIOError: the daemon could not restore its incoming state.
        NotFoundError: nothing at ``path`` (is luod running?).
    """
    resolved = paths.resolve_device(path)
    transport = transport_for_path(resolved)
    fd = open_with_retry(transport, resolved, timeout)
    return Device(fd, transport, resolved)
