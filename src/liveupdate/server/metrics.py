"""Prometheus metrics of luod (``--metrics-address HOST:PORT``, off by default).

**Why a thread, and why it never touches the core.** ``prometheus_client``
serves HTTP from a thread of its own (``start_http_server``). luod's core is
single-threaded by design (:mod:`liveupdate.server.transport`), so the HTTP
thread never reads the orchestrator: at each scrape the collector asks the
event loop for a snapshot (:meth:`DeviceServer.call_soon_threadsafe`), the
loop builds it between two events, as it would serve any call, and the
thread only formats it. Serving HTTP from the selector loop itself would
need an HTTP parser and slow-client handling in the loop; the thread keeps
that out of the core, and costs nothing between scrapes.

**Why plain counters on the hot path.** Every ioctl is counted with a dict
update in the transport (``DeviceServer.calls`` and ``failures``); no
``prometheus_client`` object is touched per call (``bench/ops.py`` measures
that path). The collector turns those dicts into counters at scrape time.

A scrape during a live update's blackout (the loop is busy handing over)
waits up to :data:`SNAPSHOT_WAIT` seconds, then answers the last snapshot.
The next generation binds the same address once the old one has let it go.
Each metric is described in ``docs/guides/metrics.md``.

**Why the reboot histograms start afresh in each generation.** The
generation that measures a live update is the next one: the image carries
when the REBOOT began and when the freeze began, and the new generation,
once it serves, knows the duration and the blackout. Each generation's
histograms thus hold one observation, the live update that started it (none
after a cold start); nothing is carried from one generation's metrics to the
next. They are made at scrape time from the orchestrator, like the rest.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from liveupdate import uapi
from liveupdate.events import event

if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from liveupdate.server.transport import DeviceServer

__all__ = ["SNAPSHOT_WAIT", "MetricsEndpoint", "Snapshot", "parse_address", "take_snapshot"]

#: How long a scrape waits for the loop's snapshot.
SNAPSHOT_WAIT = 2.0
#: How long a new generation keeps trying to bind the address its predecessor holds.
BIND_RETRY = 30.0
#: Upper bounds (seconds) of the reboot histograms' buckets: a blackout is
#: milliseconds for a few sessions, about a second for thousands.
REBOOT_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0),
)
_NS_PER_S = 1e9


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as a host and a port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass
class Snapshot:
    """What a scrape reports, copied out of the loop."""

    generation: int = 0
    state: str = "normal"
    sessions: Counter[str] = field(default_factory=Counter)
    files: Counter[tuple[str, str]] = field(default_factory=Counter)
    memfd_bytes: int = 0
    calls: dict[int, int] = field(default_factory=dict)
    failures: dict[tuple[int, int], int] = field(default_factory=dict)
    lost_sessions: int = 0
    restored_sessions: int = 0
    connections: int = 0
    started: float = 0.0
    #: The live update that started this generation (seconds; 0: none, or unknown).
    reboot_blackout: float = 0.0
    reboot_duration: float = 0.0
    recovered_sessions: int = 0
    recovered_files: int = 0
    copies: str = "off"
    copies_error: int = 0


def take_snapshot(server: DeviceServer, restored: int, started: float) -> Snapshot:
    """The loop's side: copy what the metrics report (runs between two events)."""
    luo = server.luo
    snap = Snapshot(
        generation=luo.generation,
        state=luo.state.name.lower(),
        calls=dict(server.calls),
        failures=dict(server.failures),
        lost_sessions=luo.lost_sessions,
        restored_sessions=restored,
        connections=len(server.endpoints),
        started=luo.started_ns / _NS_PER_S if luo.started_ns else started,
        reboot_blackout=luo.reboot_blackout_ns / _NS_PER_S,
        reboot_duration=luo.reboot_duration_ns / _NS_PER_S,
        recovered_sessions=luo.recovered_sessions,
        recovered_files=luo.recovered_files,
        copies=luo.hooks.budget.copies.name.lower(),
        copies_error=luo.hooks.copies_error(),
    )
    for direction, table in (
        ("outgoing", luo.sessions.outgoing),
        ("incoming", luo.sessions.incoming),
    ):
        snap.sessions[direction] = len(table)
        for session in table.values():
            for file in session.files.values():
                snap.files[(direction, file.handler.compatible)] += 1
                snap.memfd_bytes += file.charge
    return snap


def _histogram(name: str, documentation: str, seconds: float) -> Metric:
    """A histogram holding ``seconds`` as its one observation (none when 0)."""
    from prometheus_client.core import HistogramMetricFamily

    seen = 1 if seconds > 0 else 0
    buckets = [(repr(bound), seen if seconds <= bound else 0) for bound in REBOOT_BUCKETS]
    buckets.append(("+Inf", seen))
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], buckets, seconds if seen else 0.0)
    return family


def _ioctl(cmd: int) -> str:
    info = uapi.IOCTLS.get(cmd)
    return info.name if info else f"{cmd:#x}"


