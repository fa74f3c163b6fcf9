"""Holds luod cannot see: connections kept open only by fds in flight.

luod learns that a client is gone when the client's end of a connection is
closed. An fd sent with ``SCM_RIGHTS`` and not yet received is not closed,
though: it lives in the receive queue of some socket, held by no process.
When that socket is one luod itself holds (a preserved socket), the cycle
never breaks by itself: the client's end of luod's own device connection (or
of a session) sits in a queue that luod keeps alive, so luod never sees the
hang-up. The device then answers ``EBUSY`` forever, a session outlives its
client and counts against the limits.

This module tells such a *ghost* from a real hold, from the facts
:mod:`liveupdate.server.census` gathers: an endpoint whose peer socket (the
client's end) no process holds is a suspect, and a ghost only when a census
:data:`GRACE` seconds later still finds no holder, so an fd merely
travelling through a legitimate hand-off is never taken for one, and the
peer is proven parked in a queue luod itself holds
(:func:`~liveupdate.server.census.inodes_in_queues`) or, where allowed, no fd
table was unreadable. The rules, and why, are in :class:`HoldWatch` and
``docs/security.md``.

:class:`EndpointHolds` applies them to the transport's endpoints: a ghost is
looked for only when someone is refused because of an endpoint (a busy
device, a session name in use) or when the operator asks (SIGUSR1), and a
ghost is closed as its client would have closed it.

The peer of a session's socketpair is known (luod creates both ends); the
peer of an accepted device connection is asked from the kernel
(:func:`~liveupdate.server.census.unix_peer_inode`).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from liveupdate.events import event
from liveupdate.server.census import Census, inodes_in_queues, take_census, unix_peer_inode
from liveupdate.server.endpoint import Endpoint

__all__ = ["CENSUS_REUSE", "GRACE", "EndpointHolds", "HoldState", "HoldWatch", "Verdict"]

#: Seconds an endpoint's peer must stay in flight (seen so by two censuses
#: this far apart) before the endpoint counts as a ghost. A legitimate
#: hand-off (sendmsg, then the receiver's recvmsg) is far shorter.
GRACE = 1.0
#: A census younger than this is reused: a client hammering a busy device
#: costs luod one walk of /proc per this many seconds, not one per open.
CENSUS_REUSE = 0.25
#: How often "holds cannot be checked" is logged at most.
_UNKNOWN_WARN_EVERY = 60.0


class HoldState(enum.Enum):
    """What holds the client's end of one of luod's endpoints."""

    #: One or more processes have it in their fd table.
    HELD = "held"
    #: No process luod can see holds it; not (yet) proven a ghost.
    IN_FLIGHT = "in-flight"
    #: A ghost: see :meth:`HoldWatch.verdict`.
    GHOST = "ghost"
    #: Cannot tell (peer unknown, or /proc cannot be trusted).
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Verdict:
    state: HoldState
    holders: frozenset[int] = frozenset()
    why: str = ""

    def describe(self) -> str:
        """``pid,pid`` for a held endpoint, else the state's name."""
        if self.state == HoldState.HELD:
            return ",".join(str(pid) for pid in sorted(self.holders))
        return str(self.state.value)


K = TypeVar("K")


