"""luod's transport: the device socket, session socketpairs, one event loop.

Every connection the daemon serves is an :class:`Endpoint`: a device
connection (accepted on the listening socket, greeted with a hello), the
daemon's end of a session's socketpair, or a channel bound to either by a
BIND message (wire 1.1: a caller's private connection to a shared fd, see
:meth:`DeviceServer._bind`). Requests are decoded by
:mod:`liveupdate.wire`, run through :func:`liveupdate.dispatch.dispatch`
against the core's tables, and answered in order, one reply per message.

The loop is single-threaded (``selectors``): the core is never entered
concurrently, so it needs no locks, exactly like a kernel driver under its
mutex. A client that does not read its replies only stalls itself: its
endpoint stops being read until the replies drain.

What the daemon plugs in is given to the constructor (:class:`ServerHooks`):
the reboot host (luod's re-exec driver, :mod:`liveupdate.server.reexec`),
which drives the server back through a small interface (:meth:`~DeviceServer.defer`,
:meth:`~DeviceServer.replace_generation`, :attr:`~DeviceServer.listener_fd`),
and what SIGHUP and an idle loop do. Ghost holds (a client's end parked in
flight) are told apart by :mod:`liveupdate.server.holds`.
"""

from __future__ import annotations

import collections
import errno
import functools
import gc
import logging
import os
import selectors
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from liveupdate import uapi, wire
from liveupdate.core.luo import DeviceCall, Orchestrator
from liveupdate.core.policy import Owner
from liveupdate.core.reboot import RebootHost
from liveupdate.core.session import Session
from liveupdate.core.session_ops import SessionCall
from liveupdate.core.tables import device_table, session_table
from liveupdate.dispatch import DispatchTable, Reply, dispatch
from liveupdate.events import EVENT_LOGGER, event
from liveupdate.server.acceptor import Acceptor
from liveupdate.server.control import control_table
from liveupdate.server.endpoint import Endpoint, hung_up, peer_owner
from liveupdate.server.holds import EndpointHolds

__all__ = ["DeviceServer", "Endpoint", "ServerHooks"]

#: Receive buffer: one full request plus one byte, so an oversized message
#: shows up as truncated (its true length comes from MSG_TRUNC).
_RECV_BUF = wire.REQUEST_HEADER.size + wire.MAX_ARG_LEN + 1
#: ``socket.MSG_DONTWAIT`` as a plain int (socket's flags are ``enum.IntFlag``).
_DONTWAIT = int(socket.MSG_DONTWAIT)
#: The events' logger, asked once per call whether ioctls are logged at all.
_events = logging.getLogger(EVENT_LOGGER)
#: Channels one device or session connection may have at once: one per
#: process that shares its fd, in practice. Each costs luod an fd; beyond
#: this a BIND is answered ``EMFILE``.
MAX_CHANNELS = 256


def _earliest(*waits: float | None) -> float | None:
    """The shortest of ``waits`` in seconds, ``None`` (no limit) when all are.

    Runs before every wait of the loop: plain comparisons, no list or
    generator to build.
    """
    earliest = None
    for wait in waits:
        if wait is not None and (earliest is None or wait < earliest):
            earliest = wait
    return earliest


@dataclass(frozen=True)
class ServerHooks:
    """What the daemon plugs into its transport; each runs between two events."""

    #: Carries out reboots (luod's re-exec driver); ``None``: REBOOT is refused.
    host: RebootHost | None = None
    #: What SIGHUP does (luod: retry a failed restore).
    on_sighup: Callable[[], None] | None = None
    #: Called before each wait; returns the longest wait in seconds
    #: (``None``: until an event). luod keeps its journal with it.
    on_idle: Callable[[], float | None] | None = None


