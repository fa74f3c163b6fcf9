"""Standalone kvcache, as real processes: libmemcached's tools, the save file, the hand-off."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from kvservice import KVCACHE, KvProcess
from pymemcache.client.base import Client

needs_tools = pytest.mark.skipif(
    shutil.which("memcslap") is None, reason="needs libmemcached-tools"
)


@needs_tools
def test_memccp_memccat_and_memcslap_work_unmodified(tmp_path: Path) -> None:
    kv = KvProcess(tmp_path).start()
    try:
        servers = f"--servers=127.0.0.1:{kv.port}"
        source = tmp_path / "payload.txt"
        source.write_bytes(b"hello kvcache\n" * 100)
        copy = subprocess.run(["memccp", servers, str(source)], capture_output=True, timeout=30)
        assert copy.returncode == 0, copy
        cat = subprocess.run(["memccat", servers, "payload.txt"], capture_output=True, timeout=30)
        # memccat ends each value it prints with a newline of its own.
        assert cat.returncode == 0 and cat.stdout == source.read_bytes() + b"\n", cat
        for test in ("set", "get"):
            slap = subprocess.run(
                ["memcslap", servers, f"--test={test}", "--concurrency=2", "--execute-number=500"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert slap.returncode == 0, slap.stdout + slap.stderr
        stats = Client(("127.0.0.1", kv.port)).stats()
        assert stats[b"curr_items"] > 0 and stats[b"limit_maxbytes"] == 8 << 20
    finally:
        kv.stop()


def test_save_file_keeps_every_item_across_a_restart(tmp_path: Path) -> None:
    save = tmp_path / "items.save"
    kv = KvProcess(tmp_path, "--save-file", str(save)).start()
    client = Client(("127.0.0.1", kv.port), timeout=30)
    for i in range(300):
        client.set(f"k{i}", f"value{i}".encode(), expire=0 if i % 2 else 3600, noreply=False)
    client.set("gone", b"x", expire=-1, noreply=False)
    kv.stop()
    assert save.exists() and "saved 300 items" in kv.log_text()
    kv.start()
    client = Client(("127.0.0.1", kv.port), timeout=30)
    assert client.get_many([f"k{i}" for i in range(300)]) == {
        f"k{i}": f"value{i}".encode() for i in range(300)
    }
    kv.stop()


def test_handoff_passes_the_listener_and_the_items(tmp_path: Path) -> None:
    save = tmp_path / "items.save"
    kv = KvProcess(tmp_path, "--save-file", str(save)).start()
    port = kv.port
    client = Client(("127.0.0.1", port), timeout=30)
    for i in range(100):
        client.set(f"k{i}", b"v%d" % i, noreply=False)
    assert kv.proc is not None
    result = subprocess.run(
        [*KVCACHE, "handoff", "--pid", str(kv.proc.pid), "--ready-file", str(kv.ready_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr + kv.log_text()
    assert kv.port == port
    client = Client(("127.0.0.1", port), timeout=30)
    try:
        assert client.get("k99") == b"v99"
        assert int(client.stats()[b"curr_items"]) == 100
    finally:
        pid = int(client.stats()[b"pid"])
        subprocess.run(["kill", str(pid)], check=True)
    assert "handed the listener off to pid" in kv.log_text()


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    def kvcache(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KVCACHE, *args], capture_output=True, text=True, timeout=30, env={"PATH": ""}
        )

    bad = kvcache("serve", "--listen", "nohostport")
    assert bad.returncode == 1 and "expected HOST:PORT" in bad.stderr
    bad = kvcache("serve", "--listen", "127.0.0.1:0", "--inherit-listener")
    assert bad.returncode == 1 and "LISTEN_FDS=1" in bad.stderr
    gone = kvcache("handoff", "--pid", "999999999", "--timeout", "1")
    assert gone.returncode == 1
    up = kvcache("upgrade", "nosuch", "--socket", str(tmp_path / "none"))
    assert up.returncode != 0
    assert sys.executable
