"""An orchestrator driven in-process, without sockets, with a real tiny handler.

:class:`NoteHandler` preserves memfds for real (their fds, their bytes) and
records every call it gets, so tests can check order; it fails on demand.
:class:`Rig` drives one :class:`~liveupdate.core.luo.Orchestrator` through
the same dispatch tables luod uses, binding each session to a real
socketpair like the transport does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass, field

from liveupdate import uapi
from liveupdate.core.file import FileHandler, HandlerRegistry, PreservedFile
from liveupdate.core.luo import DeviceCall, Hooks, LuoState, Orchestrator
from liveupdate.core.policy import Limits, Owner
from liveupdate.core.session import Session
from liveupdate.core.session_ops import SessionCall
from liveupdate.core.tables import device_table, session_table
from liveupdate.dispatch import Reply, dispatch
from liveupdate.handover_abi import HandoverImage

ROOT = Owner(pid=1, uid=0, gid=0)
ALICE = Owner(pid=2, uid=1000, gid=1000)
BOB = Owner(pid=3, uid=1001, gid=1001)


def memfd(data: bytes = b"") -> int:
    """A real memfd holding ``data``."""
    fd = os.memfd_create("core-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def content(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


class NoteHandler(FileHandler):
    """Preserves memfds; its data is the memfd's bytes at freeze time."""

    compatible = "note-v1"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_freeze: set[int] = set()
        self.fail_unpreserve: set[int] = set()
        self.refuse_finish: set[int] = set()
        self.fail_retrieve: set[int] = set()

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:core-test")

    def charged_bytes(self, fd: int, st: os.stat_result) -> int:
        return st.st_size

    def preserve(self, file: PreservedFile) -> None:
        self.calls.append(("preserve", file.token))

    def unpreserve(self, file: PreservedFile) -> None:
        self.calls.append(("unpreserve", file.token))
        if file.token in self.fail_unpreserve:
            raise OSError(errno.EIO, "unpreserve failed")

    def freeze(self, file: PreservedFile) -> bytes:
        if file.token in self.fail_freeze:
            raise OSError(errno.EPERM, f"token {file.token} refuses to freeze")
        self.calls.append(("freeze", file.token))
        return content(file.fd)

    def unfreeze(self, file: PreservedFile) -> None:
        self.calls.append(("unfreeze", file.token))

    def restore(self, file: PreservedFile) -> None:
        if content(file.fd) != file.data:
            raise OSError(errno.EINVAL, "memfd changed since the freeze")

    def retrieve(self, file: PreservedFile) -> None:
        if file.token in self.fail_retrieve:
            raise OSError(errno.EIO, "retrieve failed")

    def can_finish(self, file: PreservedFile) -> bool:
        return file.token not in self.refuse_finish

    def finish(self, file: PreservedFile) -> None:
        self.calls.append(("finish", file.token))


@dataclass
class Host:
    """A :class:`~liveupdate.core.luo.RebootHost` that writes nothing and
    records the order of the steps; ``preflight_error`` fails the pre-flight."""

    steps: list[str] = field(default_factory=list)
    preflight_error: OSError | None = None
    committed: HandoverImage | None = None

    def preflight(self, image: HandoverImage) -> None:
        self.steps.append("preflight")
        if self.preflight_error is not None:
            raise self.preflight_error

    def begin_reboot(self, intent: HandoverImage) -> None:
        self.steps.append("begin")

    def freeze_hook(self, file: PreservedFile) -> None:
        self.steps.append(f"frozen {file.token}")

    def abort_reboot(self) -> None:
        self.steps.append("abort")

    def commit_reboot(self, image: HandoverImage, no_exec: bool) -> None:
        self.steps.append("commit")
        self.committed = image


@dataclass
class Rig:
    """One orchestrator, its dispatch tables and the session fds it bound."""

    handler: NoteHandler = field(default_factory=NoteHandler)
    limits: Limits = field(default_factory=Limits)
    states: list[LuoState] = field(default_factory=list)
    #: Sessions whose client closed its fd (the transport's close check
    #: releases them when the core asks).
    closed: set[int] = field(default_factory=set)
    ends: list[socket.socket] = field(default_factory=list)
    host: Host = field(default_factory=Host)

    def __post_init__(self) -> None:
        self.registry = HandlerRegistry([self.handler])
        self.hooks = Hooks(on_state_change=self.states.append, released_meanwhile=self._reap)
        self.luo = Orchestrator(self.registry, self.limits, hooks=self.hooks)
        self.devtable = device_table()
        self.sestable = session_table()

    def _reap(self, session: Session) -> bool:
        if id(session) not in self.closed:
            return False
        self.closed.discard(id(session))
        self.luo.release_session(session)
        return True

    def _bind(self, session: Session) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ends.append(ours)
        session.endpoint = ours
        return theirs.detach()

    def device(self, info: uapi.IoctlInfo, arg: ctypes.Structure, owner: Owner = ROOT) -> Reply:
        call = DeviceCall(self.luo, owner, self._bind, [], self.host)
        return dispatch(self.devtable, info.cmd, bytes(arg), call)

    def session_call(
        self,
        session: Session,
        info: uapi.IoctlInfo,
        arg: ctypes.Structure,
        fds: list[int] | None = None,
        caller: Owner = ROOT,
    ) -> Reply:
        call = SessionCall(self.luo.sessions, session, fds or [], caller, lambda: None)
        return dispatch(self.sestable, info.cmd, bytes(arg), call, session.direction)

    def create(self, name: bytes, owner: Owner = ROOT) -> Session:
        session = self.luo.create_session(name, owner)
        os.close(self._bind(session))  # the client's end: nobody holds it here
        return session

    def preserve(self, session: Session, token: int, data: bytes = b"x") -> int:
        """Preserve a new memfd holding ``data``; returns the orchestrator's fd."""
        fd = memfd(data)
        fds = [fd]
        try:
            self.luo.sessions.preserve_file(session, token, fds)
        finally:
            for left in fds:
                os.close(left)
        return session.files[token].fd

    def close(self) -> None:
        self.luo.close()
        for end in self.ends:
            end.close()


def struct(info: uapi.IoctlInfo, **fields: int) -> ctypes.Structure:
    """A zeroed struct for ``info`` with ``size`` set and ``fields`` filled in."""
    arg = info.struct(size=info.sizeof)
    for name, value in fields.items():
        setattr(arg, name, value)
    return arg


def named(info: uapi.IoctlInfo, name: bytes) -> ctypes.Structure:
    """A CREATE/RETRIEVE_SESSION struct whose name field holds ``name`` (up to 64 bytes)."""
    arg = struct(info, fd=-1)
    field = arg.name  # type: ignore[attr-defined]
    ctypes.memmove(field, name, min(len(name), ctypes.sizeof(field)))
    return arg
