"""kvcache under ``luoctl run``: upgrades, a SIGKILL and a luod reboot under real clients.

pymemcache clients (one busy, twenty idle) and memcslap talk to a kvcache
kept by ``luoctl run --keep-on-close``. Through ``kvcache upgrade`` (a
pre-started update), a SIGKILL of the server and a live update of luod, the
promise is: every item present afterwards, every client's connection the
same one, no client error.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from kvservice import KVCACHE, KvProcess
from pymemcache.client.base import Client

from luodtest import Luod, luoctl_reboot, wait_for

pytestmark = pytest.mark.luod_only

ITEMS = 1500


class Busy(threading.Thread):
    """Sets and gets its own keys back to back on one connection; any error is kept."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.client = Client(("127.0.0.1", port), timeout=60, connect_timeout=10)
        self.client.get("busy-warmup")
        self.sock = self.client.sock
        self.done = 0
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()
        self.pause = threading.Event()
        self.idle = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                if self.pause.is_set():
                    self.idle.set()
                    self.stop_flag.wait(0.005)
                    continue
                self.idle.clear()
                key = f"busy{self.done}"
                assert self.client.set(key, str(self.done).encode(), noreply=False)
                assert self.client.get(key) == str(self.done).encode(), key
                self.done += 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def progress(self, what: str) -> None:
        mark = self.done
        wait_for(lambda: self.done > mark + 20 or self.error is not None, f"no requests {what}")
        assert self.error is None, self.error


def check_all(client: Client, count: int = ITEMS) -> None:
    keys = [f"item{i}" for i in range(count)]
    for start in range(0, count, 100):
        got = client.get_many(keys[start : start + 100])
        for key in keys[start : start + 100]:
            assert got.get(key) == key.encode() * 3, key


def memcslap(port: int) -> None:
    result = subprocess.run(
        ["memcslap", f"--servers=127.0.0.1:{port}", "--concurrency=2", "--execute-number=300"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failed" not in result.stdout + result.stderr, result.stdout


@pytest.mark.skipif(shutil.which("memcslap") is None, reason="needs libmemcached-tools")
def test_clients_keep_items_and_connections_through_upgrade_crash_and_luod_reboot(
    luod: Luod, tmp_path: Path
) -> None:
    kv = KvProcess(tmp_path, daemon=luod).start()
    port = kv.port
    main = Client(("127.0.0.1", port), timeout=60, connect_timeout=10)
    for i in range(ITEMS):
        main.set(f"item{i}", f"item{i}".encode() * 3, noreply=True)
    check_all(main)
    idle = [Client(("127.0.0.1", port), timeout=60) for _ in range(20)]
    for n, client in enumerate(idle):
        assert client.set(f"idle{n}", b"x", noreply=False)
    sockets = [c.sock for c in [main, *idle]]
    busy = Busy(port)
    busy.start()
    try:
        busy.progress("before the upgrade")

        # 1. kvcache upgrade: the next process starts first, this one freezes.
        first = kv.server_pid()
        result = subprocess.run(
            [*KVCACHE, "upgrade", "kv", "--socket", luod.socket],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr + kv.log_text()
        wait_for(lambda: kv.server_pid() != first, "no new server after the upgrade")
        busy.progress("after the upgrade")
        check_all(main)
        memcslap(port)

        # 2. SIGKILL between two requests: the supervisor restarts it warm.
        busy.pause.set()
        wait_for(busy.idle.is_set, "the busy client did not pause")
        second = kv.server_pid()
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: kv.server_pid() != second, "the server was not restarted")
        busy.pause.clear()
        busy.progress("after the SIGKILL")
        check_all(main)
        assert "arena rebuilt after a crash" in kv.log_text()

        # 3. luod itself is live-updated under the server.
        third = kv.server_pid()
        luoctl_reboot(luod)
        busy.progress("after the luod reboot")
        assert kv.server_pid() == third
        check_all(main)
        memcslap(port)

        # 4. And one more upgrade, after the reboot.
        result = subprocess.run(
            [*KVCACHE, "upgrade", "kv", "--socket", luod.socket],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr + kv.log_text()
        wait_for(lambda: kv.server_pid() != third, "no new server after the second upgrade")
        busy.progress("after the second upgrade")
    finally:
        busy.stop_flag.set()
        busy.join(30)
        kv.stop()
    assert busy.error is None, busy.error
    assert busy.done > 80
    # Every connection is the one opened at the start: none was dropped.
    assert [c.sock for c in [main, *idle]] == sockets
    assert busy.client.sock is busy.sock


def test_every_busy_key_survives_a_stop_and_a_new_luoctl_run(luod: Luod, tmp_path: Path) -> None:
    """luoctl run stopped (SIGTERM): keep-on-close keeps the session; a new run serves warm."""
    kv = KvProcess(tmp_path, daemon=luod).start()
    client = Client(("127.0.0.1", kv.port), timeout=30)
    for i in range(200):
        client.set(f"item{i}", f"item{i}".encode() * 3, noreply=False)
    kv.stop()
    client.close()
    kv.start()
    client = Client(("127.0.0.1", kv.port), timeout=30)
    check_all(client, 200)
    assert "arena rebuilt" not in kv.log_text()  # a stop in order leaves the arena clean
    stats = client.stats()
    assert stats[b"curr_items"] == 200
    kv.stop()


def test_half_sent_command_and_unread_replies_cross_an_upgrade(luod: Luod, tmp_path: Path) -> None:
    """A connection frozen mid-``set`` with replies backed up: the successor finishes both."""
    import socket

    kv = KvProcess(tmp_path, daemon=luod).start()
    big = b"b" * 60000
    assert Client(("127.0.0.1", kv.port)).set("big", big, noreply=False)
    conn = socket.create_connection(("127.0.0.1", kv.port), timeout=60)
    conn.sendall(b"get big\r\n" * 100 + b"set half 0 0 10\r\nhello")
    wait_for(lambda: int(Client(("127.0.0.1", kv.port)).stats()[b"cmd_get"]) >= 100, "no gets")
    first = kv.server_pid()
    result = subprocess.run(
        [*KVCACHE, "upgrade", "kv", "--socket", luod.socket], capture_output=True, timeout=120
    )
    assert result.returncode == 0, result
    wait_for(lambda: kv.server_pid() != first, "no new server after the upgrade")
    conn.sendall(b"world\r\n")
    expected = b"VALUE big 0 60000\r\n" + big + b"\r\nEND\r\n"
    want = expected * 100 + b"STORED\r\n"
    got = b""
    while len(got) < len(want):
        chunk = conn.recv(1 << 20)
        assert chunk, "connection closed"
        got += chunk
    assert got == want
    assert Client(("127.0.0.1", kv.port)).get("half") == b"helloworld"
    kv.stop()