class _Collector:
    """Turns the loop's snapshot into metric families at each scrape."""

    def __init__(self, server: DeviceServer, restored: int) -> None:
        self._server = server
        self._restored = restored
        self._started = time.time()
        self._lock = threading.Lock()
        self._last = Snapshot(started=self._started)

    def _snapshot(self) -> Snapshot:
        with self._lock:
            ready = threading.Event()
            box: list[Snapshot] = []

            def publish() -> None:
                box.append(take_snapshot(self._server, self._restored, self._started))
                ready.set()

            self._server.call_soon_threadsafe(publish)
            if ready.wait(SNAPSHOT_WAIT) and box:
                self._last = box[0]
            return self._last

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snapshot()
        gen = GaugeMetricFamily("luod_generation", "Live update number of the serving luod.")
        gen.add_metric([], snap.generation)
        yield gen
        state = GaugeMetricFamily("luod_state", "1 for the current state.", labels=["state"])
        for name in ("normal", "prepared", "frozen", "updated"):
            state.add_metric([name], 1 if snap.state == name else 0)
        yield state
        sessions = GaugeMetricFamily("luod_sessions", "Sessions held.", labels=["direction"])
        for direction in ("outgoing", "incoming"):
            sessions.add_metric([direction], snap.sessions[direction])
        yield sessions
        files = GaugeMetricFamily(
            "luod_files", "Preserved files held.", labels=["direction", "handler"]
        )
        for (direction, handler), n in sorted(snap.files.items()):
            files.add_metric([direction, handler], n)
        yield files
        memfd = GaugeMetricFamily(
            "luod_memfd_bytes", "Bytes of memfd held (their sizes when preserved)."
        )
        memfd.add_metric([], snap.memfd_bytes)
        yield memfd
        calls = CounterMetricFamily("luod_calls", "ioctls answered.", labels=["ioctl"])
        for cmd, n in sorted(snap.calls.items()):
            calls.add_metric([_ioctl(cmd)], n)
        yield calls
        failures = CounterMetricFamily(
            "luod_call_failures", "ioctls answered with an error.", labels=["ioctl", "errno"]
        )
        for (cmd, err), n in sorted(snap.failures.items()):
            failures.add_metric([_ioctl(cmd), errno.errorcode.get(err, str(err))], n)
        yield failures
        lost = GaugeMetricFamily("luod_lost_sessions", "Sessions reported lost at this start.")
        lost.add_metric([], snap.lost_sessions)
        yield lost
        restored = GaugeMetricFamily(
            "luod_restored_sessions", "Sessions this generation received at its start."
        )
        restored.add_metric([], snap.restored_sessions)
        yield restored
        conns = GaugeMetricFamily("luod_connections", "Device, control and session connections.")
        conns.add_metric([], snap.connections)
        yield conns
        started = GaugeMetricFamily(
            "luod_generation_start_time_seconds", "When this generation started (Unix time)."
        )
        started.add_metric([], snap.started)
        yield started
        yield _histogram(
            "luod_reboot_blackout_seconds",
            "Freeze to the next generation serving, of the live update that started this one.",
            snap.reboot_blackout,
        )
        yield _histogram(
            "luod_reboot_duration_seconds",
            "REBOOT call to the next generation serving, of the live update that started this one.",
            snap.reboot_duration,
        )
        for what, value in (("sessions", snap.recovered_sessions), ("files", snap.recovered_files)):
            recovered = GaugeMetricFamily(
                f"luod_recovered_{what}",
                f"{what.capitalize()} the crash copies gave back at this start.",
            )
            recovered.add_metric([], value)
            yield recovered
        copies = GaugeMetricFamily(
            "luod_copies", "1 for where crash copies are kept.", labels=["kind"]
        )
        for kind in ("off", "keeper", "fdstore"):
            copies.add_metric([kind], 1 if snap.copies == kind else 0)
        yield copies
        copies_error = GaugeMetricFamily(
            "luod_copies_error",
            "errno of the crash copies' last failure, or why they could not start (0: healthy).",
        )
        copies_error.add_metric([], snap.copies_error)
        yield copies_error


class MetricsEndpoint:
    """The HTTP endpoint: a registry with luod's collector, served by a thread."""

    def __init__(self, server: DeviceServer, address: str, restored: int = 0) -> None:
        from prometheus_client import CollectorRegistry

        self.host, self.port = parse_address(address)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(server, restored))
        self._http: object | None = None
        self._closed = threading.Event()
        self._starter = threading.Thread(target=self._bind, name="luod-metrics", daemon=True)

    def start(self) -> None:
        self._starter.start()

    def _bind(self) -> None:
        """Bind, retrying while the previous generation still holds the address."""
        from prometheus_client import start_http_server

        deadline = time.monotonic() + BIND_RETRY
        while not self._closed.is_set():
            try:
                self._http, _thread = start_http_server(self.port, self.host, self.registry)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    event("metrics-failed", logging.ERROR, address=f"{self.host}:{self.port}",
                          error=exc.strerror)  # fmt: skip
                    return
                time.sleep(0.05)
                continue
            event("metrics-serving", address=f"{self.host}:{self.port}")
            return

    def close(self) -> None:
        self._closed.set()
        http = self._http
        if http is not None:
            http.shutdown()  # type: ignore[attr-defined]
            http.server_close()  # type: ignore[attr-defined]