class DeviceServer:
    """Serves one :class:`Orchestrator` on a listening socket.

    Args:
        luo: The generation to serve.
        listener: A bound, listening ``AF_UNIX``/``SOCK_SEQPACKET`` socket.
        hooks: Builds the daemon's hooks for this server (the reboot host
            drives the server it is given); none by default.
        control: The control socket's listener (:mod:`liveupdate.server.control`),
            if luod serves one.
        linux_exact: Linux's tables on the device and session fds
            (``luod --compat=linux``); the control socket's stays luod's.
    """

    def __init__(
        self,
        luo: Orchestrator,
        listener: socket.socket,
        hooks: Callable[[DeviceServer], ServerHooks] | None = None,
        control: socket.socket | None = None,
        linux_exact: bool = False,
    ) -> None:
        self._serve_generation(luo)
        self.listener = listener
        self.selector = selectors.DefaultSelector()
        self.acceptor = Acceptor(listener, self.selector)
        self.control_listener = control
        self.control_acceptor = Acceptor(control, self.selector) if control is not None else None
        self.device: Endpoint | None = None
        self.endpoints: set[Endpoint] = set()
        #: Channels open (wire 1.1): fds held for callers, like sessions'.
        self.channel_count = 0
        self.device_table: DispatchTable[DeviceCall] = device_table(linux_exact)
        self.session_table: DispatchTable[SessionCall] = session_table(linux_exact)
        self.control_table: DispatchTable[DeviceCall] = control_table()
        #: Calls by ioctl number, and failed calls by (ioctl number, errno):
        #: plain dicts, cheap on every call; the metrics read them when scraped.
        self.calls: dict[int, int] = {}
        self.failures: dict[tuple[int, int], int] = {}
        self._stop = False
        #: Every request is received into this one buffer (one at a time).
        self._recv_buffer = bytearray(_RECV_BUF)
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, None)
        #: Work to run between two events (see :meth:`defer`).
        self._deferred: collections.deque[Callable[[], None]] = collections.deque()
        #: Endpoints whose client's end may be held by no process.
        self.holds = EndpointHolds(self._held_fds, self._close)
        self.hooks = hooks(self) if hooks is not None else ServerHooks()

    # -- what the reboot host drives -------------------------------------------

    @property
    def luo(self) -> Orchestrator:
        """The generation served."""
        return self._luo

    @property
    def listener_fd(self) -> int:
        """The listening socket's fd (a re-exec hands it on)."""
        return self.listener.fileno()

    @property
    def control_fd(self) -> int:
        """The control socket's listener fd (``-1``: none); handed on like the device's."""
        return self.control_listener.fileno() if self.control_listener is not None else -1

    def call_soon_threadsafe(self, work: Callable[[], None]) -> None:
        """Run ``work`` in the loop, between two events, from another thread.

        The only entry into the loop from outside it (the metrics endpoint's
        thread asks for a snapshot this way): the core stays single-threaded.
        """
        self._deferred.append(work)  # deque.append is atomic
        try:
            self._wakeup_w.send(b"\0")
        except OSError:
            pass  # full: a wake-up is pending anyway

    def defer(self, work: Callable[[], None]) -> None:
        """Run ``work`` once the current call's reply is sent, before any other
        request is read (a reboot requested by an ioctl)."""
        self._deferred.append(work)

    def replace_generation(self, luo: Orchestrator) -> None:
        """Serve ``luo`` from now on (a reboot without exec)."""
        self._serve_generation(luo)

    def _serve_generation(self, luo: Orchestrator) -> None:
        # The generation was given the transport's close check (:meth:`reap`)
        # at construction, through its hooks.
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
        # The flag first: the log write below can fail when the signal
        # interrupted another write to the same stream (a reentrant call).
        self._stop = True
        event("signal", signal=signal.Signals(signum).name)

    def _on_hup(self, _signum: int, _frame: object) -> None:
        # Runs between two events, never inside a call.
        if self.hooks.on_sighup is not None:
            self.defer(self.hooks.on_sighup)

    def _on_usr1(self, _signum: int, _frame: object) -> None:
        # The operator's way to list holds and break ghosts: it needs no
        # device connection, so it works while the device is stuck busy.
        self.defer(self.report_holds)

    def stop(self) -> None:
        self._stop = True

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` or a stop signal."""
        # What exists before serving (modules, tables, the restored
        # generation) lives as long as the daemon: the cyclic collector need
        # not walk it again. Each full collection would otherwise walk all of
        # it, a pause that lands on some client's call (the p99).
        gc.freeze()
        while not self._stop:
            on_idle = self.hooks.on_idle
            timeout = _earliest(
                self.acceptor.resume(),
                on_idle() if on_idle is not None else None,
                self.holds.due(),
            )
            for key, mask in self.selector.select(timeout=timeout):
                try:
                    self._event(key, mask)
                except Exception:
                    # Whatever a handler (a third-party one above all) does on
                    # a close or a flush, the daemon and its files live on.
                    event("internal-error", logging.ERROR, exc_info=True, where="event loop")
                if self._deferred:
                    # Deferred work (a reboot) runs right after the call that
                    # asked for it: no other client is served in between.
                    break
            while self._deferred:
                self._deferred.popleft()()
            if self.holds.due() == 0:
                try:
                    self.holds.confirm_suspects(self.endpoints)
                except Exception:
                    event("internal-error", logging.ERROR, exc_info=True, where="holds")

    def _event(self, key: selectors.SelectorKey, mask: int) -> None:
        ep: Endpoint | None = key.data  # None: a listener or the wakeup fd
        if ep is not None:
            if mask & selectors.EVENT_WRITE:
                self._flush(ep)
            if mask & selectors.EVENT_READ and not ep.closed:
                self._serve(ep)
        elif key.fileobj is self.listener:
            for sock in self.acceptor.accept():
                self._open_device(sock)
        elif self.control_acceptor is not None and key.fileobj is self.control_listener:
            for sock in self.control_acceptor.accept():
                self._open_control(sock)
        else:
            self._drain_wakeup()

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
            if ep.main is None:  # a channel goes with the fd it serves
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
        self.acceptor.close()
        if self.control_acceptor is not None:
            self.control_acceptor.close()

    # -- device connections ---------------------------------------------------

    def _open_status(self) -> int:
        """0, or the negative errno that refuses every new connection's open
        (the incoming state could not be restored: ``EIO``)."""
        try:
            self.luo.check_open()
        except OSError as exc:
            return -(exc.errno or errno.EIO)
        return 0

    @staticmethod
    def _send_hello(sock: socket.socket, status: int) -> bool:
        """Greet a new connection; False (closed) when the peer is already gone."""
        try:
            sock.sendall(wire.encode_hello(status))
        except OSError:
            sock.close()
            return False
        return True

    def _open_device(self, sock: socket.socket) -> None:
        owner = peer_owner(sock)
        status = self._open_status()
        # Single opener. A client that closed and reopened at once must not see
        # EBUSY just because its hang-up has not been processed yet; nor may a
        # client end parked in flight (only in some socket queue) keep it busy.
        if status == 0 and self.device is not None:
            if hung_up(self.device.sock) or self.holds.is_ghost(self.device, "device busy"):
                self._close(self.device)
            else:
                status = -errno.EBUSY
        if not self._send_hello(sock, status):
            return
        if status != 0:
            event("device-refused", logging.DEBUG, peer_pid=owner.pid, errno=-status)
            sock.close()
            return
        ep = Endpoint(sock, owner)
        self._register(ep)
        self.device = ep
        event("device-opened", peer_pid=owner.pid, uid=owner.uid)

    def _open_control(self, sock: socket.socket) -> None:
        """A control connection: never exclusive, greeted like the device's."""
        owner = peer_owner(sock)
        status = self._open_status()
        if not self._send_hello(sock, status):
            return
        if status != 0:
            sock.close()
            return
        ep = Endpoint(sock, owner, control=True)
        self._register(ep)
        event("control-opened", logging.DEBUG, peer_pid=owner.pid, uid=owner.uid)

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
        if not hung_up(ep.sock) and not self.holds.is_ghost(ep, "session conflict"):
            return False
        # Requests it left unanswered cannot be answered any more: the close
        # is what counts, as it would be for a kernel's synchronous close().
        self._close(ep)
        return True

    # -- holds luod cannot see -----------------------------------------------

    def _held_fds(self) -> list[int]:
        """The fds luod holds whose socket queues may park a client's end."""
        fds = [ep.sock.fileno() for ep in self.endpoints if not ep.closed]
        for session in [*self.luo.sessions.outgoing.values(), *self.luo.sessions.incoming.values()]:
            fds += [f.fd for f in session.files.values() if f.fd >= 0]
        return fds

    def report_holds(self) -> None:
        """Log who holds the client's end of every endpoint, break ghosts (SIGUSR1)."""
        self.holds.report(self.endpoints)

    # -- serving --------------------------------------------------------------

    def _register(self, ep: Endpoint) -> None:
        ep.sock.setblocking(False)
        self.endpoints.add(ep)
        self.selector.register(ep.sock, selectors.EVENT_READ, ep)

    def _serve(self, ep: Endpoint) -> None:
        """Answer one message waiting on ``ep``.

        One message per wake-up, then back to the selector: it reports the
        socket again while messages wait (level-triggered), and a client
        that waits for each reply (every client) leaves exactly one, so
        reading on until ``EAGAIN`` would cost a failed ``recvmsg`` per call.
        """
        # Once work is deferred (an accepted REBOOT), nothing more is read:
        # the next request belongs to the next generation.
        if ep.closed or ep.pending or self._deferred:
            return
        try:
            msg = wire.recv_message(
                ep.sock,
                _RECV_BUF,
                flags=_DONTWAIT,
                creds=ep.session is not None,
                buffer=self._recv_buffer,
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
        if reply is not None:
            self._reply(ep, wire.encode_reply(reply.ret, reply.out), reply.fd)

    def _handle(self, ep: Endpoint, msg: wire.Message) -> Reply | None:
        """The reply to one request; ``None`` for a BIND answered on its channel."""
        try:
            req = wire.decode_request(msg.data, msg.length)
        except wire.FramingError as exc:
            event("bad-request", logging.DEBUG, endpoint=ep.kind, errno=exc.errno, why=str(exc))
            return Reply.error(exc.errno)
        if msg.fds_truncated:
            # Our own fd table is full: the kernel dropped what was sent.
            event("fds-dropped", logging.WARNING, endpoint=ep.kind)
            return Reply.error(errno.ENOMEM)
        if req.cmd == wire.BIND_CMD:
            return self._bind(ep, req.arg, msg.fds)
        # One call context per endpoint, made at its first call and refreshed
        # with what changes per call: nothing is allocated for the context on
        # the fast path.
        session = ep.session
        if session is None:
            dcall = ep.device_call
            if dcall is None:
                dcall = ep.device_call = DeviceCall(self.luo, ep.owner, self.bind_session)
            dcall.luo = self._luo
            dcall.fds_in = msg.fds
            dcall.host = self.hooks.host
            table = self.control_table if ep.control else self.device_table
            reply = dispatch(table, req.cmd, req.arg, dcall)
        else:
            scall = ep.session_call
            if scall is None:
                detach = functools.partial(self._detach_after_reply, ep)
                scall = ep.session_call = SessionCall(self._luo.sessions, session, detach=detach)
            scall.sessions = self._luo.sessions
            scall.fds_in = msg.fds
            # The sender's credentials (SCM_CREDENTIALS) come with every
            # message; the Owner made of them is kept while they repeat.
            if msg.creds != ep.sender_creds:
                ep.sender_creds = msg.creds
                ep.sender = Owner(*msg.creds) if msg.creds is not None else None
            scall.caller = ep.sender
            reply = dispatch(self.session_table, req.cmd, req.arg, scall, session.direction)
        calls = self.calls
        calls[req.cmd] = calls.get(req.cmd, 0) + 1
        if reply.ret:
            key = (req.cmd, -reply.ret)
            self.failures[key] = self.failures.get(key, 0) + 1
        if _events.isEnabledFor(logging.DEBUG):  # cached by logging until a level changes
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
        if ep.main is not None:
            # Asked on a channel: the session's own fd is handed over too
            # (its close, from now on, is no release).
            ep.main.detach = True

    # -- channels (wire 1.1) --------------------------------------------------

    def _bind(self, ep: Endpoint, arg: bytes, fds: list[int]) -> Reply | None:
        """Serve the socket a BIND carries as a private channel of ``ep``'s fd.

        Processes sharing one device or session fd share one queue of
        replies: whoever reads first takes the next one. A caller that binds
        a channel (one end of its own socketpair) sends its requests there
        and gets its replies there, while the channel serves the very same
        device or session. The BIND is acknowledged *on the channel* (a
        reply of ``ret`` 0), so no other sharer can take the
        acknowledgement; a BIND that fails is answered on ``ep`` like any
        request, since there is no channel to answer on.

        A session channel checks each call's sender like the session's fd
        (``SCM_CREDENTIALS``); a device channel belongs to the process that
        made the socketpair (``SO_PEERCRED``), not to the device's opener.
        Closing a channel ends only the channel; the close of the fd it was
        bound to ends every channel with it.
        """
        try:
            wire.decode_bind(arg)
        except wire.FramingError as exc:
            return Reply.error(exc.errno)
        if len(fds) != 1:
            return Reply.error(errno.EBADF)
        main = ep.main or ep
        if len(main.channels) >= MAX_CHANNELS:
            return Reply.error(errno.EMFILE)
        try:
            # A channel is one more fd held for a caller, like a session's.
            self.luo.sessions.check_fd_reserve(self.channel_count)
        except OSError as exc:
            return Reply.error(exc.errno or errno.EMFILE)
        try:
            sock = socket.socket(fileno=fds[0])
        except OSError:  # not a socket (ENOTSOCK)
            return Reply.error(errno.EINVAL)
        fds.clear()  # the socket owns the fd now
        try:
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
                raise OSError(errno.EINVAL, "a channel is an AF_UNIX SOCK_SEQPACKET socket")
            owner = main.owner if main.session is not None else peer_owner(sock)
            if main.session is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.setblocking(False)
            # A socket with no peer (never connected, or its other end
            # already closed) fails here: nobody could read the replies.
            sock.send(wire.encode_reply(0))
        except OSError:
            sock.close()
            return Reply.error(errno.EINVAL)
        chan = Endpoint(sock, owner, main.session, control=main.control, main=main)
        main.channels.append(chan)
        self.channel_count += 1
        self._register(chan)
        event("channel-bound", logging.DEBUG, endpoint=main.kind, peer_pid=owner.pid)
        return None

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
                wire.send_message(ep.sock, data, () if fd is None else (fd,))
            except (BlockingIOError, InterruptedError):
                self.selector.modify(ep.sock, selectors.EVENT_WRITE, ep)
                ep.writing = True
                return
            except OSError:
                self._close(ep)  # the peer is gone: its reply has nowhere to go
                return
            ep.pending.popleft()
            if fd is not None:
                os.close(fd)
        if ep.detach and not ep.pending:
            self._drop(ep.main or ep)
            return
        if ep.writing and not ep.closed:
            # Back to reading: requests that queued meanwhile are reported
            # again (level-triggered). Only after a blocked send: modifying
            # the selector is a system call.
            self.selector.modify(ep.sock, selectors.EVENT_READ, ep)
            ep.writing = False

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
        # The fd's own hang-up first, then its channels': a process that
        # learns of the close on its channel finds the shared fd (its
        # sharers' signal) already hung up.
        channels, ep.channels = ep.channels, []
        for chan in channels:
            self._discard_input(chan)
            self._drop(chan)
        if ep.main is not None:
            self.channel_count -= 1
            if ep in ep.main.channels:
                ep.main.channels.remove(ep)
        if ep.session is not None and ep.session.endpoint is ep:
            ep.session.endpoint = None

    def _close(self, ep: Endpoint) -> None:
        """The peer closed ``ep``: release its session or free the device.

        A session handed over on this fd (LUOD_SESSION_UPDATE) is not this
        fd's any more: its close, even before the reply got out, changes
        nothing.
        """
        session = ep.session
        # A channel's close ends the channel only: the fd it serves lives on.
        handed_over = (
            ep.main is not None or ep.detach or (session is not None and session.endpoint is not ep)
        )
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
