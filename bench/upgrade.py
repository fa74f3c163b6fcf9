#!/usr/bin/env python3
"""Benchmark: what the clients of a cache see while it is upgraded.

A cache is filled with items (half its configured size, in values of up to
400 KiB so that filling 4 GiB takes seconds), then upgraded while

* an *active* client sends ``get`` requests back to back on one connection
  (reconnecting, one attempt a millisecond, when the connection is lost), and
* an *idle* client holds 100 connections, each answered once before the
  upgrade and asked ``version`` again after it.

Each upgrade is measured for four ways of doing it, at each cache size:

* ``memcached warm restart``: Debian's memcached in restartable mode (``-e``
  on a tmpfs file): ``SIGUSR1`` (it saves its memory and exits), then the
  same command again. memcached 1.6.18 reloads the file only when started in
  a later wall-clock second than the one its save recorded (``stop_time``
  in the ``.meta`` file), and otherwise starts empty; the benchmark waits
  for that second, as one has to, and the wait is part of its blackout.
* ``restart, state in a file``: ``kvcache serve --save-file``: ``SIGTERM``
  saves every item to the file and exits, the next start loads it.
* ``listener hand-off, state in a file``: ``kvcache handoff``: the old
  process stops, saves to the file, starts its successor with the listening
  socket as fd 3 (``LISTEN_FDS=1``) and exits; the successor loads the file:
  no connection is refused, but the established ones are the old process's.
* ``kvcache with liveupdate``: ``kvcache serve`` under ``luoctl run``,
  upgraded with ``kvcache upgrade``: the arena, the listener and every
  connection are handed over in the session.

Reported per way and size: the longest gap between two answered requests
of the active client, requests sent and never answered (or answered with an
error), refused connection attempts, connections dropped (of 101) and items
lost (of those stored before the upgrade, read back and compared after).
Then the throughput of kvcache next to memcached's (``memcslap``).

    .venv/bin/python bench/upgrade.py            # 1 MiB, 64 MiB, 1 GiB, 4 GiB (minutes)
    .venv/bin/python bench/upgrade.py --quick    # 1 and 4 MiB, a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import mmap
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import resultfile
import waiting

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
#: The share of the cache the items fill: room left for each server's overhead.
FILL = 0.5
#: The largest value stored: two fit in a 1 MiB slab page, memcached's (-I 1m) and kvcache's.
MAX_VALUE = 400 * 1024
MAX_ITEM_SIZE = MIB
IDLE_CONNECTIONS = 100
#: Seconds between two connection attempts of the active client.
RETRY = 0.001
#: Seconds the active client runs before and after an upgrade.
CALM = 0.3
PROBE = b"bench-probe"
KVCACHE = [sys.executable, "-m", "liveupdate.kvcache"]
LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


#: The benchmark's waits: a minute by default, polled every 5 ms.
wait_until = functools.partial(waiting.wait_until, timeout=60.0, step=0.005)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    """One connection speaking the memcached text protocol, buffered."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        out = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return out

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[: n + 2]
        return out

    def set(self, key: bytes, value: bytes) -> None:
        self.sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        if (reply := self.line()) != b"STORED":
            raise RuntimeError(f"set {key!r}: {reply!r}")

    def get_many(self, keys: list[bytes]) -> dict[bytes, bytes]:
        self.sock.sendall(b"get " + b" ".join(keys) + b"\r\n")
        found = {}
        while (head := self.line()) != b"END":
            parts = head.split()
            if parts[0] != b"VALUE":
                raise RuntimeError(f"get: {head!r}")
            found[parts[1]] = self.exact(int(parts[3]))
        return found

    def stats(self) -> dict[str, str]:
        self.sock.sendall(b"stats\r\n")
        out = {}
        while (head := self.line()) != b"END":
            _, name, value = head.decode().split(" ", 2)
            out[name] = value
        return out

    def close(self) -> None:
        self.sock.close()


def server_pid(port: int) -> int | None:
    """The pid a fresh connection's ``stats`` reports, or None if not serving."""
    try:
        conn = Conn(port, timeout=5)
    except OSError:
        return None
    try:
        return int(conn.stats()["pid"])
    except (OSError, ConnectionError, KeyError, ValueError):
        return None
    finally:
        conn.close()


