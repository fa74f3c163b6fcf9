#!/usr/bin/env python3
"""Benchmark: the gap a client of the echo example sees across ``luoctl update``.

The echo example runs under ``luoctl run`` against a private luod. A client
keeps one connection open and sends a line every few milliseconds, waiting
for each echo; ``luoctl update echo`` is run again and again. Printed: the
longest gap between two echoes around each update, their median and max,
for the two ways the supervisor updates:

* **pre-started** (``examples/echo_service.py`` as shipped: it watches
  ``svc.freeze_fd()``): the next version starts and initialises while the
  old one serves; the gap is the freeze and the hand-over;
* **stop, then start** (the same example with the ``freeze_fd`` line taken
  out, as every service that never opted in): the gap includes the old
  version's exit, Python's start-up and the service's initialisation.

    .venv/bin/python bench/echo_update.py            # 10 updates each
    .venv/bin/python bench/echo_update.py --updates 3
    .venv/bin/python bench/echo_update.py --dir /tmp # luod's state on disk

luod's socket, and so its state directory, go to ``--dir`` (default
``/dev/shm``: a tmpfs, as ``/run/liveupdate`` is in a real install).
Results go to ``bench/results/echo_update.json`` (``--quick``: 3 updates,
under ``quick/``), which ``bench/report.py`` renders in
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import resultfile
from waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo_service.py"
PACE = 0.002
OPT_IN = 'sel.register(svc.freeze_fd(), selectors.EVENT_READ, "freeze")'


def echoes(port: int, stop: threading.Event, times: list[float], errors: list[str]) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            for n in itertools.count():
                if stop.is_set():
                    return
                line = f"{n}\n".encode()
                sock.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        raise ConnectionError("connection dropped")
                    got += chunk
                if got != line:
                    raise ValueError(f"echo {got!r} for {line!r}")
                times.append(time.monotonic())
                time.sleep(PACE)
    except Exception as exc:  # reported by the run
        errors.append(repr(exc))


def measure(service: Path, updates: int, where: str | None) -> tuple[list[float], float]:
    """Longest gap around each update, and the longest gap without one."""
    work = Path(tempfile.mkdtemp(prefix="echo-update-", dir=where))
    device = str(work / "device")
    luoctl = [sys.executable, "-m", "liveupdate.cli.luoctl", "--socket", device]
    with open(work / "luod.log", "wb") as log:
        luod = subprocess.Popen(
            [sys.executable, "-m", "liveupdate.server.luod", "--socket", device],
            stdout=log, stderr=log,
        )  # fmt: skip
    wait_until(lambda: b"serving" in (work / "luod.log").read_bytes(), "luod serving")
    port_file = work / "port"
    with open(work / "run.log", "wb") as log:
        run = subprocess.Popen(
            [*luoctl, "run", "--session", "echo", "--", sys.executable, str(service), "0"],
            stdout=log, stderr=log, env={**os.environ, "ECHO_PORT_FILE": str(port_file)},
            start_new_session=True,
        )  # fmt: skip
    stop, times, errors = threading.Event(), [], []  # type: ignore[var-annotated]
    try:
        wait_until(port_file.exists, "the echo service's port")
        client = threading.Thread(
            target=echoes, args=(int(port_file.read_text()), stop, times, errors), daemon=True
        )
        client.start()
        wait_until(lambda: len(times) > 50, "first echoes")
        calm_start = time.monotonic()
        time.sleep(0.5)
        calm = [b - a for a, b in itertools.pairwise(t for t in times if t >= calm_start)]
        gaps = []
        for _ in range(updates):
            start = time.monotonic()
            subprocess.run([*luoctl, "update", "echo"], check=True, capture_output=True)
            time.sleep(0.3)  # the new version serves: its first echoes are in
            inside = [t for t in times if t >= start - 0.05]
            gaps.append(max(b - a for a, b in itertools.pairwise(inside)))
    finally:
        stop.set()
        run.terminate()
        run.wait(30)
        luod.terminate()
        luod.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    if errors:
        raise RuntimeError(f"the client failed: {errors}")
    return gaps, max(calm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 updates each, a smoke run")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    parser.add_argument("--dir", default=shm, help="where luod's socket and state go")
    parser.add_argument("--out", help="result file (default bench/results/echo_update.json)")
    args = parser.parse_args()
    updates = 3 if args.quick else args.updates
    results_dir, name, _plots = resultfile.destination(args.quick, args.out, None, "echo_update")
    machine = resultfile.machine()
    work = Path(tempfile.mkdtemp(prefix="echo-legacy-"))
    legacy = work / "echo_service.py"
    text = ECHO.read_text()
    assert OPT_IN in text, "the echo example no longer opts in the way this bench expects"
    legacy.write_text(text.replace(OPT_IN, "pass"))
    print(f"{'way':<18} {'updates':>7} {'median gap ms':>13} {'max gap ms':>10} "
          f"{'max gap without update ms':>26}")  # fmt: skip
    rows: list[resultfile.Row] = []
    try:
        for way, service in (("pre-started", ECHO), ("stop, then start", legacy)):
            gaps, calm = measure(service, updates, args.dir)
            median, longest = statistics.median(gaps) * 1000, max(gaps) * 1000
            print(f"{way:<18} {len(gaps):>7} {median:>13.1f} {longest:>10.1f} "
                  f"{calm * 1000:>26.1f}")  # fmt: skip
            rows.append([way, len(gaps), round(median, 1), round(longest, 1),
                         round(calm * 1000, 1)])  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = resultfile.write(
        results_dir,
        name,
        "The echo example across luoctl update",
        machine,
        [
            resultfile.table(
                f"Longest gap between two echoes around each of {updates} `luoctl update`s "
                f"(luod's state on {args.dir or 'disk'}), and the longest without an update",
                ["way", "updates", "median gap, ms", "max gap, ms", "max gap without, ms"],
                rows,
            )
        ],
        [],
        [],
    )
    print(f"results: {resultfile.shown_path(path)}")


if __name__ == "__main__":
    main()
