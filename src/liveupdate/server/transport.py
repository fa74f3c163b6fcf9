"""luod's transport: the device socket, session socketpairs, one event loop.

Every connection the daemon serves is an :class:`Endpoint`: a device
connection (accepted on the listening socket, greeted with a hello) or the
daemon's end of a session's socketpair. Requests are decoded by
:mod:`liveupdate.wire`, run through :func:`liveupdate.dispatch.dispatch`
against the core's tables, and answered in order, one reply per message.

The loop is single-threaded (``selectors``): the core is never entered
concurrently, so it needs no locks, exactly like a kernel driver under its
mutex. A client that does not read its replies only stalls itself: its
endpoint stops being read until the replies drain.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import selectors
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from liveupdate import uapi, wire
from liveupdate.core.luo import DeviceCall, Orchestrator
from liveupdate.core.session import Owner, Session, SessionCall
from liveupdate.core.tables import device_table, session_table
from liveupdate.dispatch import DispatchTable, Reply, dispatch
from liveupdate.server.holds import (
    HoldState,
    HoldWatch,
    Verdict,
    inodes_in_queues,
    unix_peer_inode,
)
from liveupdate.server.logs import event

__all__ = ["DeviceServer", "Endpoint"]

_CRED = struct.Struct("3i")
#: Receive buffer: one full request plus one byte, so an oversized message
#: shows up as truncated (its true length comes from MSG_TRUNC).
_RECV_BUF = wire.REQUEST_HEADER.size + wire.MAX_ARG_LEN + 1
#: How long the listener rests after accept() failed (fds exhausted).
_ACCEPT_PAUSE = 0.1
_ACCEPT_WARN_EVERY = 10.0
_HUNG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0x2000)


#: Linux's ``SO_PEERGROUPS`` (4.13), not in every Python's socket module.
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups, as of its connect (``SO_PEERGROUPS``).

    Fixed at connect time like ``SO_PEERCRED``: unlike reading
    ``/proc/PID/status`` later, the peer cannot swap them in between.
    Unknown (an older kernel): none.
    """
    for size in (256 * 4, 65536 * 4):  # NGROUPS_MAX is 65536
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


def peer_owner(sock: socket.socket) -> Owner:
    """``SO_PEERCRED`` (and ``SO_PEERGROUPS``) of a connected Unix socket."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return Owner(pid, uid, gid, peer_groups(sock))


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer of ``sock`` has closed its end (no waiting)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | _HUNG_UP)
    return any(ev & _HUNG_UP for _fd, ev in poller.poll(0))


def _open_spare_fd() -> int:
    """An fd that costs nothing but its slot (``-1`` if the table is full)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


@dataclass(eq=False)
class Endpoint:
    """One socket luod serves.

    Attributes:
        sock: The daemon's side, non-blocking.
        owner: The peer's credentials (for a session: its creator's).
        session: ``None`` for a device connection.
        pending: Replies not yet accepted by the peer's socket.
    """

    sock: socket.socket
    owner: Owner
    session: Session | None = None
    pending: collections.deque[tuple[bytes, int | None]] = field(default_factory=collections.deque)
    closed: bool = False
    #: Close after the pending replies without releasing the session.
    detach: bool = False
    #: Inode of the client's end (known for a session's socketpair, asked
    #: from the kernel for a device connection): who holds it tells a live
    #: client from a ghost (see :mod:`liveupdate.server.holds`).
    peer_inode: int | None = None

    @property
    def kind(self) -> str:
        return "device" if self.session is None else "session"


