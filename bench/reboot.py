#!/usr/bin/env python3
"""Benchmark: how long a live update of luod takes, against the floor.

For 1, 100 and 2000 sessions (one memfd each) and for 1, 1000 and 10000
files (memfds in one session) this measures the wall time of a reboot of
luod, from the REBOOT ioctl to the first answer of the next generation, and
next to it the *floor*: a bare re-exec of the same Python interpreter
inheriting the same number of fds, measured the same way in the same run.
The ratio is what luod's own work costs (freeze, image, restore, imports).

Two reboot times are shown: ``prepared`` (PREPARE ran before, so the reboot
skips the pre-flight) and ``cold`` (REBOOT straight from NORMAL: the
pre-flight child runs inside the reboot).

    .venv/bin/python bench/reboot.py            # full run (about a minute)
    .venv/bin/python bench/reboot.py --quick    # tiny sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import liveupdate
from liveupdate import uapi

FLOOR_CHILD = "import os, sys; os.write(int(sys.argv[1]), b'r')"


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_luod(state: Path, max_files: int) -> subprocess.Popen[bytes]:
    log = open(state / "luod.log", "wb")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        [sys.executable, "-m", "liveupdate.server.luod", "--socket", str(state / "device"),
         "--max-files", str(max_files), "--max-sessions", "4096"],
        stdout=log,
        stderr=log,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while b"serving" not in (state / "luod.log").read_bytes():
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((state / "luod.log").read_text())
        time.sleep(0.01)
    return proc


def populate(device: str, sessions: int, files_per_session: int) -> list[liveupdate.Session]:
    held = []
    with liveupdate.open_device(device, timeout=10) as dev:
        for i in range(sessions):
            held.append(dev.create_session(f"bench-{i}"))
    for session in held:
        for token in range(files_per_session):
            fd = os.memfd_create("bench")
            os.write(fd, b"x" * 64)
            session.preserve(fd, token)
            os.close(fd)
    return held


def reboot_once(device: str, prepared: bool) -> float:
    """Seconds from REBOOT to the next generation's first answer."""
    with liveupdate.open_device(device, timeout=10) as dev:
        if prepared:
            dev.set_event(uapi.LuodEvent.PREPARE)
        old = dev.get_state().generation
        start = time.perf_counter()
        dev.set_event(uapi.LuodEvent.REBOOT)
    while True:
        try:
            with liveupdate.open_device(device, timeout=10) as dev:
                if dev.get_state().generation > old:
                    return time.perf_counter() - start
        except (liveupdate.StaleGenerationError, liveupdate.NotFoundError):
            pass


def finish_incoming(device: str) -> None:
    with liveupdate.open_device(device, timeout=10) as dev:
        dev.set_event(uapi.LuodEvent.FINISH)


def floor_once(nfds: int) -> float:
    """A bare re-exec of this Python inheriting ``nfds`` fds, trigger to ready."""
    trigger_r, trigger_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the holder: opens the fds, waits, re-executes
        try:
            os.close(trigger_w)
            os.close(ready_r)
            for _ in range(nfds):
                os.set_inheritable(os.memfd_create("floor"), True)
            os.set_inheritable(ready_w, True)
            os.write(ready_w, b"h")
            os.read(trigger_r, 1)
            os.execv(sys.executable, [sys.executable, "-c", FLOOR_CHILD, str(ready_w)])
        finally:
            os._exit(1)
    os.close(trigger_r)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"h"  # the holder has its fds
    start = time.perf_counter()
    os.write(trigger_w, b"go")
    assert os.read(ready_r, 1) == b"r"
    elapsed = time.perf_counter() - start
    os.waitpid(pid, 0)
    for fd in (trigger_w, ready_r):
        os.close(fd)
    return elapsed


def measure(label: str, sessions: int, files: int, repeat: int) -> dict[str, float | str | int]:
    state = Path(tempfile.mkdtemp(prefix="luod-bench-"))
    proc = start_luod(state, max(files, 1024))
    try:
        held = populate(str(state / "device"), sessions, files)
        nfds = sessions * files
        prepared, cold = [], []
        for _ in range(repeat):
            for timings, was_prepared in ((prepared, True), (cold, False)):
                timings.append(reboot_once(str(state / "device"), prepared=was_prepared))
                finish_incoming(str(state / "device"))
                # The reboot closed the old session fds: recreate the sessions.
                for session in held:
                    session.close()
                held = populate(str(state / "device"), sessions, files)
        floor = [floor_once(nfds) for _ in range(repeat)]
        for session in held:
            session.close()
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(state, ignore_errors=True)
    p, c, f = (statistics.median(x) for x in (prepared, cold, floor))
    return {"case": label, "fds": nfds, "prepared": p, "cold": c, "floor": f}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    raise_nofile()
    if args.quick:
        cases = [("1 session", 1, 1), ("3 sessions", 3, 1), ("10 files", 1, 10)]
        repeat = 1
    else:
        cases = [
            ("1 session", 1, 1),
            ("100 sessions", 100, 1),
            ("2000 sessions", 2000, 1),
            ("1 file", 1, 1),
            ("1000 files", 1, 1000),
            ("10000 files", 1, 10000),
        ]
        repeat = args.repeat
    print(f"{'case':<15} {'fds':>6} {'prepared s':>11} {'cold s':>8} {'floor s':>8} "
          f"{'prepared/floor':>15} {'cold/floor':>11}")  # fmt: skip
    for label, sessions, files in cases:
        r = measure(label, sessions, files, repeat)
        print(
            f"{r['case']:<15} {r['fds']:>6} {r['prepared']:>11.3f} {r['cold']:>8.3f} "
            f"{r['floor']:>8.3f} {r['prepared'] / r['floor']:>15.2f} "  # type: ignore[operator]
            f"{r['cold'] / r['floor']:>11.2f}",  # type: ignore[operator]
            flush=True,
        )


if __name__ == "__main__":
    main()
