"""``luoctl run``: supervise a service whose state lives in a luod session.

The supervisor owns one session name. It retrieves the session when a
predecessor handed it over (``incoming``) or creates it (``outgoing``), runs
the service with the session fd inherited (see :mod:`liveupdate.client.service`
for the environment), and keeps its own copy of every session fd, so the
state never depends on the service process staying alive.

* **Update** (SIGHUP, or ``luoctl update NAME``): stop the running service
  (``--stop-signal``, then SIGKILL after ``--stop-timeout``), hand the
  outgoing session over with LUOD_SESSION_UPDATE, retrieve it and start the
  service again, which retrieves everything. Listening sockets stay open in
  luod throughout, so connection attempts wait in the backlog instead of
  being refused; connected sockets keep their unread bytes.
* **Pre-started update** (the service opted in with
  ``InheritedSession.freeze_fd``): the kexec way. Start the next version
  first (``LIVEUPDATE_SESSION_STATE=prestarted``, no session yet); once it
  says READY, ring the running one's freeze doorbell; once that one says
  FROZEN (or exits, or is killed after ``--stop-timeout``), hand the session
  over and send it to the waiting version (GO). A next version that exits or
  is not ready within ``--ready-timeout`` is killed: the old one never
  noticed. ``luoctl update`` asks on :func:`update_address` and gets the
  outcome; SIGHUP does the same without an answer.
* **Crash** (the service exits non-zero or by a signal): the same hand-over,
  then a restart (``--restart on-failure``, the default), rate-limited.
* **Supervisor crash**: with ``--keep-on-close`` luod hands the session over
  when the last copy of its fd closes, so the next ``luoctl run`` resumes.
* **luod goes away** (a live update, a crash, a restart): the service keeps
  running. The supervisor sees its session fd hang up, reaches luod again
  with a bounded exponential back-off (forever, until stopped) and re-creates
  the session: it retrieves the session luod gives back (a live update hands
  it over; a restart may recover it), finishes it and preserves everything
  again in a new outgoing session, adding its own copies of the service's
  files (the service's library sends it one at every preserve, see
  :class:`liveupdate.client.service.SupervisorMessage`), so that a luod that
  lost everything gets the session back all the same. The service's library
  asks for the new session fd on its next call (see
  :meth:`liveupdate.InheritedSession.preserve`).
"""

from __future__ import annotations

import array
import ctypes
import errno
import os
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

import liveupdate
from liveupdate import wire
from liveupdate.client.service import (
    NEXT_SESSION_FD_ENV,
    PRESTARTED_STATE,
    SESSION_FD_ENV,
    SESSION_NAME_ENV,
    SESSION_STATE_ENV,
    SUPERVISOR_FD_ENV,
    TOKENS_PER_MESSAGE,
    SupervisorMessage,
    direction_name,
    supervisor_message,
    tokens_message,
)
from liveupdate.paths import DEVICE_ENV, resolve_device
from liveupdate.uapi import SessionDirection

__all__ = ["CommandError", "Supervisor", "update_address"]

#: Restarts allowed within ``_RESTART_WINDOW`` seconds before giving up.
_RESTART_BURST = 5
_RESTART_WINDOW = 10.0


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL me when my parent (the supervisor) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)
#: Seconds the fence waits for luod's answer before giving up on the session.
_FENCE_TIMEOUT = 10.0
#: Back-off between attempts to reach a luod that went away: doubles from
#: the first delay up to the last, and goes on until the supervisor is stopped.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 5.0
#: Seconds an attempt waits for luod's answer (and for a busy device).
_REATTACH_OPEN_TIMEOUT = 5.0
#: Seconds a pre-started update waits for the device before the freeze; busy
#: longer (someone else has it), the device is opened after the freeze instead.
_AHEAD_OPEN_TIMEOUT = 0.5
#: Seconds the device opened ahead may stay open while the old version
#: freezes: others (luoctl, agents, the freezing service itself) wait for it
#: meanwhile, so a slow freeze gives it back and the device is opened again after.
_AHEAD_HOLD = 0.25


def update_address(pid: int) -> bytes:
    """The abstract socket where the supervisor ``pid`` takes ``luoctl update`` requests.

    Anyone can bind an abstract name: the caller checks that the socket's
    peer is that pid (SO_PEERCRED), and the supervisor that the caller is
    its own user or root.
    """
    return f"\0liveupdate-run.{pid}".encode()


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket."""
    pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return pid, uid


def _tokens(listing: liveupdate.SessionListing, direction: SessionDirection) -> list[int]:
    """Tokens of the files of the listed session in ``direction`` (the listing is of one name)."""
    for entry in listing.sessions:
        if entry.direction == direction:
            return [f.token for f in entry.files or ()]
    return []


#: Nice value of a version that froze: it serves no more, and its exit
#: (the interpreter's teardown: milliseconds of CPU) must not take CPU time
#: from the hand-over and the next version's restore, which the clients wait for.
_FROZEN_NICE = 19


def _to_background(pid: int) -> None:
    """Lower the CPU priority of ``pid`` (a child not reaped yet: the pid is still its)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, _FROZEN_NICE)
    except OSError:  # it exited already, or another user's: nothing to lower
        pass


