"""Accepting device connections, even when luod's fd table is full.

Every preserved file costs luod an fd, so its table can fill up. A plain
``accept()`` then fails with ``EMFILE`` and leaves the client in the
backlog, where a level-triggered event loop would see the listener readable
forever and spin. :class:`Acceptor` keeps both problems away from the loop:

* it keeps one *spare* fd (``/dev/null``) and gives it up for the time of one
  accept, so that a waiting opener gets a hello carrying ``EMFILE`` instead
  of hanging (:meth:`Acceptor._refuse_with_spare_fd`);
* when even that fails (``ENOBUFS``, no spare fd), it stops watching the
  listener for :data:`ACCEPT_PAUSE` seconds (:meth:`Acceptor.resume` tells
  the loop how long it may wait), and says so at most once in a while.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Iterator

from liveupdate import wire
from liveupdate.events import event

__all__ = ["ACCEPT_PAUSE", "Acceptor"]

#: How long the listener rests after accept() failed (fds exhausted).
ACCEPT_PAUSE = 0.1
#: How often a failing accept is logged at most.
_ACCEPT_WARN_EVERY = 10.0


def _open_spare_fd() -> int:
    """An fd that costs nothing but its slot (``-1`` if the table is full)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class Acceptor:
    """Accepts on ``listener``, registered (with no data) in ``selector``."""

    def __init__(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        self.listener = listener
        self.selector = selector
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, None)
        #: While accept() fails for lack of fds: when to try again.
        self._resume_at: float | None = None
        self._warned = 0.0
        #: Given up when the fd table is full, to answer an opener EMFILE.
        self._spare_fd = _open_spare_fd()

    def accept(self) -> Iterator[socket.socket]:
        """Every connection waiting now (refused ones are answered here)."""
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
                self._pause()
                if self._may_warn():
                    event("accept-failed", logging.WARNING, error=exc.strerror)
                return
            yield sock

    def _may_warn(self) -> bool:
        """Whether a warning is due (one per :data:`_ACCEPT_WARN_EVERY` at most)."""
        now = time.monotonic()
        if now - self._warned <= _ACCEPT_WARN_EVERY:
            return False
        self._warned = now
        return True

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
        if self._may_warn():
            event("device-refused-no-fds", logging.WARNING)
        return True

    def _pause(self) -> None:
        if self._resume_at is None:
            self.selector.unregister(self.listener)
        self._resume_at = time.monotonic() + ACCEPT_PAUSE

    def resume(self) -> float | None:
        """Watch the listener again once the pause is over; the time left, else None."""
        if self._resume_at is None:
            return None
        left = self._resume_at - time.monotonic()
        if left > 0:
            return left
        self._resume_at = None
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        return None

    def close(self) -> None:
        """Give the spare fd back (the listening socket is the caller's)."""
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
