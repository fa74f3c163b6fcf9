"""kvcache as a participant of luod's live updates.

With a session (``--session NAME``, or under ``luoctl run``) kvcache
registers the participant ``kvcache:NAME`` (``--participant`` names it, and
makes a standalone kvcache take part too; ``--no-participant`` opts out). At
luod's FREEZE it stops applying writes (a connection whose next command
writes is not read any further; reads go on) and answers with
:data:`CARRIED`: the arena's last cas and item count. The writes resume at a
CANCEL, or once luod's generation ended (the participant fd reads EOF) and
kvcache registered again with the next generation, which gives that data
back: the cas it finds in the arena then must be the one it carried, since
every store advances the cas and none was applied in between.

Registration goes through luod's control socket when there is one (never
busy), else the device, and needs a privileged caller (root, luod's user or
its ``--admin-group``). A luod without participants (``ENOTTY``/``EINVAL``:
an older luod, ``--compat=linux``, a kernel) or a refusal (``EACCES``) is
logged once and kvcache serves on without taking part; anything else (luod
restarting, the name still held by a predecessor) is retried.
"""

from __future__ import annotations

import errno
import os
import selectors
import struct
import sys
import time
from collections.abc import Callable

import liveupdate
from liveupdate import uapi
from liveupdate.client.control import control_path, open_control

__all__ = ["CARRIED", "REJOIN_GRACE", "UpdateParticipant", "participant_name"]

#: The participant's data: the arena's last cas and its item count at the freeze.
CARRIED = struct.Struct("<QQ")
#: Seconds between two attempts to register, right after luod's generation
#: ended; doubled after each failure up to :data:`RETRY_MAX`.
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
#: Seconds writes stay frozen after luod's generation ended while kvcache
#: cannot register again (luod did not come back): then they resume anyway.
REJOIN_GRACE = 10.0
#: Seconds between two reports of a failing registration.
REPORT = 30.0
#: The prefix of the name derived from a session name.
PREFIX = "kvcache:"

Event = uapi.LuodParticipantEvent
#: luod answers these when it has no participants at all (older, ``--compat=linux``).
_UNSUPPORTED = (liveupdate.NotSupportedError, liveupdate.InvalidArgumentError)


def participant_name(session: str) -> str:
    """The participant name derived from a session name: ``kvcache:SESSION``."""
    return PREFIX + session


