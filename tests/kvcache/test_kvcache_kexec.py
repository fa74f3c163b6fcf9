"""kvcache straight on an LUO device (``kvcache serve --session NAME``): a kexec, a luod reboot.

Through the real kernel: the LUO test VM of ``../shared/kernel-vm`` boots
twice (``run-in-vm.sh --kexec``); ``kexec_stage.py`` runs in each boot. In
the first, kvcache keeps its arena memfd in a session of ``/dev/liveupdate``
and holds it up to the kexec; in the second, a new kvcache on the same
session name serves every item. The kernel keeps memfds only, so the
listener is a new one (the test VM has no TCP/IP at all: a Unix socket).

Skipped when QEMU or the VM kit is missing, unless ``LIVEUPDATE_REQUIRE_VM=1``
(CI: then it fails). ``LIVEUPDATE_VM_ARGS`` adds options to ``run-in-vm.sh``.

Against luod, the same direct mode through a restart (keep-on-close) and a
live update of luod: every item there, and the listener the same socket.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from kvservice import KVCACHE, KvProcess
from pymemcache.client.base import Client

from luodtest import REPO, RUN_IN_VM, Luod, guest_bytecode, luoctl_reboot, require_vm

HERE = Path(__file__).resolve().parent
STAGE = HERE / "kexec_stage.py"


@pytest.mark.vm
def test_arena_survives_a_real_kexec(tmp_path: Path) -> None:
    """Items stored before a kexec are all served after it, from the memfd the kernel kept."""
    require_vm(kexec=True)
    imports = "import liveupdate.kvcache.main, liveupdate.client.device, pymemcache.client.base"
    guest_env = {"PYTHONDONTWRITEBYTECODE": "1", **guest_bytecode(tmp_path, imports)}
    command = [
        str(RUN_IN_VM), "--kexec", "--out", str(tmp_path),
        *shlex.split(os.environ.get("LIVEUPDATE_VM_ARGS", "")),
        "--", "/usr/bin/env", *(f"{k}={v}" for k, v in guest_env.items()),
        sys.executable, "-B", str(STAGE),
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=400, cwd=REPO, check=False
    )
    console = proc.stdout + proc.stderr
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text()}" for p in sorted(tmp_path.glob("kvcache-stage*.log"))
    )
    assert proc.returncode == 0, (
        f"run-in-vm.sh exited {proc.returncode} after {time.monotonic() - start:.1f} s:\n"
        f"{console[-6000:]}{logs}"
    )
    first: dict[str, Any] = json.loads((tmp_path / "kvcache-stage1.json").read_text())
    second: dict[str, Any] = json.loads((tmp_path / "kvcache-stage2.json").read_text())
    assert "error" not in first, first["error"] + logs
    assert "error" not in second, second["error"] + logs
    stored = first["curr_items"]
    assert stored == 400 - 10  # ITEMS minus DELETED in kexec_stage.py
    assert second["wrong"] == [], logs
    assert second["curr_items"] == stored
    assert second["raw_get_as_expected"], logs
    assert second["exit_status"] == 0, logs
    # The new boot mapped the arena left clean by the freeze: nothing rebuilt, the
    # listener a new one (the kernel has no handler for sockets).
    started = [line for line in second["log"].splitlines() if "session kvcache-kexec" in line]
    assert started and f"{stored} items, arena kept" in started[0], second["log"]
    assert "rebuilt" not in second["log"]
    print(f"kvcache across a kexec: 2 boots in {time.monotonic() - start:.1f} s")


def _fill(port: int, count: int) -> Client:
    client = Client(("127.0.0.1", port), timeout=30, connect_timeout=10)
    for i in range(count):
        assert client.set(f"item{i}", f"value{i}".encode() * 5, noreply=False)
    return client


def _check(port: int, count: int) -> None:
    """Every item of :func:`_fill` there with its value, and nothing else."""
    client = Client(("127.0.0.1", port), timeout=30, connect_timeout=10)
    expected = {f"item{i}": f"value{i}".encode() * 5 for i in range(count)}
    assert client.get_many(list(expected)) == expected
    assert int(client.stats()[b"curr_items"]) == count
    client.close()


@pytest.mark.luod_only
def test_direct_session_on_luod_survives_a_restart_and_a_luod_reboot(
    luod: Luod, tmp_path: Path
) -> None:
    """``--session`` on luod: warm after a stop (keep-on-close) and after a luod live update."""
    kv = KvProcess(tmp_path, "--session", "kvd", "--device", luod.socket).start()
    port = kv.port
    _fill(port, 300).close()
    kv.stop()
    kv.start()
    assert kv.port == port  # the listener came back from the session
    _check(port, 300)
    busy = _fill(port, 350)
    luoctl_reboot(luod)
    # The server's session fd belongs to the old generation now; it serves on.
    assert busy.get("item349") == b"value349" * 5
    busy.close()
    kv.stop()
    kv.start()
    assert kv.port == port
    _check(port, 350)
    log = kv.log_text()
    assert log.count("arena and listener kept") == 3, log
    assert "rebuilt" not in log
    kv.stop()


@pytest.mark.luod_only
def test_a_second_server_on_a_held_session_is_refused_and_harms_nothing(
    luod: Luod, tmp_path: Path
) -> None:
    """The session's name is taken while a server holds it: EEXIST, and the first serves on."""
    kv = KvProcess(tmp_path, "--session", "kvd", "--device", luod.socket).start()
    _fill(kv.port, 50).close()
    second = subprocess.run(
        [*KVCACHE, "serve", "--session", "kvd", "--device", luod.socket, "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert second.returncode == 1
    assert "[Errno 17]" in second.stderr, second.stderr  # EEXIST, said by kvcache
    _check(kv.port, 50)
    kv.stop()
    kv.start()
    _check(kv.port, 50)
    kv.stop()