@dataclass
class Items:
    """The items of one run: ``count`` values of ``size`` bytes, each told apart by its key."""

    count: int
    size: int
    base: bytes = field(repr=False)

    @classmethod
    def for_cache(cls, cache_mib: int) -> Items:
        size = min(MAX_VALUE, cache_mib * MIB // 256)
        return cls(int(cache_mib * MIB * FILL) // size, size, os.urandom(size))

    def key(self, i: int) -> bytes:
        return b"item:%d" % i

    def value(self, i: int) -> bytes:
        return b"%016d" % i + self.base[16:]

    def fill(self, port: int) -> None:
        conn = Conn(port)
        try:
            conn.set(PROBE, b"hello")
            for i in range(self.count):
                conn.set(self.key(i), self.value(i))
        finally:
            conn.close()

    def present(self, port: int) -> set[int]:
        """The items the server holds with their right value."""
        conn = Conn(port)
        good: set[int] = set()
        try:
            for start in range(0, self.count, 32):
                batch = range(start, min(start + 32, self.count))
                found = conn.get_many([self.key(i) for i in batch])
                good.update(i for i in batch if found.get(self.key(i)) == self.value(i))
        finally:
            conn.close()
        return good


class ActiveClient(threading.Thread):
    """``get`` after ``get`` on one connection; every answer's time, every failure counted."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.answers: list[float] = []
        self.failed = 0
        self.refused = 0
        self.dropped = 0
        self.stop = threading.Event()
        self.conn: Conn | None = Conn(port)

    def _connect(self) -> Conn | None:
        try:
            return Conn(self.port)
        except ConnectionRefusedError:
            self.refused += 1
            time.sleep(RETRY)
            return None

    def run(self) -> None:
        request = b"get %s\r\n" % PROBE
        while not self.stop.is_set():
            if self.conn is None:
                self.conn = self._connect()
                continue
            try:
                self.conn.sock.sendall(request)
                while (head := self.conn.line()) != b"END":
                    if head.startswith(b"VALUE"):
                        self.conn.exact(int(head.split()[3]))
                    else:
                        raise RuntimeError(head)
                self.answers.append(time.monotonic())
            except (OSError, ConnectionError):
                # Sent and never answered: the request failed, and the connection is gone.
                self.failed += 1
                self.dropped += 1
                self.conn.close()
                self.conn = None
            except RuntimeError:
                self.failed += 1
        if self.conn is not None:
            self.conn.close()

    def longest_gap(self) -> float:
        return max((b - a for a, b in itertools.pairwise(self.answers)), default=0.0)


class IdleClient:
    """Connections answered once before the upgrade, asked again after it."""

    def __init__(self, port: int, count: int = IDLE_CONNECTIONS) -> None:
        self.conns = [Conn(port, timeout=10) for _ in range(count)]
        for conn in self.conns:
            self._version(conn)

    @staticmethod
    def _version(conn: Conn) -> None:
        conn.sock.sendall(b"version\r\n")
        if not conn.line().startswith(b"VERSION"):
            raise ConnectionError("no VERSION")

    def dropped(self) -> int:
        lost = 0
        for conn in self.conns:
            try:
                self._version(conn)
            except (OSError, ConnectionError):
                lost += 1
            conn.close()
        return lost


# ---------------------------------------------------------------------------------------------
# The ways of upgrading. Each starts a server of ``cache_mib`` on ``port``, upgrades it (the
# call returns when the upgrade command has), and stops it.


class Way:
    name = ""
    #: How ``--ways`` names it.
    key = ""
    #: What the row says besides the numbers (a setting the way had to change, a wait).
    note = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = 0
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cache_mib: int, port: int) -> None:
        raise NotImplementedError

    def upgrade(self) -> None:
        raise NotImplementedError

    def _spawn(self, argv: list[str], log: str, **kw: object) -> subprocess.Popen[bytes]:
        with open(self.work / log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def _wait_serving(self, proc: subprocess.Popen[bytes], log: str) -> None:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: exited: {(self.work / log).read_text()[-2000:]}")
            return server_pid(self.port) is not None

        wait_until(up, f"{self.name} serving")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


class MemcachedWarmRestart(Way):
    name = "memcached warm restart"
    key = "memcached"

    def start(self, cache_mib: int, port: int) -> None:
        self.port = port
        self.file = Path("/dev/shm") / f"bench-upgrade-{os.getpid()}-{cache_mib}"
        self.memory = cache_mib
        self.waited = 0.0
        self.proc = self._start_memcached()
        self.note = "" if self.memory == cache_mib else f"-m {self.memory}: its least with -e"

    def _argv(self) -> list[str]:
        return ["memcached", "-e", str(self.file), "-m", str(self.memory),
                "-I", str(MAX_ITEM_SIZE), "-l", "127.0.0.1", "-p", str(self.port), "-U", "0",
                "-c", "4096", *(["-u", "root"] if os.geteuid() == 0 else [])]  # fmt: skip

    def _start_memcached(self) -> subprocess.Popen[bytes]:
        while True:
            proc = self._spawn(self._argv(), "memcached.log")
            try:
                self._wait_serving(proc, "memcached.log")
                return proc
            except RuntimeError:
                # The restartable mode preallocates a page per slab class, and -I may be at
                # most half of -m: memcached refuses a smaller memory limit, saying why.
                log = self._log()
                least = [int(n) for n in re.findall(r"at least (\d+) megabytes", log)]
                if log.rstrip().endswith("higher than 1/2 of memory max."):
                    least.append(2 * MAX_ITEM_SIZE // MIB)
                if not least or least[-1] <= self.memory:
                    raise
                self.memory = least[-1]

    def _log(self) -> str:
        return (self.work / "memcached.log").read_text()

    def upgrade(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)
        self.proc.wait(120)
        # memcached reloads only when started in a later second than the save's stop_time.
        meta = Path(f"{self.file}.meta").read_text()
        stop_time = int(re.search(r"stop_time (\d+)", meta).group(1))  # type: ignore[union-attr]
        before = time.monotonic()
        while time.time() < stop_time + 1:
            time.sleep(0.0005)
        self.waited = time.monotonic() - before
        self.proc = self._start_memcached()

    def stop(self) -> None:
        super().stop()
        for path in (self.file, Path(f"{self.file}.meta")):
            path.unlink(missing_ok=True)


class KvcacheSaveFile(Way):
    name = "restart, state in a file"
    key = "savefile"

    def _argv(self, cache_mib: int) -> list[str]:
        save = str(self.work / "items.save")
        return [*KVCACHE, "serve", "--listen", f"127.0.0.1:{self.port}",
                "--memory", str(cache_mib), "--save-file", save]  # fmt: skip

    def start(self, cache_mib: int, port: int) -> None:
        self.port = port
        self.cache_mib = cache_mib
        (self.work / "items.save").unlink(missing_ok=True)
        self.proc = self._spawn(self._argv(cache_mib), "kvcache.log")
        self._wait_serving(self.proc, "kvcache.log")

    def upgrade(self) -> None:
        self.proc.terminate()
        self.proc.wait(300)
        self.proc = self._spawn(self._argv(self.cache_mib), "kvcache.log")

    def stop(self) -> None:
        super().stop()
        (self.work / "items.save").unlink(missing_ok=True)


class KvcacheHandoff(KvcacheSaveFile):
    name = "listener hand-off, state in a file"
    key = "handoff"

    def upgrade(self) -> None:
        # SIGUSR2: the old process stops reading, saves, starts its successor with the
        # listener as fd 3 and exits; the successor loads the file and writes the ready file.
        # (The old one removes the ready file first: the successor's is the one waited for.)
        ready = self.work / "ready"
        handoff = subprocess.run(
            [*KVCACHE, "handoff", "--pid", str(self.proc.pid), "--ready-file", str(ready),
             "--timeout", "120"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if handoff.returncode != 0:
            raise RuntimeError(f"kvcache handoff: {handoff.stderr.strip()}")
        self.proc.wait(60)

    def _argv(self, cache_mib: int) -> list[str]:
        return [*super()._argv(cache_mib), "--ready-file", str(self.work / "ready")]

    def stop(self) -> None:
        # The successor is the old process's child, not ours: found by what it answers.
        successor = server_pid(self.port)
        super().stop()
        if successor is not None:
            with contextlib.suppress(ProcessLookupError):
                pidfd = os.pidfd_open(successor)
                os.kill(successor, signal.SIGTERM)
                select.select([pidfd], [], [], 60)
                os.close(pidfd)


class KvcacheLiveupdate(Way):
    name = "kvcache with liveupdate"
    key = "liveupdate"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.device = str(work / "device")
        self.luod = self._spawn(
            # A 4 GiB arena is more than the memfd bytes luod lets one uid preserve by default.
            [sys.executable, "-m", "liveupdate.server.luod", "--socket", self.device,
             "--max-memfd-bytes-per-uid", "0"],
            "luod.log",
        )  # fmt: skip
        wait_until(lambda: b"serving" in (work / "luod.log").read_bytes(), "luod serving")
        self.session = ""

    def start(self, cache_mib: int, port: int) -> None:
        self.port = port
        self.session = f"kvcache-{cache_mib}"
        self.run = self._spawn(
            [*LUOCTL, "--socket", self.device, "run", "--session", self.session, "--",
             *KVCACHE, "serve", "--listen", f"127.0.0.1:{port}", "--memory", str(cache_mib)],
            "run.log",
            start_new_session=True,
        )  # fmt: skip
        self._wait_serving(self.run, "run.log")

    def upgrade(self) -> None:
        subprocess.run(
            [*KVCACHE, "upgrade", self.session, "--socket", self.device],
            capture_output=True,
            timeout=600,
            check=True,
        )

    def stop(self) -> None:
        # The supervisor first (it stops the service), luod last.
        if self.run.poll() is None:
            self.run.terminate()
            try:
                self.run.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.run.pid, signal.SIGKILL)
                self.run.wait()
        self.procs.remove(self.run)

    def close(self) -> None:
        super().stop()


WAYS: list[type[Way]] = [MemcachedWarmRestart, KvcacheSaveFile, KvcacheHandoff, KvcacheLiveupdate]


@dataclass
class Outcome:
    way: str
    cache_mib: int
    items: int
    value_kib: float
    gap: float
    failed: int
    refused: int
    dropped: int
    lost: int
    note: str


def measure(way: Way, cache_mib: int) -> Outcome:
    items = Items.for_cache(cache_mib)
    way.start(cache_mib, free_port())
    try:
        old_pid = server_pid(way.port)
        items.fill(way.port)
        conn = Conn(way.port)
        stats = conn.stats()
        conn.close()
        stored = (
            set(range(items.count))
            if int(stats.get("evictions", "0")) == 0
            else items.present(way.port)
        )
        idle = IdleClient(way.port)
        active = ActiveClient(way.port)
        active.start()
        time.sleep(CALM)
        way.upgrade()
        wait_until(
            lambda: server_pid(way.port) not in (None, old_pid), "the new server", timeout=600
        )
        done = len(active.answers)
        wait_until(lambda: len(active.answers) > done + 10, "answers after the upgrade", timeout=60)
        time.sleep(CALM)
        active.stop.set()
        active.join(60)
        dropped = active.dropped + idle.dropped()
        lost = len(stored - items.present(way.port))
    finally:
        way.stop()
    note = way.note
    if isinstance(way, MemcachedWarmRestart):
        note = ", ".join(filter(None, [note, f"{way.waited * 1000:.0f} ms waiting for the second"]))
    return Outcome(
        way.name,
        cache_mib,
        len(stored),
        round(items.size / 1024, 1),
        active.longest_gap(),
        active.failed,
        active.refused,
        dropped,
        lost,
        note,
    )


def memcslap(port: int, test: str, per_thread: int, threads: int = 2) -> float:
    """Requests per second ``memcslap`` makes of ``test`` against the server on ``port``."""
    out = subprocess.run(
        ["memcslap", "-s", f"127.0.0.1:{port}", "-t", test, "-c", str(threads),
         "-e", str(per_thread)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    took = re.search(r"Time to \w+\s+\d+ keys by\s+\d+ threads:\s+([\d.]+) seconds", out)
    if took is None or "Fatal error" in out:
        raise RuntimeError(f"memcslap {test}: {out}")
    return per_thread * threads / max(float(took.group(1)), 1e-9)


def unmap_time(cache_mib: int) -> float:
    """Seconds to unmap a memfd of ``cache_mib`` whose every page was written.

    What a process holding a cache of that size in a shared mapping pays to let go of it
    (the kernel drops one page-table entry per 4 KiB page), whether it unmaps or exits: the
    cost that grows with the cache if it falls inside the blackout.
    """
    fd = os.memfd_create("bench-unmap", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, cache_mib * MIB)
        mm = mmap.mmap(fd, cache_mib * MIB)
        block = b"\x01" * (min(cache_mib, 64) * MIB)
        for at in range(0, cache_mib * MIB, len(block)):
            mm[at : at + len(block)] = block
        start = time.monotonic()
        mm.close()
        return time.monotonic() - start
    finally:
        os.close(fd)


def unavailable(way: type[Way]) -> str:
    """Why ``way`` cannot run on this installation ('' when it can)."""
    if way is MemcachedWarmRestart:
        return "" if shutil.which("memcached") else "memcached is not installed"
    probe = subprocess.run(
        [*KVCACHE, "handoff" if way is KvcacheHandoff else "serve", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return f"`{' '.join(probe.args[2:4])}` is not there yet"
    return ""


def throughput(work: Path, per_thread: int) -> list[resultfile.Row]:
    """memcslap's set and get rates against memcached and against kvcache under luoctl run."""
    rows: list[resultfile.Row] = []
    port = free_port()
    memcached = subprocess.Popen(
        ["memcached", "-m", "64", "-l", "127.0.0.1", "-p", str(port), "-U", "0",
         *(["-u", "root"] if os.geteuid() == 0 else [])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: server_pid(port) is not None, "memcached serving")
        rates = {t: memcslap(port, t, per_thread) for t in ("set", "get")}
    finally:
        memcached.terminate()
        memcached.wait()
    rows.append(
        ["memcached 1.6.18 (4 threads)", round(rates["set"]), round(rates["get"]), 1.0, 1.0]
    )
    if unavailable(KvcacheLiveupdate):
        return rows
    kv = KvcacheLiveupdate(work)
    try:
        kv.start(64, free_port())
        try:
            mine = {t: memcslap(kv.port, t, per_thread) for t in ("set", "get")}
        finally:
            kv.stop()
    finally:
        kv.close()
    rows.append(
        [
            "kvcache under luoctl run",
            round(mine["set"]),
            round(mine["get"]),
            round(mine["set"] / rates["set"], 3),
            round(mine["get"] / rates["get"], 3),
        ]
    )
    return rows


def plot(outcomes: list[Outcome], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in dict.fromkeys(o.way for o in outcomes):
        mine = [o for o in outcomes if o.way == name]
        ax.plot([o.cache_mib for o in mine], [o.gap * 1000 for o in mine], marker="o", label=name)
    ax.axhline(10, color="tab:red", lw=0.6, ls="--", label="goal for kvcache: 10 ms")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cache size, MiB")
    ax.set_ylabel("longest gap between two answers, ms")
    ax.set_title("Upgrade blackout seen by a client sending requests back to back", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEE_BELOW = "see *Where kvcache's blackout goes*, below"


def goals(outcomes: list[Outcome]) -> list[dict[str, object]]:
    mine = [o for o in outcomes if o.way == KvcacheLiveupdate.name]
    if not mine:
        return [resultfile.goal("kvcache with liveupdate measured", "not measured", False,
                                "kvcache is not there yet")]  # fmt: skip
    small, large = mine[0], mine[-1]
    out = []
    for what, attr in (("failed requests", "failed"), ("dropped connections", "dropped"),
                       ("items lost", "lost")):  # fmt: skip
        total = sum(getattr(o, attr) for o in mine)
        out.append(resultfile.goal(f"kvcache: zero {what}, every size", str(total), total == 0))
    worst = max(o.gap for o in mine)
    out.append(resultfile.goal("kvcache: blackout < 10 ms, every size", f"{worst * 1000:.1f} ms",
                               worst < 0.010, "" if worst < 0.010 else SEE_BELOW))  # fmt: skip
    ratio = large.gap / small.gap if small.gap else float("inf")
    out.append(resultfile.goal(
        f"kvcache: blackout at {large.cache_mib} MiB within 2x of {small.cache_mib} MiB's",
        f"{ratio:.2f}x", ratio <= 2.0, "" if ratio <= 2.0 else SEE_BELOW))  # fmt: skip
    theirs = [
        o for o in outcomes if o.way == MemcachedWarmRestart.name and o.cache_mib == large.cache_mib
    ]
    if theirs:
        times = theirs[0].gap / large.gap if large.gap else float("inf")
        met = times >= 100
        out.append(resultfile.goal(
            f"kvcache: blackout at {large.cache_mib} MiB >= 100x shorter than memcached's warm "
            "restart", f"{times:.0f}x", met, "" if met else SEE_BELOW))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 4 MiB, a smoke run")
    parser.add_argument("--sizes", help="cache sizes in MiB, comma-separated")
    parser.add_argument(
        "--ways", help="only these ways, comma-separated: " + ",".join(w.key for w in WAYS)
    )
    parser.add_argument("--out", help="result file (default bench/results/upgrade.json)")
    parser.add_argument("--plots", help="directory for the plot")
    args = parser.parse_args()
    sizes = [1, 4] if args.quick else [1, 64, 1024, 4096]
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",")]
    per_thread = 2000 if args.quick else 50000
    results_dir, stem, plots_dir = resultfile.destination(
        args.quick, args.out, args.plots, "upgrade"
    )
    machine = resultfile.machine()
    work = Path(tempfile.mkdtemp(prefix="bench-upgrade-"))
    outcomes: list[Outcome] = []
    missing: dict[str, str] = {}
    ways: list[Way] = []
    try:
        chosen = args.ways.split(",") if args.ways else [w.key for w in WAYS]
        for kind in WAYS:
            if kind.key not in chosen:
                continue
            if why := unavailable(kind):
                missing[kind.name] = why
            else:
                ways.append(kind(work))
        for cache_mib in sizes:
            for way in ways:
                print(f"{way.name} at {cache_mib} MiB ...", flush=True)
                outcomes.append(measure(way, cache_mib))
                o = outcomes[-1]
                print(
                    f"  {o.items} items, longest gap {o.gap * 1000:.1f} ms, failed {o.failed}, "
                    f"refused {o.refused}, dropped {o.dropped}, lost {o.lost} {o.note}"
                )
        print("throughput ...", flush=True)
        rates = throughput(work, per_thread)
        unmaps: list[resultfile.Row] = [
            [cache_mib, round(unmap_time(cache_mib) * 1000, 2)] for cache_mib in sizes
        ]
    finally:
        for way in ways:
            if isinstance(way, KvcacheLiveupdate):
                way.close()
        shutil.rmtree(work, ignore_errors=True)
    rows: list[resultfile.Row] = [
        [o.way, o.cache_mib, o.items, o.value_kib, round(o.gap * 1000, 2), o.failed, o.refused,
         o.dropped, o.lost, o.note or "-"]
        for o in outcomes
    ]  # fmt: skip
    rows += [[name, "-", "-", "-", "-", "-", "-", "-", "-", f"not measured: {why}"]
             for name, why in missing.items()]  # fmt: skip
    for row in rates:
        print(row)
    png = plots_dir / "upgrade.png"
    plot(outcomes, png)
    path = resultfile.write(
        results_dir,
        stem,
        "A cache upgraded under load: kvcache against memcached",
        machine,
        [
            resultfile.table(
                f"One upgrade per way and cache size, items filling {FILL:.0%} of the cache; "
                f"a client sending `get` back to back (retrying a refused connection every "
                f"{RETRY * 1000:.0f} ms) and {IDLE_CONNECTIONS} idle connections",
                [
                    "way",
                    "cache MiB",
                    "items",
                    "value KiB",
                    "longest gap ms",
                    "failed requests",
                    "refused connects",
                    f"dropped connections (of {IDLE_CONNECTIONS + 1})",
                    "items lost",
                    "note",
                ],
                rows,
            ),
            resultfile.table(
                "What letting go of a cache costs: unmapping a shared mapping of that size, "
                "every page written (munmap, or a process's exit, drops each page's entry)",
                ["cache MiB", "munmap ms"],
                unmaps,
            ),
            resultfile.table(
                f"Throughput, `memcslap` with 2 threads of {per_thread} requests each "
                "(set, then get), requests per second",
                ["server", "set/s", "get/s", "set vs memcached", "get vs memcached"],
                rates,
            ),
        ],
        goals(outcomes),
        [png],
    )
    print(f"results: {resultfile.shown_path(path)}")


if __name__ == "__main__":
    main()