def _say(message: str) -> None:
    print(f"kvcache[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class UpdateParticipant:
    """One registration with luod, renewed after each of its live updates.

    Args:
        name: The participant's name.
        device: luod's device socket (``None``: the client library's default).
        sel: The server's selector: the participant fd goes in with
            :meth:`on_readable` as its data, and out before it is closed.
        freeze: Called at FREEZE: stop applying writes; returns the data to carry.
        thaw: Called when the freeze is over: apply writes again.
        refusal: Called at PREPARE and FREEZE: the errno refusing them (0: accept).
        carried: Called after each registration with the data it carried back.
    """

    def __init__(
        self,
        name: str,
        device: str | None,
        sel: selectors.BaseSelector,
        *,
        freeze: Callable[[], bytes],
        thaw: Callable[[], None],
        refusal: Callable[[], int],
        carried: Callable[[bytes], str],
    ) -> None:
        self.name = name
        self.device = device
        self._sel = sel
        self._freeze = freeze
        self._thaw = thaw
        self._refusal = refusal
        self._carried = carried
        self.part: liveupdate.Participant | None = None
        #: Writes frozen by a FREEZE that is not over yet.
        self.frozen = False
        #: Not taking part any more (luod has no participants, or refused us).
        self.disabled = False
        self._retry = RETRY_FIRST
        self._next_try = 0.0
        self._thaw_by: float | None = None
        self._last_report = -REPORT

    # -- the server loop's side --------------------------------------------------------

    def timeout(self) -> float | None:
        """Seconds until :meth:`tick` is due; ``None``: only events matter."""
        due = None
        if self.part is None and not self.disabled:
            due = self._next_try
        if self._thaw_by is not None:
            due = self._thaw_by if due is None else min(due, self._thaw_by)
        return None if due is None else max(0.0, due - time.monotonic())

    def tick(self) -> None:
        """Register when an attempt is due; resume writes once the grace is over."""
        now = time.monotonic()
        if self.part is None and not self.disabled and now >= self._next_try:
            self._try_register(now)
        if self._thaw_by is not None and now >= self._thaw_by and self.frozen:
            self._end_freeze(f"not registered again within {REJOIN_GRACE:g} s")

    def on_readable(self) -> None:
        """The participant fd is readable: answer the event, or take the EOF."""
        part = self.part
        if part is None:
            return
        try:
            ev = part.read_event(timeout=0)
        except OSError:  # ParticipantClosedError: the generation ended, or luod stopped
            self._ended()
            return
        if ev is None:
            return
        error, data = 0, None
        if ev.kind in (Event.PREPARE, Event.FREEZE):
            error = self._refusal()
        if error:
            _say(f"participant {self.name!r} refuses {ev.kind.name}: {os.strerror(error)}")
        elif ev.kind is Event.FREEZE:
            data = self._freeze()
            self.frozen = True
            cas, items = CARRIED.unpack(data)
            _say(
                f"participant {self.name!r} frozen: writes wait for the live update, "
                f"reads go on (cas {cas}, {items} items)"
            )
        elif ev.kind is Event.CANCEL:
            self._end_freeze("the live update was cancelled")
        try:
            part.answer(ev, error, data)
        except OSError:
            self._ended()

    def close(self) -> None:
        """Unregister (the fd out of the selector, then closed)."""
        part, self.part = self.part, None
        if part is not None:
            self._sel.unregister(part.fileno())
            part.close()

    # -- registering -------------------------------------------------------------------

    def _try_register(self, now: float) -> None:
        self._next_try = now + self._retry
        self._retry = min(self._retry * 2, RETRY_MAX)
        try:
            part = self._register()
        except _UNSUPPORTED as exc:
            self._give_up(f"luod takes no participants ({exc})")
            return
        except (liveupdate.PermissionDeniedError, ValueError) as exc:
            self._give_up(f"not registered ({exc})")
            return
        except (liveupdate.LiveUpdateError, OSError) as exc:
            if now - self._last_report >= REPORT:
                self._last_report = now
                _say(f"participant {self.name!r} not registered yet (retrying): {exc}")
            return
        self.part = part
        self._sel.register(part.fileno(), selectors.EVENT_READ, self.on_readable)
        self._retry = RETRY_FIRST
        self._last_report = -REPORT
        _say(f"participant {self.name!r} registered{self._carried(part.data)}")
        self._end_freeze("registered with luod's next generation")

    def _register(self) -> liveupdate.Participant:
        path = control_path(self.device)
        if path is not None:
            try:
                with open_control(path, timeout=1.0) as control:
                    return control.register_participant(self.name)
            except liveupdate.LiveUpdateError as exc:
                # Not there, not ours to use, or a control socket without
                # participants: the device decides.
                if exc.errno not in (
                    errno.ENOENT,
                    errno.ECONNREFUSED,
                    errno.EACCES,
                    errno.ENOTTY,
                    errno.EINVAL,
                ):
                    raise
        with liveupdate.open_device(self.device, timeout=1.0) as dev:
            return dev.register_participant(self.name)

    def _give_up(self, why: str) -> None:
        self.disabled = True
        _say(f"participant {self.name!r}: {why}; serving without taking part in live updates")
        self._end_freeze("not taking part")

    # -- the end of a freeze -----------------------------------------------------------

    def _ended(self) -> None:
        """luod's generation ended (its live update happened) or luod stopped."""
        self.close()
        now = time.monotonic()
        self._retry = RETRY_FIRST
        self._next_try = now
        if self.frozen:
            self._thaw_by = now + REJOIN_GRACE
            _say(f"participant {self.name!r}: luod's generation ended; registering again")

    def _end_freeze(self, why: str) -> None:
        self._thaw_by = None
        if self.frozen:
            self.frozen = False
            self._thaw()
            _say(f"participant {self.name!r}: writes resume ({why})")