class DeviceServer:
    """Serves one :class:`Orchestrator` on a listening socket.

    Args:
        luo: The generation to serve.
        listener: A bound, listening ``AF_UNIX``/``SOCK_SEQPACKET`` socket.
    """

    def __init__(self, luo: Orchestrator, listener: socket.socket) -> None:
        self.luo = luo
        self.listener = listener
        listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, None)
        self.device: Endpoint | None = None
        self.endpoints: set[Endpoint] = set()
        #: The reboot host handed to the state machine (a ``Rebooter``).
        self.host: Any = None
        #: What SIGHUP does (luod: retry a failed restore).
        self.on_sighup: Callable[[], None] | None = None
        #: Called before each wait; returns the longest wait in seconds
        #: (``None``: until an event). luod keeps its journal with it.
        self.on_idle: Callable[[], float | None] | None = None
        self.device_table: DispatchTable[DeviceCall] = device_table()
        self.session_table: DispatchTable[SessionCall] = session_table()
        self._stop = False
        #: While accept() fails for lack of fds: when to try again.
        self._accept_resume: float | None = None
        self._accept_warned = 0.0
        #: Given up when the fd table is full, to answer an opener EMFILE.
        self._spare_fd = _open_spare_fd()
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        #: Work to run between two events (e.g. a reboot requested by an ioctl,
        #: which must happen after its reply was sent).
        self.deferred: collections.deque[Callable[[], None]] = collections.deque()
        #: Endpoints whose client's end may be held by no process.
        self.holds: HoldWatch[Endpoint] = HoldWatch(self._queued_inodes)

    @property
    def luo(self) -> Orchestrator:
        """The generation served; every one is given the transport's close check."""
        return self._luo

    @luo.setter
    def luo(self, luo: Orchestrator) -> None:
        luo.reap = self.reap
        self._luo = luo

    # -- lifecycle ------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop cleanly; the wakeup fd breaks the wait."""
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGUSR1, self._on_usr1)

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        event("signal", signal=signal.Signals(signum).name)
        self._stop = True

    def _on_hup(self, _signum: int, _frame: object) -> None:
        # Runs between two events, never inside a call.
        if self.on_sighup is not None:
            self.deferred.append(self.on_sighup)

    def _on_usr1(self, _signum: int, _frame: object) -> None:
        # The operator's way to list holds and break ghosts: it needs no
        # device connection, so it works while the device is stuck busy.
        self.deferred.append(self.report_holds)

    def stop(self) -> None:
        self._stop = True

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` or a stop signal."""
        while not self._stop:
            waits = [
                self._resume_accept(),
                self.on_idle() if self.on_idle is not None else None,
                self.holds.due(),
            ]
            timeout = min((w for w in waits if w is not None), default=None)
            for key, mask in self.selector.select(timeout=timeout):
                try:
                    self._event(key, mask)
                except Exception:
                    # Whatever a handler (a third-party one above all) does on
                    # a close or a flush, the daemon and its files live on.
                    event("internal-error", logging.ERROR, exc_info=True, where="event loop")
                if self.deferred:
                    # Deferred work (a reboot) runs right after the call that
                    # asked for it: no other client is served in between.
                    break
            while self.deferred:
                self.deferred.popleft()()
            if self.holds.due() == 0:
                try:
                    self._confirm_suspects()
                except Exception:
                    event("internal-error", logging.ERROR, exc_info=True, where="holds")

    def _event(self, key: selectors.SelectorKey, mask: int) -> None:
        if key.fileobj is self.listener:
            self._accept()
        elif key.fileobj is self._wakeup_r:
            self._drain_wakeup()
        else:
            ep: Endpoint = key.data
            if mask & selectors.EVENT_WRITE:
                self._flush(ep)
            if mask & selectors.EVENT_READ and not ep.closed:
                self._serve(ep)

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def close_connections(self) -> None:
        """Close every device and session endpoint without releasing sessions.

        Used by a reboot: the old generation's fds die with their sockets,
        while the files stay held by the orchestrator for the next one.
        """
        for ep in list(self.endpoints):
            self._discard_input(ep)
            self._drop(ep)
        self.device = None

    def _discard_input(self, ep: Endpoint) -> None:
        """Read away requests nobody will answer, so the close is a clean EOF.

        Closing a Unix socket with unread data resets the peer, which may then
        lose the replies already sent to it (the REBOOT's own reply above all).
        """
        for _ in range(1024):
            try:
                msg = wire.recv_message(ep.sock, _RECV_BUF, flags=socket.MSG_DONTWAIT)
            except OSError:
                return
            wire.close_fds(msg.fds)
            if msg.length == 0:
                return

    def close(self) -> None:
        """Tear down the loop (the listening socket is the caller's)."""
        self.close_connections()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        self._wakeup_r.close()
        self._wakeup_w.close()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1

    # -- device connections ---------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_with_spare_fd():
                    continue
                # ENOBUFS, or no spare fd: the client stays in the backlog. Stop
                # watching the listener for a moment (it stays readable: a
                # level-triggered loop would spin) and say so once a while.
                self._pause_accept()
                now = time.monotonic()
                if now - self._accept_warned > _ACCEPT_WARN_EVERY:
                    self._accept_warned = now
                    event("accept-failed", logging.WARNING, error=exc.strerror)
                return
            self._open_device(sock)

    def _refuse_with_spare_fd(self) -> bool:
        """The fd table is full: answer one waiting opener ``EMFILE`` anyway.

        The spare fd is given up for the time of one accept, so that the
        opener gets a hello with an errno instead of hanging in the backlog.
        Whether one was answered.
        """
        if self._spare_fd < 0:
            self._spare_fd = _open_spare_fd()
            return False
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            sock, _addr = self.listener.accept()
        except OSError:
            self._spare_fd = _open_spare_fd()
            return False
        with sock:
            try:
                sock.setblocking(False)
                sock.send(wire.encode_hello(-errno.EMFILE))
            except OSError:
                pass
        self._spare_fd = _open_spare_fd()  # the slot the answered socket had
        now = time.monotonic()
        if now - self._accept_warned > _ACCEPT_WARN_EVERY:
            self._accept_warned = now
            event("device-refused-no-fds", logging.WARNING)
        return True

    def _pause_accept(self) -> None:
        if self._accept_resume is None:
            self.selector.unregister(self.listener)
        self._accept_resume = time.monotonic() + _ACCEPT_PAUSE

    def _resume_accept(self) -> float | None:
        """Watch the listener again once the pause is over; the time left, else None."""
        if self._accept_resume is None:
            return None
        left = self._accept_resume - time.monotonic()
        if left > 0:
            return left
        self._accept_resume = None
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        return None

    def _open_device(self, sock: socket.socket) -> None:
        owner = peer_owner(sock)
        status = 0
        try:
            self.luo.check_open()
        except OSError as exc:
            status = -(exc.errno or errno.EIO)
        # Single opener. A client that closed and reopened at once must not see
        # EBUSY just because its hang-up has not been processed yet; nor may a
        # client end parked in flight (only in some socket queue) keep it busy.
        if status == 0 and self.device is not None:
            if hung_up(self.device.sock) or self._is_ghost(self.device, "device busy"):
                self._close(self.device)
            else:
                status = -errno.EBUSY
        try:
            sock.sendall(wire.encode_hello(status))
        except OSError:
            sock.close()
            return
        if status != 0:
            event("device-refused", logging.DEBUG, peer_pid=owner.pid, errno=-status)
            sock.close()
            return
        ep = Endpoint(sock, owner)
        self._register(ep)
        self.device = ep
        event("device-opened", peer_pid=owner.pid, uid=owner.uid)

    # -- sessions -------------------------------------------------------------

    def bind_session(self, session: Session) -> int:
        """Give ``session`` a socketpair; returns the client's end to send."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A session fd can be passed around: every request then carries its
        # real sender's credentials (SCM_CREDENTIALS) for the owner checks.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ep = Endpoint(ours, session.owner, session, peer_inode=os.fstat(theirs.fileno()).st_ino)
        session.endpoint = ep
        self._register(ep)
        return theirs.detach()

    def reap(self, session: Session) -> bool:
        """Release ``session`` now if its client already closed its fd."""
        ep = session.endpoint
        if not isinstance(ep, Endpoint) or ep.closed:
            return False
        # A fd parked in flight (in a socket queue, by no process) is as
        # closed as it will ever get: the core asks before refusing anyone.
        if not hung_up(ep.sock) and not self._is_ghost(ep, "session conflict"):
            return False
        # Requests it left unanswered cannot be answered any more: the close
        # is what counts, as it would be for a kernel's synchronous close().
        self._close(ep)
        return True

    # -- holds luod cannot see -----------------------------------------------

    def _peer_inode(self, ep: Endpoint) -> int | None:
        if ep.peer_inode is None and ep.session is None:
            try:
                ep.peer_inode = unix_peer_inode(os.fstat(ep.sock.fileno()).st_ino)
            except OSError:
                return None
        return ep.peer_inode

    def _verdict(self, ep: Endpoint, force: bool = False) -> Verdict:
        # Closing a session loses its files: only a proven cycle does that.
        return self.holds.verdict(
            ep, self._peer_inode(ep), strict=ep.session is not None, force=force
        )

    def _queued_inodes(self) -> set[int]:
        """What is in flight in the queues of the sockets luod holds."""
        roots = [ep.sock.fileno() for ep in self.endpoints if not ep.closed]
        for session in [*self.luo.outgoing.values(), *self.luo.incoming.values()]:
            roots += [f.fd for f in session.files.values() if f.fd >= 0]
        return inodes_in_queues(roots)

    def _is_ghost(self, ep: Endpoint, why: str, force: bool = False) -> bool:
        """Whether ``ep``'s client end has been only in flight for a grace
        period (logged: the caller then closes ``ep`` as its client would have).

        Only asked when someone is refused because of ``ep`` (or by the
        operator's SIGUSR1), never in passing: the census walks /proc.
        """
        verdict = self._verdict(ep, force)
        if verdict.state != HoldState.GHOST:
            return False
        self._log_ghost(ep, f"{why}: {verdict.why}")
        return True

    def _log_ghost(self, ep: Endpoint, why: str) -> None:
        fields: dict[str, Any] = {
            "kind": ep.kind,
            "inode": ep.peer_inode,
            "peer_pid": ep.owner.pid,
            "uid": ep.owner.uid,
            "why": why,
        }
        if ep.session is not None:
            fields["session"] = ep.session.display_name
        event("hold-broken", logging.WARNING, **fields)

    def _confirm_suspects(self) -> None:
        """A grace period after an endpoint was seen in flight: look again."""
        self.holds.keep_only(self.endpoints)
        for ep in self.holds.suspects():
            if not ep.closed and self._is_ghost(ep, "still in flight"):
                self._close(ep)

    def report_holds(self) -> None:
        """Log who holds the client's end of every endpoint (SIGUSR1).

        Endpoints found in flight are looked at again a grace period later
        and closed if they still are: the operator's way out of a hold no
        client can release, which costs nobody else's session.
        """
        eps = sorted(self.endpoints, key=lambda e: (e.session is not None, e.sock.fileno()))
        broken = 0
        counts: dict[str, int] = {state.value: 0 for state in HoldState}
        for n, ep in enumerate(eps):
            if ep.closed:
                continue
            verdict = self._verdict(ep, force=n == 0)
            counts[verdict.state.value] += 1
            fields: dict[str, Any] = {"kind": ep.kind, "inode": ep.peer_inode}
            if ep.session is not None:
                fields["session"] = ep.session.display_name
            fields["holders"] = verdict.describe()
            if verdict.why:
                fields["why"] = verdict.why
            event("hold", **fields)
            if verdict.state == HoldState.GHOST:
                self._log_ghost(ep, f"operator (SIGUSR1): {verdict.why}")
                self._close(ep)
                broken += 1
        event(
            "holds-reported",
            endpoints=len(eps),
            held=counts["held"],
            in_flight=counts["in-flight"],
            ghosts=counts["ghost"],
            unknown=counts["unknown"],
            broken=broken,
        )

    # -- serving --------------------------------------------------------------

    def _register(self, ep: Endpoint) -> None:
        ep.sock.setblocking(False)
        self.endpoints.add(ep)
        self.selector.register(ep.sock, selectors.EVENT_READ, ep)

    def _serve(self, ep: Endpoint) -> None:
        """Answer the messages waiting on ``ep``, one reply each."""
        # Once work is deferred (an accepted REBOOT), nothing more is read:
        # the next request belongs to the next generation.
        while not ep.closed and not ep.pending and not self.deferred:
            try:
                msg = wire.recv_message(
                    ep.sock,
                    _RECV_BUF,
                    flags=socket.MSG_DONTWAIT,
                    creds=ep.session is not None,
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._close(ep)
                return
            if msg.length == 0:
                wire.close_fds(msg.fds)
                self._close(ep)  # EOF, or a zero-length message: both mean close
                return
            try:
                reply = self._handle(ep, msg)
            except Exception:
                # A bug in the orchestrator must not take the daemon (and every
                # preserved file) down: answer EIO and keep serving.
                event("internal-error", logging.ERROR, exc_info=True, endpoint=ep.kind)
                reply = Reply.error(errno.EIO)
            finally:
                wire.close_fds(msg.fds)
            self._reply(ep, wire.encode_reply(reply.ret, reply.out), reply.fd)

    def _handle(self, ep: Endpoint, msg: wire.Message) -> Reply:
        try:
            req = wire.decode_request(msg.data, msg.length)
        except wire.FramingError as exc:
            event("bad-request", logging.DEBUG, endpoint=ep.kind, errno=exc.errno, why=str(exc))
            return Reply.error(exc.errno)
        if msg.fds_truncated:
            # Our own fd table is full: the kernel dropped what was sent.
            event("fds-dropped", logging.WARNING, endpoint=ep.kind)
            return Reply.error(errno.ENOMEM)
        if ep.session is None:
            dcall = DeviceCall(self.luo, ep.owner, self.bind_session, msg.fds, self.host)
            reply = dispatch(self.device_table, req.cmd, req.arg, dcall)
        else:
            caller = Owner(*msg.creds) if msg.creds is not None else None
            scall = SessionCall(
                self.luo, ep.session, msg.fds, caller, lambda: self._detach_after_reply(ep)
            )
            reply = dispatch(self.session_table, req.cmd, req.arg, scall, ep.session.direction)
        self._log_call(ep, req.cmd, reply)
        return reply

    def _log_call(self, ep: Endpoint, cmd: int, reply: Reply) -> None:
        info = uapi.IOCTLS.get(cmd)
        name = info.name if info else f"{cmd:#x}"
        fields: dict[str, Any] = {"ioctl": name, "peer_pid": ep.owner.pid}
        if ep.session is not None:
            fields["session"] = ep.session.display_name
        if reply.ret:
            fields["errno"] = errno.errorcode.get(-reply.ret, str(-reply.ret))
            event("ioctl-failed", logging.DEBUG, **fields)
        else:
            event("ioctl", logging.DEBUG, **fields)

    def _detach_after_reply(self, ep: Endpoint) -> None:
        """The session was handed over: its fd dies once this reply is out."""
        ep.detach = True

    def _reply(self, ep: Endpoint, data: bytes, fd: int | None) -> None:
        if ep.closed:  # the call itself closed it (e.g. released its own session)
            if fd is not None:
                os.close(fd)
            return
        ep.pending.append((data, fd))
        self._flush(ep)

    def _flush(self, ep: Endpoint) -> None:
        while ep.pending and not ep.closed:
            data, fd = ep.pending[0]
            try:
                wire.send_message(ep.sock, data, [] if fd is None else [fd])
            except (BlockingIOError, InterruptedError):
                self.selector.modify(ep.sock, selectors.EVENT_WRITE, ep)
                return
            except OSError:
                self._close(ep)  # the peer is gone: its reply has nowhere to go
                return
            ep.pending.popleft()
            if fd is not None:
                os.close(fd)
        if ep.detach and not ep.pending:
            self._drop(ep)
            return
        if not ep.closed:
            # Requests that queued meanwhile are reported again (level-triggered).
            self.selector.modify(ep.sock, selectors.EVENT_READ, ep)

    def _drop(self, ep: Endpoint) -> None:
        """Close the socket and forget the endpoint, without touching its session."""
        if ep.closed:
            return
        ep.closed = True
        for _data, fd in ep.pending:
            if fd is not None:
                os.close(fd)
        ep.pending.clear()
        self.endpoints.discard(ep)
        self.holds.forget(ep)
        try:
            self.selector.unregister(ep.sock)
        except (KeyError, ValueError):
            pass
        ep.sock.close()
        if ep.session is not None and ep.session.endpoint is ep:
            ep.session.endpoint = None

    def _close(self, ep: Endpoint) -> None:
        """The peer closed ``ep``: release its session or free the device.

        A session handed over on this fd (LUOD_SESSION_UPDATE) is not this
        fd's any more: its close, even before the reply got out, changes
        nothing.
        """
        session = ep.session
        handed_over = ep.detach or (session is not None and session.endpoint is not ep)
        self._drop(ep)
        if handed_over:
            return
        if session is None:
            if self.device is ep:
                self.device = None
                event("device-closed", peer_pid=ep.owner.pid)
            return
        nfiles = len(session.files)
        self.luo.release_session(session)
        event(
            "session-released",
            session=session.display_name,
            direction=session.direction.name.lower(),
            files=nfiles,
        )
