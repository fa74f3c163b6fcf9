"""kvcache's event loop: one selector, the listener, every connection, the freeze doorbell.

Under ``luoctl run`` every connection goes into the session as it is
accepted (and leaves it as it closes), so whatever process serves next finds
them all. Asked to freeze (a pre-started update), or sent SIGTERM, the loop
stops reading and accepting, writes what each connection had half-sent
(an incomplete command) and what it had not been sent yet (a reply the
socket would not take) into the connection-state memfd, marks the arena
clean and exits: the successor picks each connection up exactly where this
one left it. Bytes clients send meanwhile wait in the kernel's socket
buffers, and connection attempts in the listener's backlog.

As a participant of luod's live updates (:mod:`liveupdate.kvcache.participant`)
the loop also polls the participant fd; while luod freezes, a connection
whose next command writes is left unread (:meth:`Server.freeze_writes`) and
the others are served.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from liveupdate.kvcache.arena import Arena
from liveupdate.kvcache.participant import CARRIED, UpdateParticipant
from liveupdate.kvcache.protocol import HELD, Protocol

if TYPE_CHECKING:
    from liveupdate.client.service import InheritedSession

__all__ = [
    "ARENA",
    "CONN_STATE",
    "FIRST_CONNECTION",
    "LISTENER",
    "Connection",
    "Server",
    "read_conn_state",
    "write_conn_state",
]

#: Session tokens: the listener, the arena memfd, the connection-state memfd,
#: then one per connection from FIRST_CONNECTION on.
LISTENER = 1
ARENA = 2
CONN_STATE = 3
FIRST_CONNECTION = 16

_RECV = 262144
_ACCEPT_BATCH = 64
_ENTRY = struct.Struct("<QII")  # token, unread input bytes, unsent output bytes
_COUNT = struct.Struct("<I")

#: Why the loop stopped.
STOP = "stop"
FREEZE = "freeze"
HANDOFF = "handoff"


#: Files preserved again per turn of the loop after a hand-over
#: (``InheritedSession.preserve_pending``): about 1 ms of luod calls.
PENDING_PER_TURN = 16


class Connection:
    """One client: its socket, session token, unparsed input and unsent output."""

    __slots__ = ("inbuf", "outbuf", "sock", "token")

    def __init__(self, sock: socket.socket, token: int) -> None:
        self.sock = sock
        self.token = token
        self.inbuf = b""
        self.outbuf = b""


def write_conn_state(fd: int, conns: list[Connection]) -> None:
    """Write each connection's unread input and unsent output into ``fd`` (a memfd)."""
    pending = [c for c in conns if c.inbuf or c.outbuf]
    chunks = [_COUNT.pack(len(pending))]
    for c in pending:
        chunks += [_ENTRY.pack(c.token, len(c.inbuf), len(c.outbuf)), c.inbuf, c.outbuf]
    data = b"".join(chunks)
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def read_conn_state(fd: int) -> dict[int, tuple[bytes, bytes]]:
    """``{token: (unread input, unsent output)}`` from ``fd``, which is then emptied.

    Emptied so that a crash later on does not replay them a second time.
    """
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0) if size else b""
    os.ftruncate(fd, 0)
    state: dict[int, tuple[bytes, bytes]] = {}
    if len(data) < _COUNT.size:
        return state
    at = _COUNT.size
    for _ in range(_COUNT.unpack_from(data)[0]):
        token, nin, nout = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        state[token] = (data[at : at + nin], data[at + nin : at + nin + nout])
        at += nin + nout
    return state