def _exit_status(returncode: int) -> int:
    """A child's return code as a shell reports it (128 + signal when killed)."""
    return returncode if returncode >= 0 else 128 - returncode


class CommandError(OSError):
    """The service's COMMAND cannot be run; ``status`` is the shell's for it.

    127 when it does not exist, 126 when it exists but cannot be executed,
    as ``env``, ``timeout`` or a shell report them.
    """

    def __init__(self, err: int, message: str, hint: str) -> None:
        super().__init__(err, f"{message}; {hint}")
        self.hint = hint
        self.status = 127 if err == errno.ENOENT else 126


def command_error(program: str, err: int) -> CommandError:
    """Why ``program`` cannot be run, naming it."""
    if err == errno.ENOENT and os.sep not in program:
        return CommandError(err, f"command {program!r}: not found in PATH", "give its full path")
    if err == errno.ENOENT:
        return CommandError(err, f"command {program!r}: no such file", "check COMMAND's path")
    reason = "is a directory" if os.path.isdir(program) else os.strerror(err).lower()
    return CommandError(err, f"command {program!r}: {reason}", "COMMAND must be an executable file")


def check_command(argv: Sequence[str]) -> None:
    """Refuse a COMMAND that cannot be run, before any session is touched.

    Found out only at the exec, a typo would come after the session was
    retrieved (and so finished when the supervisor gives up): state handed
    over by a predecessor would be lost to a misspelt path.
    """
    program = argv[0]
    if shutil.which(program) is not None:
        return
    if os.sep not in program or not os.path.lexists(program):
        raise command_error(program, errno.ENOENT)
    raise command_error(program, errno.EACCES)


def _announce(session: liveupdate.Session, pid: int, restarts: int, last_exit: int) -> None:
    """LUOD_SESSION_SET_SERVICE, best effort: it only informs the operator.

    An older luod (``ENOTTY``), one that went away (``ENODEV``) or anything
    else never keeps the service from running.
    """
    try:
        session.set_service(pid, restarts, last_exit)
    except (OSError, ValueError):  # LiveUpdateError is an OSError
        pass


