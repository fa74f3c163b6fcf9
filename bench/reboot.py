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
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from luodproc import start_luod

import liveupdate
from liveupdate import uapi

FLOOR_CHILD = "import os, sys; os.write(int(sys.argv[1]), b'r')"


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_reboot_luod(state: Path, max_files: int) -> subprocess.Popen[bytes]:
    """luod with room for the largest image: no session or per-uid limit in the way."""
    return start_luod(
        state, "--max-files", str(max_files), "--max-sessions", "4096",
        "--max-files-per-uid", "0", "--max-sessions-per-uid", "0",
        "--max-memfd-bytes-per-uid", "0",
    )  # fmt: skip


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


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def serving_pid(state: Path) -> int:
    """The serving luod: the lock file names it (a reboot moves it to the successor)."""
    return int((state / "luod.lock").read_text().strip())


def measure(label: str, sessions: int, files: int, repeat: int) -> dict[str, float | str | int]:
    state = Path(tempfile.mkdtemp(prefix="luod-bench-"))
    proc = start_reboot_luod(state, max(files, 1024))
    try:
        before = rss_kib(proc.pid)
        held = populate(str(state / "device"), sessions, files)
        time.sleep(0.2)
        rss_delta = rss_kib(proc.pid) - before
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
        try:
            os.kill(serving_pid(state), 15)
        except (OSError, ValueError):
            pass
        proc.terminate()
        proc.wait()
        time.sleep(0.2)
        shutil.rmtree(state, ignore_errors=True)
    p, c, f = (statistics.median(x) for x in (prepared, cold, floor))
    per = rss_delta * 1024 / max(1, nfds if files > 1 else sessions)
    return {"case": label, "sessions": sessions, "fds": nfds, "prepared": p, "cold": c,
            "floor": f, "bytes_per": per}  # fmt: skip


def goals(rows: list[dict[str, float | str | int]]) -> list[dict[str, object]]:
    """Each goal of issue 10, met or not, from the rows of this run."""
    by = {r["case"]: r for r in rows}
    out: list[dict[str, object]] = []

    def ratio(case: str, column: str, limit: float, goal: str) -> None:
        if case not in by:
            return
        r = by[case]
        value = float(r[column]) / float(r["floor"])
        out.append({"goal": goal, "measured": f"{value:.2f}x", "met": value <= limit,
                    "why": "" if value <= limit else WHY.get(column, "")})  # fmt: skip

    ratio("1 session", "prepared", 1, "prepared blackout <= 1x floor, 1 session")
    ratio("2000 sessions", "prepared", 3, "prepared blackout <= 3x floor, 2000 sessions")
    ratio("10000 files", "prepared", 3, "prepared blackout <= 3x floor, 10,000 files")
    ratio("1 session", "cold", 3, "cold blackout <= 3x floor, 1 session")
    for case, limit, goal in (("10000 files", 2048, "memory <= 2 KiB per file"),
                              ("2000 sessions", 4096, "memory <= 4 KiB per session")):  # fmt: skip
        if case in by:
            value = float(by[case]["bytes_per"])
            out.append({"goal": goal, "measured": f"{value:.0f} B", "met": value <= limit,
                        "why": ""})  # fmt: skip
    return out


WHY = {
    "cold": "a cold reboot starts the successor inside the reboot: Python's start and "
    "luod's imports (about 80 ms) are in the blackout; PREPARE takes them out",
    "prepared": "per file, the freeze (three syscalls and a record) in the old process and "
    "the restore (fstat, the handler's check, objects) in the successor, about 4 us each, "
    "one after the other",
}


def write_results(
    rows: list[dict[str, float | str | int]], argv: list[str], out: Path, png: Path
) -> None:
    """bench/results/reboot.json (the shape bench/report.py reads) and its plot."""
    table = {
        "caption": "Blackout (REBOOT ioctl to the first answered open of the next "
        "generation), median, against a bare re-exec with the same fds",
        "columns": [
            "case",
            "fds",
            "prepared s",
            "cold s",
            "floor s",
            "prepared / floor",
            "cold / floor",
            "luod bytes per file or session",
        ],
        "rows": [
            [
                r["case"],
                r["fds"],
                round(float(r["prepared"]), 4),
                round(float(r["cold"]), 4),
                round(float(r["floor"]), 4),
                round(float(r["prepared"]) / float(r["floor"]), 2),
                round(float(r["cold"]) / float(r["floor"]), 2),
                round(float(r["bytes_per"])),
            ]
            for r in rows
        ],
    }
    result = {
        "name": "reboot",
        "title": "Live update of luod",
        "command": " ".join(["bench/reboot.py", *argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {platform.python_version()}",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "tables": [table],
        "goals": goals(rows),
        "plots": [str(png)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    width = 0.27
    for k, (column, label) in enumerate((("prepared", "prepared"), ("cold", "cold"),
                                         ("floor", "floor (bare re-exec)"))):  # fmt: skip
        ax.bar([x + (k - 1) * width for x in xs], [float(r[column]) * 1000 for r in rows],
               width, label=label)  # fmt: skip
    ax.set_xticks(list(xs), [str(r["case"]) for r in rows], rotation=20)
    ax.set_ylabel("blackout, ms")
    ax.set_title("luod reboot blackout")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="result file to write")
    args = parser.parse_args()
    # A smoke run never overwrites the recorded results and plot (bench/report.py
    # reads those); like bench/ops.py, it writes under quick/ instead.
    if args.out is None:
        results = Path("bench/results/quick" if args.quick else "bench/results")
        args.out = results / "reboot.json"
        png = (
            Path("docs/_static/bench/quick" if args.quick else "docs/_static/bench") / "reboot.png"
        )
    else:
        png = args.out.with_suffix(".png")
    raise_nofile()
    if args.quick:
        cases = [("1 session", 1, 1), ("3 sessions", 3, 1), ("10 files", 1, 10)]
        repeat = 1
    else:
        cases = [
            ("1 session", 1, 1),
            ("2000 sessions", 2000, 1),
            ("10000 files", 1, 10000),
        ]
        repeat = args.repeat
    print(f"{'case':<15} {'fds':>6} {'prepared s':>11} {'cold s':>8} {'floor s':>8} "
          f"{'prepared/floor':>15} {'cold/floor':>11}")  # fmt: skip
    rows = []
    for label, sessions, files in cases:
        r = measure(label, sessions, files, repeat)
        rows.append(r)
        print(
            f"{r['case']:<15} {r['fds']:>6} {r['prepared']:>11.3f} {r['cold']:>8.3f} "
            f"{r['floor']:>8.3f} {r['prepared'] / r['floor']:>15.2f} "  # type: ignore[operator]
            f"{r['cold'] / r['floor']:>11.2f}",  # type: ignore[operator]
            flush=True,
        )

    write_results(rows, sys.argv[1:], args.out, png)
    for goal in goals(rows):
        print(f"{'met ' if goal['met'] else 'MISSED'} {goal['goal']}: {goal['measured']}")


if __name__ == "__main__":
    main()
