"""The memcached text protocol over a real memfd arena, in process: replies byte for byte."""

from __future__ import annotations

import os

import pytest

from liveupdate.kvcache.arena import Arena, ArenaError
from liveupdate.kvcache.protocol import Protocol, expiry

NOW = 1_800_000_000


@pytest.fixture
def proto() -> Protocol:
    fd = Arena.create(1 << 20)
    arena = Arena(fd)
    os.close(fd)
    return Protocol(arena, "1.6.18-test", lambda: [("curr_connections", 1)])


def run(proto: Protocol, data: bytes, now: int = NOW) -> bytes:
    out: list[bytes] = []
    used, close = proto.execute(data, out, now)
    assert used == len(data) and not close, (used, close, out)
    return b"".join(out)


def test_set_get_gets_and_noreply(proto: Protocol) -> None:
    assert run(proto, b"set a 5 0 3\r\nabc\r\n") == b"STORED\r\n"
    assert run(proto, b"set b 0 0 1 noreply\r\nx\r\n") == b""
    assert run(proto, b"get a b c\r\n") == b"VALUE a 5 3\r\nabc\r\nVALUE b 0 1\r\nx\r\nEND\r\n"
    reply = run(proto, b"gets a\r\n")
    assert reply.startswith(b"VALUE a 5 3 ") and reply.endswith(b"\r\nabc\r\nEND\r\n")