class HoldWatch(Generic[K]):
    """Tells ghosts from holds for endpoints keyed by ``K``.

    An endpoint whose peer no visible process holds becomes a *suspect*,
    remembered with the time of that census. It is a ghost when a census at
    least :data:`GRACE` seconds later still finds no holder, and either

    * the peer sits in a queue luod itself holds (``queued``): luod keeps
      it alive, a cycle nobody else can break, whatever hides in fd tables
      luod could not read; or
    * every fd table could be read and ``strict`` is false: nobody can
      ever use that end except by receiving it from wherever it is parked.

    :meth:`due` says when the earliest suspect can be confirmed, so the
    event loop can look again by itself.

    Args:
        queued: Inodes of the files in flight in the queues luod holds
            (:func:`inodes_in_queues` over luod's fds); asked only when a
            suspect's grace is over.
        grace: See :data:`GRACE`.
        reuse: See :data:`CENSUS_REUSE`.
        census: Takes a census.
        clock: ``time.monotonic`` or a stand-in.
    """

    def __init__(
        self,
        queued: Callable[[], set[int]],
        grace: float = GRACE,
        reuse: float = CENSUS_REUSE,
        census: Callable[[], Census] = take_census,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grace = grace
        self.reuse = reuse
        self._queued = queued
        self._take = census
        self._clock = clock
        self._last: Census | None = None
        self._last_queued: tuple[float, set[int]] | None = None
        self._suspects: dict[K, float] = {}
        self._warned = -_UNKNOWN_WARN_EVERY

    def census(self, force: bool = False, not_before: float | None = None) -> Census:
        """The latest census, taken anew when older than ``reuse`` seconds,
        when ``force``d, or when older than ``not_before`` (if that has passed).
        """
        now = self._clock()
        last = self._last
        if (
            force
            or last is None
            or now - last.taken >= self.reuse
            or (not_before is not None and last.taken < not_before <= now)
        ):
            last = self._last = self._take()
            event(
                "holds-census",
                logging.DEBUG,
                sockets=len(last.holders),
                blind=last.blind or None,
                unseen=last.unseen or None,
            )
            if (last.blind or last.unseen) and now - self._warned >= _UNKNOWN_WARN_EVERY:
                self._warned = now
                event("holds-partly-unseen", logging.WARNING, reason=last.blind or last.unseen)
        return last

    def _in_luods_queues(self, census: Census, inode: int) -> bool:
        cached = self._last_queued
        if cached is None or cached[0] != census.taken:
            cached = self._last_queued = (census.taken, self._queued())
        return inode in cached[1]

    def verdict(
        self, key: K, peer_inode: int | None, *, strict: bool, force: bool = False
    ) -> Verdict:
        """Who holds ``peer_inode``, the client's end of ``key``.

        ``strict``: a ghost needs the cycle proof (the peer in one of luod's
        queues) even when every fd table was read; for endpoints whose close
        loses something (a session's files).
        """
        first = self._suspects.get(key)
        census = self.census(force, None if first is None else first + self.grace)
        if census.blind or peer_inode is None:
            self._suspects.pop(key, None)
            return Verdict(HoldState.UNKNOWN, why=census.blind or "the peer socket is unknown")
        pids = census.holders.get(peer_inode)
        if pids:
            self._suspects.pop(key, None)
            return Verdict(HoldState.HELD, pids)
        if first is None:
            self._suspects[key] = census.taken
            return Verdict(HoldState.IN_FLIGHT, why=census.unseen)
        if census.taken - first < self.grace:
            return Verdict(HoldState.IN_FLIGHT, why=census.unseen)
        # Two looks a grace apart: it was not merely passing through.
        if self._in_luods_queues(census, peer_inode):
            return Verdict(HoldState.GHOST, why="parked in a socket queue luod holds")
        if not strict and not census.unseen:
            return Verdict(HoldState.GHOST, why="held by no process")
        # Parked where a process may still receive it: not ours to break.
        self._suspects.pop(key, None)
        return Verdict(
            HoldState.IN_FLIGHT,
            why=census.unseen or "parked in a queue luod does not hold",
        )

    def suspects(self) -> list[K]:
        return list(self._suspects)

    def forget(self, key: K) -> None:
        """``key`` is closed: nothing to confirm any more."""
        self._suspects.pop(key, None)

    def keep_only(self, keep: Iterable[K]) -> None:
        """Forget every suspect not in ``keep`` (closed meanwhile)."""
        alive = set(keep)
        for key in [k for k in self._suspects if k not in alive]:
            del self._suspects[key]

    def due(self) -> float | None:
        """Seconds until the earliest suspect can be confirmed (``None``: none)."""
        if not self._suspects:
            return None
        return max(0.0, min(self._suspects.values()) + self.grace - self._clock())


class EndpointHolds:
    """The ghost-hold watcher of one transport's endpoints.

    Args:
        held_fds: The fds luod holds whose socket queues may park a client's
            end (its endpoints' sockets, the preserved files).
        close: Closes an endpoint as its client would have (the transport's).
    """

    def __init__(
        self, held_fds: Callable[[], list[int]], close: Callable[[Endpoint], None]
    ) -> None:
        self.watch: HoldWatch[Endpoint] = HoldWatch(lambda: inodes_in_queues(held_fds()))
        self._close = close

    def due(self) -> float | None:
        """Seconds until a suspect can be confirmed (``None``: no suspect)."""
        return self.watch.due()

    def forget(self, ep: Endpoint) -> None:
        self.watch.forget(ep)

    def _peer_inode(self, ep: Endpoint) -> int | None:
        if ep.peer_inode is None and ep.session is None:
            try:
                ep.peer_inode = unix_peer_inode(os.fstat(ep.sock.fileno()).st_ino)
            except OSError:
                return None
        return ep.peer_inode

    def _verdict(self, ep: Endpoint, force: bool = False) -> Verdict:
        # Closing a session loses its files: only a proven cycle does that.
        return self.watch.verdict(
            ep, self._peer_inode(ep), strict=ep.session is not None, force=force
        )

    def is_ghost(self, ep: Endpoint, why: str, force: bool = False) -> bool:
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

    def confirm_suspects(self, endpoints: Iterable[Endpoint]) -> None:
        """A grace period after an endpoint was seen in flight: look again."""
        self.watch.keep_only(endpoints)
        for ep in self.watch.suspects():
            if not ep.closed and self.is_ghost(ep, "still in flight"):
                self._close(ep)

    def report(self, endpoints: Collection[Endpoint]) -> None:
        """Log who holds the client's end of every endpoint (SIGUSR1).

        Endpoints found in flight are looked at again a grace period later
        and closed if they still are: the operator's way out of a hold no
        client can release, which costs nobody else's session.
        """
        eps = sorted(endpoints, key=lambda e: (e.session is not None, e.sock.fileno()))
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
