"""An example third-party file handler for luod: timerfds (``timerfd-v1``).

luod asks its handlers, in order, whether they take a file a client wants to
preserve. This one takes timerfds (``timerfd_create(2)``): it recognises them
by their ``/proc/self/fd`` link, ``anon_inode:[timerfd]``.

Like luod's built-in handlers it preserves the open file itself: luod keeps
a reference to the timerfd, which the live update (a re-exec of luod) inherits.
The timer keeps running meanwhile, so after the update the retrieved timerfd
is still armed with the same clock and interval and its next ``read()``
returns every expiration that happened in between.

Handler data: what ``/proc/self/fdinfo`` shows of the timer at freeze, as
compact JSON (UTF-8, sorted keys)::

    {"clockid": 1, "interval": [0, 10000000], "settime_flags": 0,
     "ticks": 0, "v": 1, "value": [0, 4999000]}

``v`` is the layout version; ``clockid`` the clock (``CLOCK_MONOTONIC`` is
1); ``interval`` and ``value`` the timer's ``it_interval`` and ``it_value``
as ``[seconds, nanoseconds]``; ``ticks`` the expirations not read yet (as the
kernel counts them at that instant); ``settime_flags`` the flags of the last
``timerfd_settime`` (1: ``TFD_TIMER_ABSTIME``). The next generation checks
that the inherited fd is still a timerfd on the same clock.

Everything here uses only the public handler interface,
:class:`liveupdate.core.file.FileHandler`.
"""

from __future__ import annotations

import errno
import json
import os
import re
from typing import Any

from liveupdate.core.file import FileHandler, PreservedFile

__all__ = ["TimerfdHandler"]

__version__ = "0.1.0"

LINK = "anon_inode:[timerfd]"
_PAIR = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*\)")


def _link(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def timer_state(fd: int) -> dict[str, Any]:
    """The timer as ``/proc/self/fdinfo`` shows it (reading it changes nothing)."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        lines = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    try:
        value = _PAIR.fullmatch(lines["it_value"].strip())
        interval = _PAIR.fullmatch(lines["it_interval"].strip())
        if value is None or interval is None:
            raise ValueError("it_value/it_interval")
        return {
            "v": 1,
            "clockid": int(lines["clockid"]),
            "ticks": int(lines["ticks"]),
            "settime_flags": int(lines["settime flags"], 8),
            "value": [int(value[1]), int(value[2])],
            "interval": [int(interval[1]), int(interval[2])],
        }
    except (KeyError, ValueError) as exc:
        raise OSError(errno.EINVAL, f"unexpected timerfd fdinfo ({exc})") from None


class TimerfdHandler(FileHandler):
    """Preserves timerfds by holding them open."""

    compatible = "timerfd-v1"

    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
        return _link(fd) == LINK

    def freeze(self, file: PreservedFile) -> bytes:
        return json.dumps(timer_state(file.fd), sort_keys=True, separators=(",", ":")).encode()

    def restore(self, file: PreservedFile) -> None:
        try:
            recorded = self.describe_data(file.data)
        except ValueError as exc:
            raise OSError(errno.EINVAL, f"timerfd-v1 data: {exc}") from None
        if _link(file.fd) != LINK:
            raise OSError(errno.EINVAL, "inherited fd is not a timerfd")
        if timer_state(file.fd)["clockid"] != recorded["clockid"]:
            raise OSError(errno.EINVAL, "inherited timerfd runs on another clock")

    def describe(self, file: PreservedFile) -> dict[str, Any]:
        try:
            state = timer_state(file.fd) if file.fd >= 0 else self.describe_data(file.data)
        except (OSError, ValueError):
            return {"type": "timerfd"}
        return {"type": "timerfd", "clockid": state["clockid"], "interval": state["interval"]}

    @staticmethod
    def describe_data(data: bytes) -> dict[str, Any]:
        """The fields of ``timerfd-v1`` data; :class:`ValueError` when malformed."""
        state = json.loads(data)
        if not isinstance(state, dict) or state.get("v") != 1:
            raise ValueError("not timerfd-v1 data of layout 1")
        for key in ("clockid", "ticks", "settime_flags", "value", "interval"):
            if key not in state:
                raise ValueError(f"missing {key!r}")
        return {"type": "timerfd", **state}