def test_add_replace_append_prepend_cas(proto: Protocol) -> None:
    assert run(proto, b"add k 1 0 1\r\na\r\n") == b"STORED\r\n"
    assert run(proto, b"add k 1 0 1\r\nb\r\n") == b"NOT_STORED\r\n"
    assert run(proto, b"replace nope 0 0 1\r\nb\r\n") == b"NOT_STORED\r\n"
    assert run(proto, b"replace k 2 0 1\r\nc\r\n") == b"STORED\r\n"
    assert run(proto, b"append k 9 0 2\r\nde\r\n") == b"STORED\r\n"
    assert run(proto, b"prepend k 9 0 2\r\nab\r\n") == b"STORED\r\n"
    assert run(proto, b"append nope 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    assert run(proto, b"get k\r\n") == b"VALUE k 2 5\r\nabcde\r\nEND\r\n"  # flags kept
    cas = int(run(proto, b"gets k\r\n").split(b"\r\n")[0].split()[-1])
    assert run(proto, b"cas k 0 0 1 %d\r\nz\r\n" % (cas + 1)) == b"EXISTS\r\n"
    assert run(proto, b"cas k 0 0 1 %d\r\nz\r\n" % cas) == b"STORED\r\n"
    assert run(proto, b"cas gone 0 0 1 1\r\nz\r\n") == b"NOT_FOUND\r\n"


def test_delete_incr_decr_touch(proto: Protocol) -> None:
    run(proto, b"set n 0 0 2\r\n10\r\n")
    assert run(proto, b"incr n 5\r\n") == b"15\r\n"
    assert run(proto, b"decr n 100\r\n") == b"0\r\n"
    assert run(proto, b"incr n 18446744073709551615\r\n") == b"18446744073709551615\r\n"
    assert run(proto, b"incr n 1\r\n") == b"0\r\n"  # wraps at 2^64
    assert run(proto, b"incr n x\r\n") == b"CLIENT_ERROR invalid numeric delta argument\r\n"
    assert run(proto, b"incr nope 1\r\n") == b"NOT_FOUND\r\n"
    run(proto, b"set s 0 0 2\r\nab\r\n")
    assert run(proto, b"decr s 1\r\n").startswith(b"CLIENT_ERROR cannot increment")
    assert run(proto, b"incr n 1 noreply\r\n") == b""
    assert run(proto, b"touch n 100\r\n") == b"TOUCHED\r\n"
    assert run(proto, b"touch nope 100\r\n") == b"NOT_FOUND\r\n"
    assert run(proto, b"delete n\r\n") == b"DELETED\r\n"
    assert run(proto, b"delete n\r\n") == b"NOT_FOUND\r\n"
    assert run(proto, b"delete s 0 noreply\r\n") == b""
    assert run(proto, b"delete s 5\r\n").startswith(b"CLIENT_ERROR bad command line format")


def test_expiry_relative_absolute_negative_and_gat(proto: Protocol) -> None:
    assert expiry(0, NOW) == 0 and expiry(-1, NOW) == 1 and expiry(10, NOW) == NOW + 10
    assert expiry(NOW + 99, NOW) == NOW + 99 and expiry(NOW - 99, NOW) == 1
    run(proto, b"set a 0 10 1\r\nx\r\nset b 0 -1 1\r\ny\r\n")
    assert run(proto, b"get a b\r\n") == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    assert run(proto, b"get a\r\n", NOW + 10) == b"END\r\n"  # expired, reaped
    run(proto, b"set c 0 10 1\r\nz\r\n")
    assert run(proto, b"gat 100 c\r\n") == b"VALUE c 0 1\r\nz\r\nEND\r\n"
    assert run(proto, b"get c\r\n", NOW + 50) == b"VALUE c 0 1\r\nz\r\nEND\r\n"
    assert run(proto, b"gats 0 c\r\n").startswith(b"VALUE c 0 1 ")
    assert run(proto, b"gat x\r\n") == b"CLIENT_ERROR bad command line format\r\n"


def test_flush_all_now_and_delayed(proto: Protocol) -> None:
    run(proto, b"set a 0 0 1\r\nx\r\n")
    assert run(proto, b"flush_all\r\n") == b"OK\r\n"
    assert run(proto, b"get a\r\n") == b"END\r\n"
    run(proto, b"set b 0 0 1\r\ny\r\n")
    assert run(proto, b"flush_all 10 noreply\r\n") == b""
    assert run(proto, b"get b\r\n", NOW + 5) == b"VALUE b 0 1\r\ny\r\nEND\r\n"
    assert run(proto, b"get b\r\n", NOW + 11) == b"END\r\n"
    assert run(proto, b"flush_all x\r\n") == b"CLIENT_ERROR bad command line format\r\n"


def test_stats_version_verbosity_errors(proto: Protocol) -> None:
    run(proto, b"set a 0 0 1\r\nx\r\n")
    stats = run(proto, b"stats\r\n")
    assert b"STAT curr_items 1\r\n" in stats and b"STAT limit_maxbytes " in stats
    assert b"STAT pid %d\r\n" % os.getpid() in stats and stats.endswith(b"END\r\n")
    assert b"STAT curr_connections 1\r\n" in stats
    assert b"STAT item_size_max" in run(proto, b"stats settings\r\n")
    assert b":chunk_size" in run(proto, b"stats slabs\r\n")
    assert b"items:" in run(proto, b"stats items\r\n")
    assert run(proto, b"stats reset\r\n") == b"RESET\r\n"
    assert run(proto, b"stats bogus\r\n") == b"ERROR\r\n"
    assert run(proto, b"version\r\n") == b"VERSION 1.6.18-test\r\n"
    assert run(proto, b"verbosity 1\r\nverbosity 1 noreply\r\n") == b"OK\r\n"
    assert run(proto, b"bogus\r\n\r\n") == b"ERROR\r\nERROR\r\n"
    assert run(proto, b"set a 0 0\r\nget\r\n") == b"ERROR\r\nERROR\r\n"
    assert run(proto, b"set a x 0 1\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    assert run(proto, b"get " + b"k" * 251 + b"\r\n").startswith(b"CLIENT_ERROR")
    assert run(proto, b"incr a\r\ntouch a\r\n") == b"ERROR\r\nERROR\r\n"
    assert run(proto, b"touch a x\r\n") == b"CLIENT_ERROR bad command line format\r\n"


def test_partial_commands_wait_and_bad_chunks_close(proto: Protocol) -> None:
    out: list[bytes] = []
    assert proto.execute(b"set a 0 0 5\r\nab", out, NOW) == (0, False)
    assert proto.execute(b"get a", out, NOW) == (0, False)
    assert proto.execute(b"set a 0 0 1\r\nxyz\r\n", out, NOW)[1] is True
    assert out == [b"CLIENT_ERROR bad data chunk\r\n"]
    out.clear()
    assert proto.execute(b"x" * 70000, out, NOW) == (70000, True)
    assert proto.execute(b"quit\r\n", out, NOW) == (6, True)
    assert proto.execute(b"set a 0 0 2000000000\r\n", out, NOW)[1] is True


def test_too_large_and_out_of_memory(proto: Protocol) -> None:
    big = proto.arena.max_item + 1
    run(proto, b"set a 0 0 1\r\nx\r\n")
    assert run(proto, b"set a 0 0 %d\r\n%s\r\n" % (big, b"v" * big)) == (
        b"SERVER_ERROR object too large for cache\r\n"
    )
    assert run(proto, b"get a\r\n") == b"END\r\n"  # the old value went too
    half = proto.arena.max_item // 2 + 10
    run(proto, b"set h 0 0 %d\r\n%s\r\n" % (half, b"v" * half))
    assert run(proto, b"append h 0 0 %d\r\n%s\r\n" % (half, b"v" * half)).startswith(
        b"SERVER_ERROR object too large"
    )


def test_lru_evicts_the_least_recently_used(proto: Protocol) -> None:
    arena = proto.arena
    value = b"v" * 1000
    n = 0
    while arena.evictions == 0:
        arena.store(b"key%d" % n, 0, 0, value)
        n += 1
        if n == 3:
            assert arena.find(b"key0", NOW)
            arena.bump(arena.find(b"key0", NOW))
    assert arena.find(b"key0", NOW)  # bumped: not the one evicted
    assert not arena.find(b"key1", NOW)
    assert arena.curr_items == n - 1
    assert [i.key for i in arena.items()][-1] == b"key%d" % (n - 1)  # newest last


def test_not_an_arena_is_refused() -> None:
    fd = os.memfd_create("x")
    try:
        with pytest.raises(ArenaError, match="too small"):
            Arena(fd)
        os.ftruncate(fd, 8192)
        with pytest.raises(ArenaError, match="not a kvcache arena"):
            Arena(fd)
    finally:
        os.close(fd)
