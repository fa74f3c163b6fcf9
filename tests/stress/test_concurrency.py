"""Stress: many processes opening the device at once (luod only).

Twenty processes race for the single-opener device with
``open_device(timeout=30)`` (EBUSY retried), each creating 20 sessions with a
memfd preserved in each. While they hold them, a fresh opener checks that
every one of the 400 names exists (CREATE_SESSION answers EEXIST): none was
lost to the contention. When the processes exit, every session is released.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _stress_util import assert_fd_count_back, assert_still_serves

import liveupdate
from luodtest import Luod

WORKER = Path(__file__).resolve().parent / "_worker.py"
PROCESSES = 20
SESSIONS = 20


def _spawn(daemon: Luod, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), daemon.socket, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        close_fds=True,
    )


@pytest.mark.luod_only
def test_twenty_processes_open_concurrently_and_lose_nothing(luod: Luod) -> None:
    baseline = luod.fd_count()
    workers = [_spawn(luod, "hold", str(w), str(SESSIONS)) for w in range(PROCESSES)]
    try:
        for w in workers:
            assert w.stdout is not None and w.stdout.readline().strip() == "ready"
        for w in workers:  # all at once
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        reported: list[str] = []
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline()
            assert line, f"worker died: rc={w.wait()}"
            reported.extend(line.split())
        expected = {f"w{w}-{i}" for w in range(PROCESSES) for i in range(SESSIONS)}
        assert sorted(reported) == sorted(expected)

        # Every name exists: creating it again is EEXIST.
        missing = []
        with luod.open(timeout=30) as dev:
            for name in sorted(expected):
                try:
                    dev.create_session(name).close()
                    missing.append(name)
                except liveupdate.AlreadyExistsError:
                    pass
        assert missing == [], f"{len(missing)} sessions were lost"
        assert luod.fd_count() >= baseline + PROCESSES * SESSIONS * 2  # session + memfd
    finally:
        for w in workers:
            if w.stdin is not None and not w.stdin.closed:
                try:
                    w.stdin.write("exit\n")
                    w.stdin.close()
                except OSError:
                    pass
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
            if w.stdout is not None:
                w.stdout.close()
    assert [w.returncode for w in workers] == [0] * PROCESSES
    # Everything they held is released, and the names are free again.
    assert_fd_count_back(luod, baseline)
    with luod.open() as dev:
        for name in ("w0-0", f"w{PROCESSES - 1}-{SESSIONS - 1}"):
            dev.create_session(name).close()
    assert_still_serves(luod, "after-concurrency")