def _say(message: str) -> None:
    print(f"luoctl run: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Runs ``argv`` with the session ``name``; see the module documentation."""

    def __init__(
        self,
        device: str | None,
        name: str,
        argv: Sequence[str],
        keep_on_close: bool = False,
        stop_signal: int = signal.SIGTERM,
        stop_timeout: float = 10.0,
        restart: str = "on-failure",
        open_timeout: float = 30.0,
        ready_timeout: float = 30.0,
    ) -> None:
        self.device = device
        self.name = name
        self.argv = list(argv)
        self.keep_on_close = keep_on_close
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.restart = restart
        self.open_timeout = open_timeout
        self.ready_timeout = ready_timeout
        self.state = SessionDirection.OUTGOING
        self.current: liveupdate.Session | None = None
        self.next: liveupdate.Session | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._update = False
        self._stop_signal: int | None = None
        self._restarts: list[float] = []
        #: The supervisor's copy of every file the service preserved, by token.
        self.copies: dict[int, int] = {}
        #: The socket to the service's library (see SupervisorMessage).
        self.control: socket.socket | None = None
        #: Whether the sessions are alive in a running luod.
        self.attached = False
        #: Whether the service has the current session fds (the supervisor
        #: then never calls luod on them: the replies would mix).
        self.handed_out = False
        self.generation = 0
        self._backoff = _BACKOFF_FIRST
        self._retry_at = 0.0
        self._first_attempt = False
        #: Told to luod with the pid (LUOD_SESSION_SET_SERVICE, ``luoctl status``):
        #: restarts after the service exited on its own, and how it last exited
        #: (its status, or minus the signal; an update's stop counts too).
        self.restart_count = 0
        self.last_exit = 0
        #: The running service's freeze doorbell (write end) once it opted in
        #: to pre-started updates (``InheritedSession.freeze_fd``).
        self.freeze_bell: int | None = None
        #: Whether the running service said it froze (``frozen()``).
        self.frozen_seen = False
        #: A next version started ahead of an update, its socket and doorbell.
        self.pending: subprocess.Popen[bytes] | None = None
        self.pending_control: socket.socket | None = None
        self.pending_bell: int | None = None
        self.pending_ready = False
        #: The device opened before a freeze, so that the hand-over does not
        #: wait for it (see _open_ahead); the hand-over closes it.
        self.ahead: liveupdate.Device | None = None
        #: Whether luod said the incoming session was finished (checked before a
        #: freeze: a finished session stays finished), so the hand-over need not ask.
        self.incoming_finished = False
        #: The incoming session's tokens as luod listed them at the last
        #: hand-over, for the next version's ``restore()`` (GO): None when not listed.
        self.incoming_tokens: list[int] | None = None
        #: Where ``luoctl update`` asks (see update_address) and who waits for the outcome.
        self.requests: socket.socket | None = None
        self.waiters: list[socket.socket] = []

    # -- sessions ----------------------------------------------------------------------

    @property
    def outgoing(self) -> liveupdate.Session:
        session = self.next if self.next is not None else self.current
        assert session is not None
        return session

    def acquire(self, dev: liveupdate.Device | None = None, list_tokens: bool = False) -> None:
        """Retrieve the session if it was handed over, else create it.

        On ``dev`` if given (closed here), else on the device opened now. With
        ``list_tokens``, :attr:`incoming_tokens` are listed on the same device.
        """
        held_elsewhere = (
            f"session {self.name!r} is held by another process "
            "(another `luoctl run`, or a service that outlived its supervisor)"
        )
        if dev is None:
            dev = liveupdate.open_device(self.device, timeout=self.open_timeout)
        with dev:
            # Create first: if that fails nothing was retrieved, and so nothing
            # is finished (and lost) by giving up.
            try:
                outgoing = dev.create_session(self.name)
            except liveupdate.AlreadyExistsError as exc:
                raise type(exc)(exc.errno, held_elsewhere) from None
            try:
                self.current = dev.retrieve_session(self.name)
                self.state = SessionDirection.INCOMING
                self.next = outgoing
            except liveupdate.NotFoundError:
                self.current = outgoing
                self.state = SessionDirection.OUTGOING
                self.next = None
            except liveupdate.InvalidArgumentError as exc:
                outgoing.close()
                raise type(exc)(exc.errno, held_elsewhere) from None
            self.incoming_tokens = None
            self.incoming_finished = False
            if list_tokens and self.state == SessionDirection.INCOMING:
                # The listing says the generation too: no GET_STATE.
                listing = dev.list_sessions(self.name)
                self.generation = listing.generation
                self.incoming_tokens = _tokens(listing, SessionDirection.INCOMING)
            else:
                self.generation = dev.get_state().generation
        self.attached = True
        self.handed_out = False
        if self.keep_on_close:
            self.outgoing.keep_on_close()
        _say(f"session {self.name!r} {direction_name(self.state)}")

    def _incoming_finished(self, dev: liveupdate.Device | None = None) -> bool:
        """Whether luod says the incoming session is finished (on ``dev``, if given)."""
        if dev is not None:
            listing = dev.list_sessions(self.name, files=False)
        else:
            with liveupdate.open_device(self.device, timeout=self.open_timeout) as opened:
                listing = opened.list_sessions(self.name, files=False)
        return any(
            s.direction == SessionDirection.INCOMING and s.finished for s in listing.sessions
        )

    def resync(self) -> bool:
        """Discard replies meant for the dead service on the shared session sockets.

        The service may have died with a request in flight: luod's reply then
        waits on the socket the supervisor shares, and would be taken for the
        answer to the supervisor's next call. :meth:`liveupdate.Session.fence`
        (LUOD_SESSION_SYNC with a random cookie) reads up to its own answer:
        every reply before it is the dead service's. False when the session
        fds are dead (luod rebooted under us: ENODEV).
        """
        # An incoming session known to be finished is closed at the hand-over:
        # whatever waits on it goes with it, no need to fence it.
        skip = self.current if self.incoming_finished and self.next is not None else None
        outgoing_answered = False
        for session in (self.current, self.next):
            if session is None or session.closed or session is skip:
                continue
            try:
                session.fence(_FENCE_TIMEOUT)
            except liveupdate.StaleGenerationError:
                return False
            except liveupdate.LiveUpdateError:
                continue
            outgoing_answered = outgoing_answered or session is self.outgoing
        # A fence answered on the outgoing fd proved it alive; otherwise ask.
        return outgoing_answered or not self._stale()

    def _stale(self) -> bool:
        """Whether luod rebooted under us (our session fds are dead: ENODEV)."""
        try:
            self.outgoing.get_name()
        except liveupdate.StaleGenerationError:
            return True
        return False

    def hand_over(self, list_tokens: bool = False) -> None:
        """The service has exited: hand its state to the next one.

        If the service had not taken its predecessor's state over yet (the
        incoming session is not finished), nothing moves: the next service
        gets the same sessions and retrieves again. Otherwise the outgoing
        session is handed over and re-acquired (``list_tokens``: see
        :meth:`acquire`), on the device opened ahead if there is one.
        """
        dev, self.ahead = self.ahead, None
        try:
            if self.state == SessionDirection.INCOMING and self.current is not None:
                if not (self.incoming_finished or self._incoming_finished(dev)):
                    _say("the service had not taken its state over: it gets the same sessions")
                    self.incoming_tokens = None
                    return
                self.current.close()
            self.outgoing.update()
            self.current = self.next = None
            held, dev = dev, None
            self.acquire(held, list_tokens)
        finally:
            if dev is not None:
                dev.close()
            self.incoming_finished = False

    def _open_ahead(self) -> None:
        """Before a freeze: open the device, ask whether the incoming session is finished.

        Both would otherwise be done in the blackout. Best effort: on any
        failure the hand-over opens the device and asks, as without it.
        """
        try:
            self.ahead = liveupdate.open_device(self.device, timeout=_AHEAD_OPEN_TIMEOUT)
            if self.state == SessionDirection.INCOMING and self.current is not None:
                # A finished session stays finished: the answer holds after the freeze.
                self.incoming_finished = self._incoming_finished(self.ahead)
        except (OSError, ValueError):  # LiveUpdateError is an OSError
            self._close_ahead()

    def _close_ahead(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
            self.ahead = None

    def release(self) -> None:
        for session in (self.current, self.next):
            if session is not None:
                session.close()
        self.current = self.next = None
        self.attached = False
        self.incoming_finished = False
        self._close_ahead()

    # -- luod going away and coming back ------------------------------------------------

    def _luod_lost(self) -> None:
        """Our session fds hung up: luod rebooted, crashed or stopped. Reach it again."""
        self.release()
        self._backoff = _BACKOFF_FIRST
        self._retry_at = time.monotonic()
        self._first_attempt = True

    def _try_reattach(self) -> None:
        first, self._first_attempt = self._first_attempt, False
        old_generation = self.generation
        try:
            recovered, copied = self._reattach()
        except OSError as exc:
            if first:
                _say("luod is gone (connection lost); service keeps running; reconnecting")
            reason = exc.strerror or str(exc)
            _say(f"luod unreachable ({reason}); next attempt in {self._backoff:g} s")
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
            return
        what = (
            f"session {self.name!r} re-attached ({recovered} files from luod, "
            f"{copied} preserved again); service keeps running"
        )
        if first and recovered is not None and self.generation > old_generation:
            _say(f"luod rebooted (live update) to generation {self.generation}: {what}")
        elif recovered is not None:
            _say(f"luod is back (generation {self.generation}), it kept the session: {what}")
        else:
            _say(
                f"luod is back (generation {self.generation}) without session {self.name!r}: "
                f"re-created from the supervisor's copies ({copied} files); service keeps running"
            )

    def _reattach(self) -> tuple[int | None, int]:
        """Re-create the session in the luod now running; (files it gave back or None, preserved).

        luod gives the session back as incoming after a live update (and
        after a restart that recovered it): retrieve its files, finish it.
        Then a new outgoing session gets every file again: those and the
        supervisor's copies of what the service preserved (the copy wins for
        a token in both: the service's word is the latest).
        """
        self._serve_control()  # copies up to date first
        recovered: int | None = None
        with liveupdate.open_device(self.device, timeout=_REATTACH_OPEN_TIMEOUT) as dev:
            generation = dev.get_state().generation
            try:
                incoming: liveupdate.Session | None = dev.retrieve_session(self.name)
            except liveupdate.NotFoundError:
                incoming = None
            if incoming is not None:
                with incoming:
                    listing = dev.list_sessions(self.name)
                    tokens = [
                        f.token
                        for entry in listing.sessions
                        if entry.direction == SessionDirection.INCOMING
                        for f in entry.files or ()
                    ]
                    for token in tokens:
                        fd = incoming.retrieve(token)
                        if token in self.copies:
                            os.close(fd)
                        else:
                            self.copies[token] = fd
                    # Every file is in self.copies now: finishing loses nothing.
                    incoming.finish()
                    recovered = len(tokens)
            outgoing = dev.create_session(self.name)
        try:
            if self.keep_on_close:
                outgoing.keep_on_close()
            copied = 0
            for token, fd in sorted(self.copies.items()):
                try:
                    outgoing.preserve(fd, token)
                    copied += 1
                except liveupdate.StaleGenerationError:
                    raise
                except liveupdate.LiveUpdateError as exc:
                    _say(f"token {token} could not be preserved again: {exc}")
        except BaseException:
            outgoing.close()
            raise
        self.current, self.next = outgoing, None
        self.state = SessionDirection.OUTGOING
        self.attached, self.handed_out = True, False
        self.generation = generation
        # Not handed out yet: the service asks for this fd on its next call,
        # so the supervisor may still call on it without mixing replies.
        if self.proc is not None and self.proc.poll() is None:
            _announce(outgoing, self.proc.pid, self.restart_count, self.last_exit)
        return recovered, copied

    def _await_luod(self, wake_r: int) -> bool:
        """With no service running: wait until luod is back. False when told to stop."""
        while not self.attached:
            if self._stop_signal is not None:
                return False
            self._wait_once(wake_r, None)
        return True

    # -- the service's library ----------------------------------------------------------

    @staticmethod
    def _receive(sock: socket.socket) -> tuple[bytes, int, list[int]] | None:
        """One message (kind + token and its fds), or None when none waits.

        An empty kind means the service closed its end (it exited).
        """
        try:
            data, ancdata, flags, _addr = sock.recvmsg(
                SupervisorMessage.SIZE,
                socket.CMSG_SPACE(array.array("i").itemsize),
                socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT,
            )
        except BlockingIOError:
            return None
        fds = wire.fds_of(ancdata)
        if flags & socket.MSG_CTRUNC:
            _say("a message from the service lost its file (MSG_CTRUNC): out of fds?")
        token = int.from_bytes(data[1 : SupervisorMessage.SIZE], "little")
        return data[:1], token, fds

    def _serve_control(self) -> None:
        """Handle every message waiting from the service's library; never blocks."""
        while self.control is not None:
            message = self._receive(self.control)
            if message is None:
                break
            kind, token, fds = message
            if not kind:  # the service closed its end (it exited)
                self.control.close()
                self.control = None
                break
            if kind in (SupervisorMessage.PRESERVED, SupervisorMessage.DEFERRED) and fds:
                self._keep_copy(token, fds.pop(0))
                if kind == SupervisorMessage.DEFERRED:
                    self._preserve_deferred(token)
            elif kind == SupervisorMessage.UNPRESERVED:
                copy = self.copies.pop(token, None)
                if copy is not None:
                    os.close(copy)
                if self.attached and not self.handed_out:
                    try:
                        self.outgoing.unpreserve(token)
                    except liveupdate.LiveUpdateError:
                        pass
            elif kind == SupervisorMessage.SESSION:
                self._answer_session()
            elif kind == SupervisorMessage.WATCH and fds:
                self._set_bell(fds.pop(0))
            elif kind == SupervisorMessage.FROZEN:
                self.frozen_seen = True
            for fd in fds:
                os.close(fd)
        self._serve_pending()

    def _serve_pending(self) -> None:
        """Messages of a version started ahead of an update: it may opt in, and be ready."""
        while self.pending_control is not None:
            message = self._receive(self.pending_control)
            if message is None:
                return
            kind, _token, fds = message
            if not kind:
                self.pending_control.close()
                self.pending_control = None
                return
            if kind == SupervisorMessage.WATCH and fds:
                if self.pending_bell is not None:
                    os.close(self.pending_bell)
                self.pending_bell = fds.pop(0)
            elif kind == SupervisorMessage.READY:
                self.pending_ready = True
            elif kind == SupervisorMessage.SESSION:
                # It has no session until the hand-over: nothing to give yet.
                self.pending_control.sendmsg([supervisor_message(SupervisorMessage.AWAY)])
            for fd in fds:  # anything it preserves before the hand-over is an error of its own
                os.close(fd)

    def _set_bell(self, fd: int) -> None:
        if self.freeze_bell is not None:
            os.close(self.freeze_bell)
        self.freeze_bell = fd

    def _keep_copy(self, token: int, fd: int) -> None:
        old = self.copies.get(token)
        self.copies[token] = fd
        if old is not None:
            os.close(old)

    def _preserve_deferred(self, token: int) -> None:
        """The service preserved while luod was away; if it is back, preserve it for it."""
        if not self.attached or self.handed_out:
            return  # done at the re-attach (or by the service on its new session fd)
        try:
            self.outgoing.preserve(self.copies[token], token)
        except liveupdate.AlreadyExistsError:
            self.outgoing.unpreserve(token)
            self.outgoing.preserve(self.copies[token], token)
        except liveupdate.LiveUpdateError as exc:
            _say(f"token {token} could not be preserved: {exc}")

    def _answer_session(self) -> None:
        assert self.control is not None
        if not self.attached:
            self.control.sendmsg([supervisor_message(SupervisorMessage.AWAY)])
            return
        self.control.sendmsg(
            [supervisor_message(SupervisorMessage.SESSION)], wire.rights([self.outgoing.fileno()])
        )
        self.handed_out = True

    def close_copies(self) -> None:
        for fd in self.copies.values():
            os.close(fd)
        self.copies.clear()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.freeze_bell is not None:
            os.close(self.freeze_bell)
            self.freeze_bell = None
        if self.waiters:
            self._report(False, "update failed: the supervisor stopped")
        if self.requests is not None:
            self.requests.close()
            self.requests = None

    # -- `luoctl update` requests --------------------------------------------------------

    def _listen_for_requests(self) -> None:
        """Take ``luoctl update`` requests on :func:`update_address`; SIGHUP works regardless."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(update_address(os.getpid()))
            sock.listen(8)
        except OSError as exc:
            sock.close()
            _say(f"no update socket ({exc.strerror}): `luoctl update` falls back to SIGHUP")
            return
        sock.setblocking(False)
        self.requests = sock

    def _accept_requests(self) -> None:
        while self.requests is not None:
            try:
                conn, _addr = self.requests.accept()
            except BlockingIOError:
                return
            conn.settimeout(1.0)
            try:
                _pid, uid = peer_credentials(conn)
                if uid not in (0, os.getuid()):
                    conn.sendall(b"refused: not the supervisor's user")
                    conn.close()
                    continue
                if conn.recv(64) != b"update":
                    conn.close()
                    continue
            except OSError:
                conn.close()
                continue
            self._update = True
            self.waiters.append(conn)

    def _report(self, ok: bool, text: str) -> None:
        """The outcome of an update, to whoever asked for it (and to the log when it failed)."""
        if not ok:
            _say(text)
        answer = (b"ok " if ok else b"failed ") + text.encode()
        for conn in self.waiters:
            try:
                conn.sendall(answer)
            except OSError:
                pass
            conn.close()
        self.waiters.clear()

    # -- the service -------------------------------------------------------------------

    def spawn(self) -> None:
        assert self.current is not None
        env = dict(os.environ)
        env[SESSION_FD_ENV] = str(self.current.fileno())
        env[SESSION_NAME_ENV] = self.name
        env[SESSION_STATE_ENV] = direction_name(self.state)
        env[DEVICE_ENV] = resolve_device(self.device)
        pass_fds = [self.current.fileno()]
        env.pop(NEXT_SESSION_FD_ENV, None)
        if self.next is not None:
            env[NEXT_SESSION_FD_ENV] = str(self.next.fileno())
            pass_fds.append(self.next.fileno())
        if self.control is not None:
            self.control.close()
        if self.freeze_bell is not None:  # a new process opts in (or not) anew
            os.close(self.freeze_bell)
            self.freeze_bell = None
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env[SUPERVISOR_FD_ENV] = str(theirs.fileno())
        pass_fds.append(theirs.fileno())
        # The service dies with its supervisor: otherwise an orphan would keep
        # the session fds open and a new supervisor could not take over.
        outgoing, restarts, last_exit = self.outgoing, self.restart_count, self.last_exit

        def in_child() -> None:
            _die_with_parent()
            # The child tells luod its own pid, before exec: the supervisor is
            # blocked in Popen and the service's code has not started, so
            # nobody else reads the shared session fd's replies meanwhile.
            _announce(outgoing, os.getpid(), restarts, last_exit)

        try:
            self.proc = subprocess.Popen(self.argv, env=env, pass_fds=pass_fds, preexec_fn=in_child)
        except OSError as exc:
            raise command_error(self.argv[0], exc.errno or errno.ENOEXEC) from None
        finally:
            theirs.close()
        self.handed_out = True
        _say(f"started pid {self.proc.pid} ({direction_name(self.state)})")

    # -- pre-started updates (the kexec way) ----------------------------------------------

    def spawn_pending(self) -> None:
        """Start the next version while the running one serves; it gets no session yet."""
        env = dict(os.environ)
        for variable in (SESSION_FD_ENV, NEXT_SESSION_FD_ENV):
            env.pop(variable, None)
        env[SESSION_NAME_ENV] = self.name
        env[SESSION_STATE_ENV] = PRESTARTED_STATE
        env[DEVICE_ENV] = resolve_device(self.device)
        self.pending_control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env[SUPERVISOR_FD_ENV] = str(theirs.fileno())
        self.pending_ready = False
        try:
            self.pending = subprocess.Popen(
                self.argv, env=env, pass_fds=[theirs.fileno()], preexec_fn=_die_with_parent
            )
        except OSError as exc:
            self._drop_pending()
            raise command_error(self.argv[0], exc.errno or errno.ENOEXEC) from None
        finally:
            theirs.close()
        _say(f"update: started pid {self.pending.pid} ahead (prestarted); waiting until ready")

    def _drop_pending(self) -> None:
        """The next version will not take over: kill it (it may be stuck initialising)."""
        self._close_ahead()
        if self.pending_control is not None:
            self.pending_control.close()
            self.pending_control = None
        if self.pending_bell is not None:
            os.close(self.pending_bell)
            self.pending_bell = None
        if self.pending is not None:
            if self.pending.poll() is None:
                self.pending.kill()
            self.pending.wait()
            self.pending = None
        self.pending_ready = False

    def _await_ready(self, wake_r: int) -> str | None:
        """Until the next version reports ready; None then, else why it will not be."""
        assert self.proc is not None and self.pending is not None
        deadline = time.monotonic() + self.ready_timeout
        pidfd = os.pidfd_open(self.pending.pid)
        try:
            while not self.pending_ready:
                if self._stop_signal is not None:
                    return "the supervisor was told to stop"
                if self.proc.poll() is not None:
                    return f"the running version exited ({self.proc.returncode}) meanwhile"
                if self.pending.poll() is not None:
                    status = _exit_status(self.pending.returncode)
                    return f"the new version exited with status {status} before it was ready"
                if time.monotonic() >= deadline:
                    return f"the new version was not ready within {self.ready_timeout:g} s"
                self._wait_once(wake_r, None, extra=[pidfd], deadline=deadline)
        finally:
            os.close(pidfd)
        return None

    def _freeze(self, wake_r: int) -> int | None:
        """Ask the running version to freeze; its exit status if it exited instead."""
        assert self.proc is not None and self.freeze_bell is not None
        self.frozen_seen = False
        try:
            os.write(self.freeze_bell, b"F")
        except OSError:  # it closed its doorbell: stop it the old way
            self._close_ahead()  # not held through a stop that may take --stop-timeout
            return self.stop_service(self.stop_signal)
        deadline = time.monotonic() + self.stop_timeout
        hold_until = time.monotonic() + _AHEAD_HOLD
        if self.proc.poll() is None:
            pidfd = os.pidfd_open(self.proc.pid)
            try:
                while not self.frozen_seen and self.proc.poll() is None:
                    if self.ahead is not None and time.monotonic() >= hold_until:
                        self._close_ahead()  # a slow freeze: others may need the device
                    if time.monotonic() >= deadline:
                        pid, timeout = self.proc.pid, self.stop_timeout
                        _say(f"pid {pid} did not freeze in {timeout} s: SIGKILL")
                        self.proc.kill()
                        self.proc.wait()
                        break
                    wake_at = deadline if self.ahead is None else min(deadline, hold_until)
                    self._wait_once(wake_r, pidfd, deadline=wake_at)
            finally:
                os.close(pidfd)
        if self.frozen_seen:
            _to_background(self.proc.pid)
        self._serve_control()  # its last words: copies of its final state, then FROZEN
        return None if self.frozen_seen else self.proc.returncode

    def _go(self) -> bool:
        """Give the waiting next version the handed-over sessions. False: it is gone."""
        assert self.pending is not None and self.current is not None
        _announce(self.outgoing, self.pending.pid, self.restart_count, self.last_exit)
        fds = [self.current.fileno()] + ([self.next.fileno()] if self.next is not None else [])
        try:
            if self.pending_control is None or self.pending.poll() is not None:
                raise BrokenPipeError
            if self.incoming_tokens is not None:
                # What luod listed at the hand-over: restore() needs no listing
                # (and no device) of its own.
                tokens = self.incoming_tokens
                for start in range(0, max(len(tokens), 1), TOKENS_PER_MESSAGE):
                    chunk = tokens[start : start + TOKENS_PER_MESSAGE]
                    self.pending_control.sendmsg([tokens_message(chunk)])
            self.pending_control.sendmsg(
                [supervisor_message(SupervisorMessage.GO, int(self.state))],
                wire.rights(fds),
            )
        except OSError:
            return False
        return True

    def _prestart_update(self, wake_r: int) -> None:
        """Update a service that opted in: the next version first, then freeze the old one.

        Like a kexec loaded ahead of the jump, everything slow (the
        interpreter's start, the service's initialisation) happens while the
        old version still serves; the blackout is the freeze and the
        hand-over. If the next version fails to become ready, the old one
        never noticed anything.
        """
        assert self.proc is not None
        old = self.proc
        try:
            self.spawn_pending()
        except CommandError as exc:
            self._report(False, f"update failed: {exc}; pid {old.pid} keeps serving")
            return
        reason = self._await_ready(wake_r)
        if reason is not None:
            self._drop_pending()
            self._report(False, f"update failed: {reason}; pid {old.pid} keeps serving")
            return
        self._open_ahead()
        rc = self._freeze(wake_r)
        if rc is None:
            _say(f"update: pid {old.pid} froze; handing session {self.name!r} over")
        else:
            self.last_exit = rc
            _say(f"update: pid {old.pid} exited {rc} instead of freezing; handing over")
        if not self._hand_over_state(wake_r, list_tokens=True):
            self._drop_pending()
            self._report(False, "update failed: the supervisor was told to stop")
            return
        old_control, old_bell = self.control, self.freeze_bell
        handed = self._go()
        self.control, self.freeze_bell = self.pending_control, self.pending_bell
        self.pending_control, self.pending_bell = None, None
        for sock in (old_control,):
            if sock is not None:
                sock.close()
        if old_bell is not None:
            os.close(old_bell)
        if handed:
            assert self.pending is not None
            self.proc, self.pending, self.pending_ready = self.pending, None, False
            self.handed_out = True
            _say(f"update: pid {self.proc.pid} took over ({direction_name(self.state)})")
            self._report(True, f"pid {self.proc.pid} took over from pid {old.pid}")
        else:
            self._drop_pending()
            self.proc = old
            _say("update: the new version died before the hand-over reached it; starting it anew")
        self._retire(old, wake_r)
        if not handed:
            self.spawn()
            self._report(True, f"pid {self.proc.pid} started after pid {old.pid} froze")

    def _retire(self, old: subprocess.Popen[bytes], wake_r: int) -> None:
        """Wait for a frozen version to exit (it serves no more); SIGKILL after --stop-timeout."""
        if old.poll() is None:
            deadline = time.monotonic() + self.stop_timeout
            pidfd = os.pidfd_open(old.pid)
            try:
                while old.poll() is None and time.monotonic() < deadline:
                    self._wait_once(wake_r, pidfd, deadline=deadline)
            finally:
                os.close(pidfd)
            if old.poll() is None:
                _say(f"pid {old.pid} froze but did not exit in {self.stop_timeout} s: SIGKILL")
                old.kill()
                old.wait()
        self.last_exit = old.returncode

    def stop_service(self, sig: int) -> int:
        """Signal the service, wait up to ``stop_timeout``, then SIGKILL it."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _say(f"pid {self.proc.pid} did not stop in {self.stop_timeout} s: SIGKILL")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    # -- main loop ----------------------------------------------------------------------

    def _on_hup(self, _sig: int, _frame: object) -> None:
        self._update = True

    def _on_stop(self, sig: int, _frame: object) -> None:
        self._stop_signal = sig

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < _RESTART_WINDOW]
        self._restarts.append(now)
        return len(self._restarts) <= _RESTART_BURST

    def run(self) -> int:
        """Supervise until the service exits cleanly or we are told to stop."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        # A copy of every preserved file: room for as many as luod allows us.
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        try:
            check_command(self.argv)
            self._listen_for_requests()
            self.acquire()
            self.spawn()
            return self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            self._drop_pending()
            self.release()
            self.close_copies()

    def _wait(self, wake_r: int) -> None:
        """Until the service exits or a signal asks for something; luod may come and go."""
        assert self.proc is not None
        pidfd = os.pidfd_open(self.proc.pid)
        try:
            while self.proc.poll() is None and not self._update and self._stop_signal is None:
                self._wait_once(wake_r, pidfd)
        finally:
            os.close(pidfd)

    def _wait_once(
        self,
        wake_r: int,
        pidfd: int | None,
        extra: Sequence[int] = (),
        deadline: float | None = None,
    ) -> None:
        """One sleep: until a signal, the service's exit or message, luod's hang-up or retry.

        Also wakes for ``extra`` fds turning readable, and at ``deadline``.
        """
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        for fd in (*([] if pidfd is None else [pidfd]), *extra):
            poller.register(fd, select.POLLIN)
        for sock in (self.control, self.pending_control, self.requests):
            if sock is not None:
                poller.register(sock, select.POLLIN)
        # The service shares the session sockets, so their replies make them
        # readable: watch for the hang-up alone (luod closed its end).
        session_fd = self.outgoing.fileno() if self.attached else -1
        if session_fd >= 0:
            poller.register(session_fd, _POLLRDHUP)
        retry_at = None if self.attached else self._retry_at
        wake_at = [t for t in (deadline, retry_at) if t is not None]
        timeout_ms = None
        if wake_at:
            timeout_ms = max(0, int((min(wake_at) - time.monotonic()) * 1000) + 1)
        for fd, events in poller.poll(timeout_ms):
            if fd == session_fd and events & (_POLLRDHUP | select.POLLHUP | select.POLLERR):
                self._luod_lost()
        try:
            os.read(wake_r, 512)
        except BlockingIOError:
            pass
        self._serve_control()
        self._accept_requests()
        if not self.attached and time.monotonic() >= self._retry_at:
            self._try_reattach()

    def _restart_with_state(self, wake_r: int) -> bool:
        """The service is gone: hand its state over and start it again. False: stopped."""
        if not self._hand_over_state(wake_r):
            return False
        self.spawn()
        return True

    def _hand_over_state(self, wake_r: int, list_tokens: bool = False) -> bool:
        """The service is gone (or frozen): hand its state over. False: stopped."""
        self._serve_control()  # its last words: copies of what it preserved
        while True:
            if self.attached and not self.resync():
                self._luod_lost()
            if not self._await_luod(wake_r):
                return False
            try:
                self.hand_over(list_tokens)
                return True
            except liveupdate.StaleGenerationError:
                self._luod_lost()

    def _loop(self, wake_r: int) -> int:
        while True:
            assert self.proc is not None
            self._wait(wake_r)
            if self._stop_signal is not None:
                rc = self.stop_service(self._stop_signal)
                _say(f"stopped ({signal.Signals(self._stop_signal).name}), service exit {rc}")
                return 0 if rc in (0, -self._stop_signal) else rc
            if self._update:
                self._update = False
                if self.freeze_bell is not None and self.attached:
                    self._prestart_update(wake_r)
                    continue
                old_pid = self.proc.pid
                rc = self.last_exit = self.stop_service(self.stop_signal)
                _say(f"update: service exit {rc}; handing session {self.name!r} over")
                if not self._restart_with_state(wake_r):
                    self._report(False, "update failed: the supervisor was told to stop")
                    _say("stopped while luod was away")
                    return 0
                self._report(True, f"pid {self.proc.pid} started after pid {old_pid} stopped")
                continue
            rc = self.last_exit = self.proc.returncode
            if rc == 0 or self.restart == "no":
                _say(f"service exited {rc}")
                return _exit_status(rc)
            if not self._may_restart():
                _say(f"service crashed {rc}; too many restarts, giving up")
                return _exit_status(rc)
            _say(f"service crashed ({rc}); restarting it with its state")
            self.restart_count += 1
            if not self._restart_with_state(wake_r):
                _say("stopped while luod was away")
                return 0
