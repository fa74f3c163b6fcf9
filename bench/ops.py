#!/usr/bin/env python3
"""Benchmark: ioctls through luod, against the transport floor.

Latency of single ioctls made with the client library (``liveupdate``)
through a running luod, next to the *floor*: a bare Python
``SOCK_SEQPACKET`` round trip passing one fd (a memfd, as ``SCM_RIGHTS``)
to another Python process, which closes it and echoes the message. The
floor is what any Python daemon on this socket pays; the ratio is what
luod's own work costs (framing, dispatch checks, the core, the client).

The ioctls, all on one generation that came up through a reboot:

* ``GET_NAME`` on an outgoing session (no fd);
* ``PRESERVE_FD`` of one memfd (each one unpreserved again, untimed);
* ``RETRIEVE_FD`` from an incoming session (each fd returned is closed,
  untimed);
* ``CREATE_SESSION`` then closing the new session's fd;
* ``GET_STATE`` on the device.

Calls run in interleaved rounds (every ioctl and the floor take turns), so
that a burst of load from elsewhere on the machine hits them all alike, and
every process runs on the same single CPU, so that the floor and luod get
the same placement (see ``main``).
Goals: p50 within 2x of the floor's p50, p99 within 3x of the floor's p99.

    .venv/bin/python bench/ops.py            # default sizes (about 20 seconds)
    .venv/bin/python bench/ops.py --quick    # tiny sizes, a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import resultfile
from luodproc import start_luod

import liveupdate
from liveupdate import uapi

#: The floor's other process: receive a request and its fd, close the fd,
#: echo the request back. The same system calls as luod's fast path, and
#: nothing else.
FLOOR_SERVER = """
import os, socket, sys
sock = socket.socket(fileno=int(sys.argv[1]))
space = socket.CMSG_SPACE(4)
flags = socket.MSG_CMSG_CLOEXEC
while True:
    data, anc, _flags, _addr = sock.recvmsg(4096, space, flags)
    if not data:
        break
    for _level, _kind, payload in anc:
        os.close(int.from_bytes(payload[:4], "little"))
    sock.send(data)
"""

#: A request as big as PRESERVE_FD's (8-byte header, 16-byte struct).
FLOOR_REQUEST = bytes(24)

#: Why a goal can be missed, by ioctl: what that call does beyond the floor.
WHY_MISSED = {
    "floor": "",
    "GET_NAME": "the client's struct and framing plus luod's select, dispatch checks and "
    "handler: the whole path is Python, and the floor's bare echo is too",
    "PRESERVE_FD": "beyond the path every call takes, luod checks the file (fstat, its handler, "
    "whether another session holds it, the quotas) before keeping it, and after the reply "
    "sends the keeper its copy and the session's delta record (see the keeper-off row)",
    "RETRIEVE_FD": "the fd travels back: luod dups it and sends it, and the client reserves a "
    "slot for it first (a dup and a close)",
    "CREATE_SESSION+close": "two calls' worth of kernel work: luod makes a socketpair, passes "
    "one end back, and serves the close of the other (each change followed by a delta "
    "to the keeper); the floor passes one fd one way",
    "GET_STATE": "the biggest struct (a 256-byte error text) built and copied both ways",
}


#: The comparison row: PRESERVE_FD through a luod started with ``--keeper off``
#: (no copies outside luod), in the same interleaved rounds. The goals are
#: those of the default configuration (the keeper on): this row has none.
KEEPER_OFF = "PRESERVE_FD, --keeper off"


def percentile(sorted_ns: list[int], q: float) -> float:
    """The nearest-rank ``q`` quantile of sorted samples, in microseconds."""
    index = min(len(sorted_ns) - 1, max(0, round(q * len(sorted_ns)) - 1))
    return sorted_ns[index] / 1000


def start_ops_luod(state: Path, keeper: bool = True) -> subprocess.Popen[bytes]:
    """luod as a user starts it (``keeper``: its default copies, a keeper
    process), or with ``--keeper off``."""
    return start_luod(state) if keeper else start_luod(state, "--keeper", "off")


def reboot(device: str, held: liveupdate.Session) -> None:
    """Reboot luod with ``held`` open; returns once the next generation answers."""
    with liveupdate.open_device(device, timeout=10) as dev:
        old = dev.get_state().generation
        dev.set_event(uapi.LuodEvent.REBOOT)
    held.close()  # the reboot closed its connection; the session went over
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with liveupdate.open_device(device, timeout=10) as dev:
                if dev.get_state().generation > old:
                    return
        except (liveupdate.StaleGenerationError, liveupdate.NotFoundError):
            time.sleep(0.01)
    raise RuntimeError("luod did not come back from the reboot")


class Floor:
    """The floor's two ends: this process and an echoing Python child."""

    def __init__(self) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.child = subprocess.Popen(
            [sys.executable, "-c", FLOOR_SERVER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self.memfd = os.memfd_create("floor")
        self.anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, self.memfd.to_bytes(4, sys.byteorder))]

    def call(self) -> None:
        self.sock.sendmsg([FLOOR_REQUEST], self.anc)
        self.sock.recv(4096)

    def close(self) -> None:
        self.sock.close()
        self.child.wait()
        os.close(self.memfd)


