"""The in-VM half of ``test_kvcache_kexec.py``: kvcache on ``/dev/liveupdate``, one stage per boot.

Runs INSIDE the LUO test VM (``../shared/kernel-vm``), once per boot::

    run-in-vm.sh --kexec --out DIR -- /usr/bin/env PYTHONDONTWRITEBYTECODE=1 \\
        PYTHONPYCACHEPREFIX=/run/luo-job/pycache REPO/.venv/bin/python -B \\
        REPO/tests/kvcache/kexec_stage.py

The VM's kernel has no TCP/IP (``CONFIG_INET`` is off), so kvcache listens
on a Unix socket under ``/run`` (a fresh tmpfs at each boot).

Stage 1 starts ``kvcache serve --session kvcache-kexec --device
/dev/liveupdate`` as a daemon, stores the items with pymemcache (and deletes
a few), freezes the server for the kexec (SIGUSR1: it stops serving, leaves
the arena clean, and keeps holding its session until the kexec ends it) and
exits 0, so that ``vm-init.sh`` kexecs. Stage 2 starts kvcache again on the
same session name and reads every item back. Each stage writes what it saw
to ``$LUO_JOB/kvcache-stageN.json``; judging it is the host test's job.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pymemcache.client.base import Client

SESSION = "kvcache-kexec"
SOCKET = "/run/kvcache.sock"
READY = Path("/run/kvcache.ready")
ITEMS = 400
#: Items stored, then deleted in stage 1: stage 2 must not find them.
DELETED = range(0, ITEMS, 40)
#: Seconds for things that take well under one on real hardware (TCG is slow).
PATIENCE = 120.0
#: Items whose flags are checked byte for byte too.
SAMPLE = [1, 2, 3, ITEMS - 1]


def key(i: int) -> str:
    return f"item{i}"


def value(i: int) -> bytes:
    """A value of its own length and bytes for each item (1 byte to about 6 KiB)."""
    seed = hashlib.sha256(key(i).encode()).digest()
    return (seed * 200)[: 1 + (i * 151) % 6000]


def flags(i: int) -> int:
    return i * 7919 % 65536


def start_kvcache(job: Path, stage: int) -> subprocess.Popen[bytes]:
    READY.unlink(missing_ok=True)
    argv = [
        sys.executable, "-B", "-m", "liveupdate.kvcache", "serve",
        "--session", SESSION, "--device", "/dev/liveupdate",
        "--listen", f"unix:{SOCKET}", "--memory", "32", "--ready-file", str(READY),
    ]  # fmt: skip
    with open(job / f"kvcache-stage{stage}.log", "ab") as log:
        # Its own session: it outlives this script, up to the kexec.
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + PATIENCE
    while not READY.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kvcache did not start (exit status {proc.poll()})")
        time.sleep(0.05)
    return proc


def client() -> Client:
    return Client(SOCKET, timeout=PATIENCE, connect_timeout=PATIENCE)


def raw_get(items: list[int]) -> bytes:
    """The exact reply to one ``get`` of ``items``, over the text protocol by hand."""
    expected = len(expected_get(items))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(PATIENCE)
        sock.connect(SOCKET)
        sock.sendall(b"get " + b" ".join(key(i).encode() for i in items) + b"\r\n")
        reply = b""
        while len(reply) < expected and not reply.endswith(b"END\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def expected_get(items: list[int]) -> bytes:
    """What memcached answers to that ``get``: flags and values as stored."""
    return (
        b"".join(
            b"VALUE %s %d %d\r\n%s\r\n" % (key(i).encode(), flags(i), len(value(i)), value(i))
            for i in items
        )
        + b"END\r\n"
    )


def stage1(job: Path) -> dict[str, Any]:
    proc = start_kvcache(job, 1)
    mc = client()
    for i in range(ITEMS):
        assert mc.set(key(i), value(i), flags=flags(i), noreply=False), key(i)
    for i in DELETED:
        assert mc.delete(key(i), noreply=False), key(i)
    stats = mc.stats()
    mc.close()
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + PATIENCE
    while READY.exists():  # removed once frozen
        assert proc.poll() is None, f"kvcache exited ({proc.returncode}) instead of freezing"
        assert time.monotonic() < deadline, "kvcache did not freeze"
        time.sleep(0.05)
    return {"pid": proc.pid, "curr_items": int(stats[b"curr_items"])}


def stage2(job: Path) -> dict[str, Any]:
    proc = start_kvcache(job, 2)
    mc = client()
    wrong: list[str] = []
    for i in range(ITEMS):
        got = mc.get(key(i))  # the value only: flags below
        expected = None if i in DELETED else value(i)
        if got != expected:
            wrong.append(f"{key(i)}: {len(got) if got is not None else None} bytes")
    raw_ok = raw_get(SAMPLE) == expected_get(SAMPLE)
    stats = mc.stats()
    mc.close()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(PATIENCE)
    log = (job / "kvcache-stage2.log").read_text()
    return {
        "wrong": wrong,
        "curr_items": int(stats[b"curr_items"]),
        "raw_get_as_expected": raw_ok,
        "exit_status": status,
        "log": log,
    }


def main() -> int:
    stage = int(os.environ.get("LUO_STAGE", "1"))
    job = Path(os.environ.get("LUO_JOB", "."))
    result: dict[str, Any] = {}
    try:
        result = stage1(job) if stage == 1 else stage2(job)
        status = 0
    except Exception:
        traceback.print_exc()
        result["error"] = traceback.format_exc()
        status = 1 if stage == 1 else 0  # no kexec after a failed stage 1
    (job / f"kvcache-stage{stage}.json").write_text(json.dumps(result))
    return status


if __name__ == "__main__":
    sys.exit(main())
