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
* **Crash** (the service exits non-zero or by a signal): the same hand-over,
  then a restart (``--restart on-failure``, the default), rate-limited.
* **Supervisor crash**: with ``--keep-on-close`` luod hands the session over
  when the last copy of its fd closes, so the next ``luoctl run`` resumes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import liveupdate
from liveupdate.client.service import (
    NEXT_SESSION_FD_ENV,
    SESSION_FD_ENV,
    SESSION_NAME_ENV,
    SESSION_STATE_ENV,
    direction_name,
)
from liveupdate.paths import DEVICE_ENV, resolve_device
from liveupdate.uapi import SessionDirection

__all__ = ["CommandError", "Supervisor"]

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
    ) -> None:
        self.device = device
        self.name = name
        self.argv = list(argv)
        self.keep_on_close = keep_on_close
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        self.restart = restart
        self.open_timeout = open_timeout
        self.state = SessionDirection.OUTGOING
        self.current: liveupdate.Session | None = None
        self.next: liveupdate.Session | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._update = False
        self._stop_signal: int | None = None
        self._restarts: list[float] = []

    # -- sessions ----------------------------------------------------------------------

    @property
    def outgoing(self) -> liveupdate.Session:
        session = self.next if self.next is not None else self.current
        assert session is not None
        return session

    def acquire(self) -> None:
        """Retrieve the session if it was handed over, else create it."""
        held_elsewhere = (
            f"session {self.name!r} is held by another process "
            "(another `luoctl run`, or a service that outlived its supervisor)"
        )
        with liveupdate.open_device(self.device, timeout=self.open_timeout) as dev:
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
        if self.keep_on_close:
            self.outgoing.keep_on_close()
        _say(f"session {self.name!r} {direction_name(self.state)}")

    def _incoming_finished(self) -> bool:
        with liveupdate.open_device(self.device, timeout=self.open_timeout) as dev:
            listing = dev.list_sessions(self.name, files=False)
        return any(
            s.direction == SessionDirection.INCOMING and s.finished for s in listing.sessions
        )

    def resync(self) -> None:
        """Discard replies meant for the dead service on the shared session sockets.

        The service may have died with a request in flight: luod's reply then
        waits on the socket the supervisor shares, and would be taken for the
        answer to the supervisor's next call. :meth:`liveupdate.Session.fence`
        (LUOD_SESSION_SYNC with a random cookie) reads up to its own answer:
        every reply before it is the dead service's. A session that fails the
        fence is dead (luod rebooted): the next call finds out.
        """
        for session in (self.current, self.next):
            if session is not None and not session.closed:
                try:
                    session.fence(_FENCE_TIMEOUT)
                except liveupdate.LiveUpdateError:
                    pass

    def _stale(self) -> bool:
        """Whether luod rebooted under us (our session fds are dead: ENODEV)."""
        try:
            self.outgoing.get_name()
        except liveupdate.StaleGenerationError:
            return True
        return False

    def hand_over(self) -> None:
        """The service has exited: hand its state to the next one.

        If luod itself rebooted, the sessions are already incoming in its new
        generation: just re-acquire them. If the service had not taken its
        predecessor's state over yet (the incoming session is not finished),
        nothing moves: the next service gets the same sessions and retrieves
        again. Otherwise the outgoing session is handed over and re-acquired.
        """
        if self._stale():
            _say("luod rebooted: re-acquiring the session from its new generation")
            self.release()
            self.acquire()
            return
        if self.state == SessionDirection.INCOMING and self.current is not None:
            if not self._incoming_finished():
                _say("the service had not taken its state over: it gets the same sessions")
                return
            self.current.close()
        self.outgoing.update()
        self.current = self.next = None
        self.acquire()

    def release(self) -> None:
        for session in (self.current, self.next):
            if session is not None:
                session.close()
        self.current = self.next = None

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
        # The service dies with its supervisor: otherwise an orphan would keep
        # the session fds open and a new supervisor could not take over.
        try:
            self.proc = subprocess.Popen(
                self.argv, env=env, pass_fds=pass_fds, preexec_fn=_die_with_parent
            )
        except OSError as exc:
            raise command_error(self.argv[0], exc.errno or errno.ENOEXEC) from None
        _say(f"started pid {self.proc.pid} ({direction_name(self.state)})")

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
        try:
            check_command(self.argv)
            self.acquire()
            self.spawn()
            return self._loop(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)
            self.release()

    def _wait(self, wake_r: int) -> None:
        """Sleep until the service exits, a signal arrives or luod goes away."""
        assert self.proc is not None
        pidfd = os.pidfd_open(self.proc.pid)
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        # The service shares the session sockets, so their replies make them
        # readable: watch for the hang-up alone (luod closed its end: it
        # rebooted), which is then handled like an update.
        session_fd = self.outgoing.fileno()
        poller.register(session_fd, _POLLRDHUP)
        try:
            while self.proc.poll() is None and not self._update and self._stop_signal is None:
                for fd, events in poller.poll():
                    if fd == session_fd and events & (_POLLRDHUP | select.POLLHUP):
                        self._update = True
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    pass
        finally:
            os.close(pidfd)

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
                rc = self.stop_service(self.stop_signal)
                _say(f"update: service exit {rc}; handing session {self.name!r} over")
                self.resync()
                self.hand_over()
                self.spawn()
                continue
            rc = self.proc.returncode
            if rc == 0 or self.restart == "no":
                _say(f"service exited {rc}")
                return _exit_status(rc)
            if not self._may_restart():
                _say(f"service crashed {rc}; too many restarts, giving up")
                return _exit_status(rc)
            _say(f"service crashed ({rc}); restarting it with its state")
            self.resync()
            self.hand_over()
            self.spawn()