class Luod:
    """A luod that came up through a reboot, with what each measured call needs."""

    def __init__(self, keeper: bool = True) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="luod-ops-"))
        self.proc = start_ops_luod(self.state, keeper)
        device = str(self.state / "device")
        memfd = os.memfd_create("ops")
        os.write(memfd, b"x" * 64)
        with liveupdate.open_device(device, timeout=10) as dev:
            carried = dev.create_session("carried")
        carried.preserve(memfd, 0)
        os.close(memfd)
        reboot(device, carried)
        self.dev = liveupdate.open_device(device, timeout=10)
        self.incoming = self.dev.retrieve_session("carried")
        self.outgoing = self.dev.create_session("ops")
        self.memfd = os.memfd_create("ops")
        os.write(self.memfd, b"x" * 64)
        self.created = 0

    def preserve(self) -> None:
        self.outgoing.preserve(self.memfd, 1)

    def after_preserve(self) -> None:
        self.outgoing.unpreserve(1)

    def retrieve(self) -> None:
        self.fd = self.incoming.retrieve(0)

    def after_retrieve(self) -> None:
        os.close(self.fd)

    def create_and_close(self) -> None:
        self.created += 1
        self.dev.create_session(f"ops-{self.created}").close()

    @property
    def serving_pid(self) -> int:
        """The luod process serving now: the one that made our session's
        socketpair (a reboot may hand over to another process)."""
        sock = socket.socket(fileno=self.outgoing.fileno())
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        finally:
            sock.detach()
        return int.from_bytes(creds[:4], sys.byteorder)

    def close(self) -> None:
        serving = self.serving_pid
        for obj in (self.outgoing, self.incoming, self.dev):
            obj.close()
        os.close(self.memfd)
        self.proc.terminate()
        self.proc.wait()
        if serving != self.proc.pid:
            try:
                os.kill(serving, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.state, ignore_errors=True)


def measure(
    call: Callable[[], object], after: Callable[[], object] | None, n: int, out: list[int]
) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        call()
        out.append(clock() - start)
        if after is not None:
            after()


