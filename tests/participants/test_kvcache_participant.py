"""kvcache as a participant: it stops taking writes at luod's FREEZE.

A real ``kvcache serve --participant`` (standalone) and a second, slow
participant (``participant_agent.py``) that holds luod's FREEZE phase open
for a while: a write sent to kvcache once it said it froze gets no answer
while the slow participant is still freezing, and is answered, with nothing
lost, once luod's live update is over; kvcache then registers again with the
next generation and gets back the item count it carried.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from participantlib import Agent

from luodtest import Luod, luoctl_reboot, wait_for

pytestmark = pytest.mark.luod_only

KVCACHE = [sys.executable, "-m", "liveupdate.kvcache"]


def _ask(conn: socket.socket, request: bytes, expect: bytes) -> None:
    conn.sendall(request)
    got = b""
    while not got.endswith(expect):
        chunk = conn.recv(4096)
        assert chunk, got
        got += chunk
    assert got == expect


def test_kvcache_holds_requests_from_luods_freeze_to_its_end(luod: Luod, tmp_path: Path) -> None:
    ready, log = tmp_path / "kv.port", tmp_path / "kv.log"
    env = {**luod.env, "LIVEUPDATE_DEVICE": luod.socket}
    with open(log, "wb") as out:
        kv = subprocess.Popen(
            [*KVCACHE, "serve", "--listen", "127.0.0.1:0", "--memory", "8",
             "--participant", "kvcache", "--ready-file", str(ready)],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    slow: Agent | None = None
    try:
        wait_for(ready.exists, "kvcache did not start", timeout=30)
        wait_for(lambda: "registered" in log.read_text(), "kvcache did not register")
        slow = Agent(luod, "slow", "--freeze", "slow:2")
        slow.expect("registered")
        conn = socket.create_connection(("127.0.0.1", int(ready.read_text())))
        with conn:
            _ask(conn, b"set before 0 0 3\r\nold\r\n", b"STORED\r\n")
            reboot = threading.Thread(target=luoctl_reboot, args=(luod,))
            reboot.start()
            slow.expect("event", kind="freeze")
            wait_for(lambda: "frozen" in log.read_text(), "kvcache did not freeze")
            conn.sendall(b"set during 0 0 3\r\nnew\r\nget before during\r\n")
            # The slow participant still sleeps in its FREEZE: no answer yet.
            readable, _, _ = select.select([conn], [], [], 0.5)
            assert not readable, conn.recv(4096)
            reboot.join(60)
            assert not reboot.is_alive()
            expect = b"STORED\r\nVALUE before 0 3\r\nold\r\nVALUE during 0 3\r\nnew\r\nEND\r\n"
            got = b""
            while len(got) < len(expect):
                chunk = conn.recv(4096)
                assert chunk, got
                got += chunk
            assert got == expect
        wait_for(
            lambda: "carried 1 items" in log.read_text(),
            f"kvcache did not register again:\n{log.read_text()}",
        )
    finally:
        if slow is not None:
            slow.stop()
        kv.send_signal(signal.SIGTERM)
        try:
            kv.wait(20)
        except subprocess.TimeoutExpired:
            kv.kill()
            kv.wait()
