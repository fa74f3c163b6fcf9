"""Crash consistency of the arena: a real process SIGKILLed inside a ``set``.

The arena is a memfd shared with a forked child that stores items with a
fault hook (``KVCACHE_FAULT``'s ``kill-in-set``) and dies inside its Nth
store. The parent opens the arena as the next process would: it finds it in
use, rebuilds, and every item stored before is there with its value, the
interrupted key holds its old value, and nothing leaks.
"""

from __future__ import annotations

import os
import signal
import zlib

import pytest

from liveupdate.kvcache.arena import ITEM_HEADER, Arena
from liveupdate.kvcache.main import KillInSet, fault_from_env

NOW = 1_800_000_000


def fill_then_die(fd: int, fault: str, count: int) -> None:
    """In a child: store key0..key{count-1} twice over (v1 then v2), dying per ``fault``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child is SIGKILLed
        arena = Arena(fd, fault_from_env(fault))
        for version in (b"v1", b"v2"):
            for i in range(count):
                arena.store(b"key%d" % i, i, 0, version * (i + 1))
        os._exit(0)
    _pid, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


@pytest.mark.parametrize("stage", ["value", "link"])
def test_a_kill_inside_a_set_leaves_a_consistent_arena(stage: str) -> None:
    fd = Arena.create(1 << 20)
    try:
        fill_then_die(fd, f"kill-in-set:150:{stage}", 100)  # dies in the 50th v2 store
        arena = Arena(fd)
        assert arena.recovered
        for i in range(100):
            off = arena.find(b"key%d" % i, NOW)
            assert off, i
            flags, nbytes, _cas, _exp, at = arena.read(off)
            value = bytes(arena.mm[at : at + nbytes])
            # Stores before the fault: v2; the interrupted one: v1 or v2, whole.
            expected = [b"v2"] if i < 49 else [b"v1", b"v2"] if i == 49 else [b"v1"]
            assert value in [v * (i + 1) for v in expected], (i, value)
            assert flags == i
        assert arena.curr_items == 100
        assert sum(1 for _ in arena.items()) == 100
        # Nothing leaked: the rebuilt free lists and LRU serve new stores as before.
        for i in range(100, 200):
            assert arena.store(b"key%d" % i, 0, 0, b"x" * 50)
        arena.close()
        assert Arena(fd).recovered is False  # closed in order: clean
    finally:
        os.close(fd)


def test_a_torn_item_is_dropped_by_its_checksum() -> None:
    fd = Arena.create(1 << 20)
    try:
        arena = Arena(fd)
        arena.store(b"good", 0, 0, b"g" * 100)
        arena.store(b"torn", 0, 0, b"t" * 100)
        off = arena.find(b"torn", NOW)
        at = arena.read(off)[4]
        arena.mm[at + 50] ^= 0xFF  # a byte of the value changed behind the checksum
        crc_ok = zlib.crc32(arena.mm[at : at + 100])
        assert crc_ok != zlib.crc32(b"t" * 100)
        arena.close(clean=False)  # as a crash leaves it
        arena = Arena(fd)
        assert arena.recovered
        assert arena.find(b"good", NOW) and not arena.find(b"torn", NOW)
        assert arena.curr_items == 1
        assert arena.rebuild() == (1, 0)
        assert ITEM_HEADER.size == 52
    finally:
        os.close(fd)


def test_fault_spec_is_checked() -> None:
    assert fault_from_env(None) is None and fault_from_env("") is None
    hook = fault_from_env("kill-in-set:3")
    assert isinstance(hook, KillInSet) and hook.n == 3 and hook.stage == "value"
    for bad in ("kill-in-set", "kill-in-set:x", "kill-in-get:1", "kill-in-set:1:later"):
        with pytest.raises(ValueError, match="KVCACHE_FAULT"):
            fault_from_env(bad)