def run(rounds: int, batch: int) -> dict[str, list[int]]:
    floor = Floor()
    luod = Luod()
    bare = Luod(keeper=False)
    cases: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
        "floor": (floor.call, None),
        "GET_NAME": (luod.outgoing.get_name, None),
        "PRESERVE_FD": (luod.preserve, luod.after_preserve),
        "RETRIEVE_FD": (luod.retrieve, luod.after_retrieve),
        "CREATE_SESSION+close": (luod.create_and_close, None),
        "GET_STATE": (luod.dev.get_state, None),
        KEEPER_OFF: (bare.preserve, bare.after_preserve),
    }
    samples: dict[str, list[int]] = {name: [] for name in cases}
    try:
        for call, after in cases.values():  # warm up both sides
            measure(call, after, min(batch, 100), [])
        for _ in range(rounds):
            for name, (call, after) in cases.items():
                measure(call, after, batch, samples[name])
    finally:
        luod.close()
        bare.close()
        floor.close()
    return samples


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["ioctl"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key, limit, label in (
        (axes[0], "p50x", 2.0, "p50 / floor p50"),
        (axes[1], "p99x", 3.0, "p99 / floor p99"),
    ):
        values = [r[key] for r in rows]
        colors = ["tab:green" if v <= limit else "tab:red" for v in values]
        ax.barh(names, values, color=colors)
        ax.axvline(limit, color="black", linestyle="--", linewidth=1)
        ax.text(limit, -0.7, f" goal {limit:g}x", va="center", fontsize=8)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max([*values, limit]) * 1.25)
    axes[1].set_yticklabels([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--batch", type=int, default=1000, help="calls per ioctl per round")
    parser.add_argument("--name", default="ops", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--title", default="ioctls through luod against the transport floor")
    parser.add_argument("--out", help="directory of the results file (default: bench/results)")
    parser.add_argument("--plots", help="directory of the plot (default: docs/_static/bench)")
    args = parser.parse_args()
    rounds, batch = (2, 30) if args.quick else (args.rounds, args.batch)
    results_dir, plots_dir = resultfile.output_dirs(args.quick, args.out, args.plots)
    machine = resultfile.machine()

    # Every process of the run (this one, the floor's echo, luod) on one CPU:
    # a wake-up across CPUs costs up to 50 us on this VM and the scheduler
    # would split one pair and not the other, so the ratio would measure
    # placement instead of work. Children inherit the mask.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    samples = run(rounds, batch)
    floor_sorted = sorted(samples["floor"])
    floor50, floor99 = percentile(floor_sorted, 0.5), percentile(floor_sorted, 0.99)
    rows: list[dict[str, Any]] = []
    for name, values in samples.items():
        ordered = sorted(values)
        p50, p99 = percentile(ordered, 0.5), percentile(ordered, 0.99)
        rows.append(
            {"ioctl": name, "calls": len(values), "p50": p50, "p99": p99,
             "p50x": p50 / floor50, "p99x": p99 / floor99}
        )  # fmt: skip

    print(f"{'ioctl':<22} {'calls':>6} {'p50 us':>8} {'p99 us':>8} {'p50/floor':>10} "
          f"{'p99/floor':>10}  goals (p50<=2x, p99<=3x)")  # fmt: skip
    table_rows: list[resultfile.Row] = []
    off_rows: list[resultfile.Row] = []
    goals = []
    for r in rows:
        is_floor = r["ioctl"] == "floor"
        if r["ioctl"] == KEEPER_OFF:
            print(f"{r['ioctl']:<22} {r['calls']:>6} {r['p50']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['p50x']:>10.2f} {r['p99x']:>10.2f}  (comparison, no goal)")  # fmt: skip
            for ioctl in ("PRESERVE_FD", KEEPER_OFF):
                o = next(x for x in rows if x["ioctl"] == ioctl)
                off_rows.append(
                    [o["ioctl"] if ioctl == KEEPER_OFF else "PRESERVE_FD, keeper on (default)",
                     o["calls"], round(o["p50"], 1), round(o["p99"], 1),
                     round(o["p50x"], 2), round(o["p99x"], 2)]
                )  # fmt: skip
            continue
        met50, met99 = r["p50x"] <= 2.0, r["p99x"] <= 3.0
        verdict = "" if is_floor else ", ".join("met" if m else "MISSED" for m in (met50, met99))
        print(f"{r['ioctl']:<22} {r['calls']:>6} {r['p50']:>8.1f} {r['p99']:>8.1f} "
              f"{r['p50x']:>10.2f} {r['p99x']:>10.2f}  {verdict}")  # fmt: skip
        table_rows.append(
            [r["ioctl"], r["calls"], round(r["p50"], 1), round(r["p99"], 1),
             round(r["p50x"], 2), round(r["p99x"], 2)]
        )  # fmt: skip
        if is_floor:
            continue
        for text, ratio, met in (
            (f"{r['ioctl']} p50 within 2x of the floor's p50", r["p50x"], met50),
            (f"{r['ioctl']} p99 within 3x of the floor's p99", r["p99x"], met99),
        ):
            goals.append(
                resultfile.goal(text, f"{ratio:.2f}x", met, "" if met else WHY_MISSED[r["ioctl"]])
            )

    plot_path = plots_dir / f"{args.name}.png"
    plot([r for r in rows if r["ioctl"] != "floor"], plot_path, args.title)
    path = resultfile.write(
        results_dir,
        args.name,
        args.title,
        machine,
        [
            resultfile.table(
                f"Latency per call in microseconds, luod in its default configuration (the "
                f"keeper on), {rounds} interleaved rounds of {batch} calls each; ratios "
                "against the floor measured in the same run",
                ["ioctl", "calls", "p50 µs", "p99 µs", "p50 / floor", "p99 / floor"],
                table_rows,
            ),
            resultfile.table(
                "What the keeper costs: PRESERVE_FD through the default luod (above) and "
                "through a second luod started with --keeper off, in the same interleaved "
                "rounds (no goal: the goals are the default configuration's)",
                ["config", "calls", "p50 µs", "p99 µs", "p50 / floor", "p99 / floor"],
                off_rows,
            ),
        ],
        goals,
        [plot_path],
    )
    print(f"results: {resultfile.shown_path(path)}, plot: {resultfile.shown_path(plot_path)}")


if __name__ == "__main__":
    main()