def _say(message: str) -> None:
    print(f"kvcache[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class Server:
    """The selector loop over one listener and its connections."""

    def __init__(
        self,
        arena: Arena,
        listener: socket.socket,
        protocol_factory: Callable[[Arena, Callable[[], list[tuple[str, int]]]], Protocol],
        svc: InheritedSession | None = None,
        conn_state_fd: int | None = None,
    ) -> None:
        self.arena = arena
        self.listener = listener
        self.svc = svc
        self.conn_state_fd = conn_state_fd
        self.protocol = protocol_factory(arena, self._stats)
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Connection] = {}
        self.next_token = FIRST_CONNECTION
        self.total_connections = 0
        #: Set by a signal or the freeze doorbell: why the loop ends.
        self.stop_reason: str | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        #: luod's live updates, when kvcache takes part (:meth:`take_part`).
        self.participant: UpdateParticipant | None = None
        #: Connections left unread because their next command writes while
        #: writes are frozen (:meth:`freeze_writes`), by token.
        self.held: dict[int, Connection] = {}
        #: The cas the last live update carried back (0: none).
        self.carried_cas = 0
        self.freeze_fd: int | None = None
        if svc is not None and svc.supervisor is not None:
            self.freeze_fd = svc.freeze_fd()
            self.sel.register(self.freeze_fd, selectors.EVENT_READ, self._on_freeze)

    def _stats(self) -> list[tuple[str, int]]:
        rows = [
            ("curr_connections", len(self.conns)),
            ("total_connections", self.total_connections),
        ]
        part = self.participant
        if part is not None:
            rows += [
                ("liveupdate_participant", int(part.part is not None)),
                ("liveupdate_writes_frozen", int(self.protocol.writes_frozen)),
                ("liveupdate_held_connections", len(self.held)),
                ("liveupdate_carried_cas", self.carried_cas),
            ]
        return rows

    # -- connections -------------------------------------------------------------------

    def adopt(
        self, sock: socket.socket, token: int, inbuf: bytes = b"", outbuf: bytes = b""
    ) -> None:
        """Serve a connection a predecessor held (already in the session under ``token``)."""
        sock.setblocking(False)
        conn = Connection(sock, token)
        conn.inbuf = inbuf
        self.conns[token] = conn
        self.next_token = max(self.next_token, token + 1)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        if outbuf:
            self._send(conn, outbuf)
        if inbuf:
            self._run(conn, b"", int(time.time()))

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: keep serving the others
                _say(f"accept: {exc}")
                return
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:  # a Unix listener (kvcache serve --listen unix:)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            token, self.next_token = self.next_token, self.next_token + 1
            if self.svc is not None:
                try:
                    # svc.preserve, not svc.outgoing.preserve: it follows luod
                    # across its live updates and restarts (with the supervisor).
                    self.svc.preserve(sock, token)
                except Exception as exc:  # full session, quota: serve it anyway
                    _say(f"connection {token} not preserved: {exc}")
            conn = Connection(sock, token)
            self.conns[token] = conn
            self.total_connections += 1
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _close(self, conn: Connection) -> None:
        self.sel.unregister(conn.sock)
        del self.conns[conn.token]
        if self.svc is not None:
            try:
                self.svc.unpreserve(conn.token)  # out of the session first, then closed
            except Exception as exc:
                _say(f"connection {conn.token} not unpreserved: {exc}")
        conn.sock.close()

    def _read(self, conn: Connection, now: int) -> None:
        try:
            data = conn.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        self._run(conn, data, now)

    def _run(self, conn: Connection, data: bytes, now: int) -> None:
        buf = conn.inbuf + data if conn.inbuf else data
        out: list[bytes] = []
        used, close = self.protocol.execute(buf, out, now)
        conn.inbuf = buf[used:] if used < len(buf) else b""
        if out:
            self._send(conn, out[0] if len(out) == 1 else b"".join(out))
        if close and conn.token in self.conns:
            if close == HELD:
                self._hold(conn)
            else:
                self._close(conn)

    def _send(self, conn: Connection, data: bytes) -> None:
        if conn.outbuf:
            conn.outbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        if sent < len(data):
            # Stop reading until the client takes its replies: back-pressure.
            conn.outbuf = data[sent:]
            self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
            if conn.inbuf:
                self._run(conn, b"", int(time.time()))

    # -- signals and the doorbell ------------------------------------------------------

    def install_signals(self) -> None:
        """SIGTERM/SIGINT: hand over and stop; SIGUSR2: listener hand-off (standalone)."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, _frame: object) -> None:
        if self.stop_reason is None:
            self.stop_reason = HANDOFF if sig == signal.SIGUSR2 else STOP

    def _on_wake(self) -> None:
        try:
            os.read(self._wake_r, 256)
        except BlockingIOError:
            pass

    def _on_freeze(self) -> None:
        assert self.svc is not None
        if self.svc.freeze_requested():
            self.stop_reason = FREEZE

    # -- luod's live updates (kvcache as a participant) -------------------------------

    def take_part(self, name: str, device: str | None) -> None:
        """Take part in luod's live updates as participant ``name``: it
        registers from the loop, after the first requests are answered (out
        of an upgrade's blackout), and again after each of luod's live updates."""
        self.participant = UpdateParticipant(
            name,
            device,
            self.sel,
            freeze=self.freeze_writes,
            thaw=self.thaw_writes,
            refusal=self._refusal,
            carried=self._carried,
        )

    def freeze_writes(self) -> bytes:
        """luod's FREEZE: apply no write until :meth:`thaw_writes`; what to carry."""
        self.protocol.freeze_writes()
        return CARRIED.pack(self.arena.last_cas, self.arena.curr_items)

    def thaw_writes(self) -> None:
        """Apply writes again, the held connections' first."""
        self.protocol.thaw_writes()
        held, self.held = self.held, {}
        now = int(time.time())
        for conn in held.values():
            if conn.token not in self.conns:
                continue  # closed meanwhile (the Server stopping)
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            self._run(conn, b"", now)

    def _hold(self, conn: Connection) -> None:
        """The next command of ``conn`` writes while writes are frozen: read no
        more of it (its bytes wait in the socket) until :meth:`thaw_writes`.
        With replies still to send it stays registered for writing: _flush
        runs the command again once they are sent, and holds it then."""
        if not conn.outbuf:
            self.sel.unregister(conn.sock)
            self.held[conn.token] = conn

    def _refusal(self) -> int:
        # Handing over to a successor: that one takes part in luod's update.
        return errno.EBUSY if self.stop_reason is not None else 0

    def _carried(self, data: bytes) -> str:
        """What a registration says about the data the last live update carried."""
        if len(data) != CARRIED.size:
            self.carried_cas = 0
            return "" if not data else f"; the last live update carried {len(data)} bytes"
        cas, items = CARRIED.unpack(data)
        self.carried_cas = cas
        now = self.arena.last_cas
        check = (
            "no store since the freeze"
            if now == cas
            else f"the arena's cas is {now}: stores the freeze did not see"
        )
        return f"; the last live update carried {items} items at cas {cas} ({check})"

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> str:
        """Serve until stopped; returns why (``stop``, ``freeze`` or ``handoff``)."""
        select = self.sel.select
        svc = self.svc
        while self.stop_reason is None:
            pending = svc is not None and svc.pending > 0
            part = self.participant
            due = None if part is None else part.timeout()
            events = select(0 if pending else 1.0 if due is None else min(due, 1.0))
            now = int(time.time())
            for key, mask in events:
                data = key.data
                if data is None:
                    self._accept()
                elif isinstance(data, Connection):
                    if data.token not in self.conns:
                        continue  # closed earlier in this batch
                    if mask & selectors.EVENT_WRITE:
                        self._flush(data)
                    else:
                        self._read(data, now)
                else:
                    data()
                if self.stop_reason is not None:
                    break
            if pending and svc is not None:
                # What restore() left to preserve again, a few files a turn:
                # requests are answered in between.
                svc.preserve_pending(PENDING_PER_TURN)
            if due is not None and part is not None:
                part.tick()
        return self.stop_reason or STOP

    def hand_over(self) -> None:
        """Leave every connection where a successor can pick it up; mark the
        arena clean (the caller unmaps it once the successor was let go)."""
        if self.participant is not None:
            # At once, not at exit: luod need not wait for an answer that
            # cannot come; a successor registers the name again.
            self.participant.close()
        for conn in self.conns.values():
            with contextlib.suppress(KeyError):  # held: not registered
                self.sel.unregister(conn.sock)
        if self.conn_state_fd is not None:
            write_conn_state(self.conn_state_fd, list(self.conns.values()))
        self.arena.mark_clean()

    def close(self) -> None:
        """Close every connection and the listener (a standalone stop)."""
        if self.participant is not None:
            self.participant.close()
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.conns.clear()
        self.sel.close()
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
