"""The memcached text protocol (memcached 1.6's ``protocol.txt``) over an :class:`Arena`.

:meth:`Protocol.execute` takes a connection's unread bytes, runs every
complete command in them and appends the replies to a list; it returns how
many bytes it used, so the caller keeps an incomplete command (a ``set``
whose data has not all arrived) for the next read. Commands: ``get gets gat
gats set add replace append prepend cas delete incr decr touch flush_all
stats version verbosity quit``, each with ``noreply`` where memcached has it.

Expiry as memcached: 0 never, up to 30 days relative seconds, beyond that
an absolute Unix time, negative already expired. Times are wall-clock
seconds so that they mean the same to the next process.

While luod freezes a live update (:meth:`Protocol.freeze_writes`), a command
that writes (:data:`WRITES`) is not run: :meth:`~Protocol.execute` stops in
front of it and says :data:`HELD`, and the caller stops reading that
connection until :meth:`~Protocol.thaw_writes`. Reads go on. The switch
swaps the command table, so the hot path tests nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from liveupdate.kvcache.arena import MAX_KEY, Arena

__all__ = ["HELD", "MAX_LINE", "WRITES", "Protocol", "expiry"]

#: The longest command line (a ``get`` of many keys); longer closes the connection.
MAX_LINE = 65536
#: A data block longer than this closes the connection (memcached cannot swallow it either).
MAX_DATA = 1 << 30
_RELATIVE_LIMIT = 30 * 24 * 3600
_CRLF = b"\r\n"
_NOREPLY = b"noreply"
_STORAGE = frozenset((b"set", b"add", b"replace", b"append", b"prepend", b"cas"))
_U64 = 1 << 64
#: The commands that change the arena beyond its LRU order: held while writes
#: are frozen. ``gat``/``gats`` change an expiry; a plain ``get`` may still
#: reap an expired item, which changes nothing a client can see.
WRITES = frozenset(
    (*_STORAGE, b"delete", b"incr", b"decr", b"touch", b"gat", b"gats", b"flush_all")
)
#: :meth:`Protocol.execute`'s second value when it stopped in front of a write
#: because writes are frozen (``False``: go on; ``True``: close).
HELD = 2

STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
END = b"END\r\n"
OK = b"OK\r\n"
ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
LINE_TOO_LONG = b"CLIENT_ERROR line too long\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"


class _WriteHeldError(Exception):
    """Raised by a write command while writes are frozen; caught by execute."""


def expiry(exptime: int, now: int) -> int:
    """A command's exptime as the absolute time stored (0 never; 1 already expired)."""
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1
    if exptime <= _RELATIVE_LIMIT:
        return now + exptime
    return exptime if exptime > now else 1


class Protocol:
    """Runs memcached text commands against one arena; holds the command counters."""

    def __init__(
        self,
        arena: Arena,
        version: str,
        server_stats: Callable[[], list[tuple[str, int]]] = list,
    ) -> None:
        self.arena = arena
        self.version = version.encode()
        #: Extra ``stats`` rows from the server (connections).
        self.server_stats = server_stats
        self.started = time.time()
        self.counters = dict.fromkeys(
            [
                "cmd_get",
                "cmd_set",
                "cmd_touch",
                "cmd_flush",
                "get_hits",
                "get_misses",
                "delete_hits",
                "delete_misses",
                "incr_hits",
                "incr_misses",
                "decr_hits",
                "decr_misses",
                "cas_hits",
                "cas_misses",
                "cas_badval",
                "touch_hits",
                "touch_misses",
            ],
            0,
        )
        self._commands: dict[bytes, Callable[[list[bytes], list[bytes], int], bool]] = {
            b"get": self._get,
            b"gets": self._get,
            b"gat": self._gat,
            b"gats": self._gat,
            b"delete": self._delete,
            b"incr": self._arith,
            b"decr": self._arith,
            b"touch": self._touch,
            b"flush_all": self._flush_all,
            b"stats": self._stats,
            b"version": self._version,
            b"verbosity": self._verbosity,
            b"quit": self._quit,
        }
        self._writing = self._commands
        #: The storage commands' entry point: :meth:`_storage`, or a stop while frozen.
        self._store_command = self._storage
        #: Whether writes are frozen (:meth:`freeze_writes`).
        self.writes_frozen = False

    def freeze_writes(self) -> None:
        """Stop running writes: :meth:`execute` stops in front of the first one."""
        self._commands = {
            cmd: self._hold if cmd in WRITES else handler for cmd, handler in self._writing.items()
        }
        self._store_command = self._hold_storage
        self.writes_frozen = True

    def thaw_writes(self) -> None:
        """Run writes again (the caller runs what it held)."""
        self._commands = self._writing
        self._store_command = self._storage
        self.writes_frozen = False

    def _hold(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        raise _WriteHeldError

    def _hold_storage(
        self, cmd: bytes, parts: list[bytes], buf: bytes, start: int, out: list[bytes], now: int
    ) -> int:
        raise _WriteHeldError

    def execute(self, buf: bytes, out: list[bytes], now: int) -> tuple[int, int]:
        """Run the complete commands in ``buf``; ``(bytes used, close the connection)``.

        The second value is :data:`HELD` when writes are frozen and the next
        command writes: ``bytes used`` ends in front of it.
        """
        pos = 0
        size = len(buf)
        commands = self._commands
        store = self._store_command
        try:
            while pos < size:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if size - pos > MAX_LINE:
                        out.append(LINE_TOO_LONG)
                        return size, True
                    break
                end = eol - 1 if eol > pos and buf[eol - 1] == 13 else eol
                parts = buf[pos:end].split()
                if not parts:
                    out.append(ERROR)
                    pos = eol + 1
                    continue
                cmd = parts[0]
                if cmd in _STORAGE:
                    used = store(cmd, parts, buf, eol + 1, out, now)
                    if used < 0:
                        return size if used == -2 else pos, used == -2
                    pos = used
                    continue
                handler = commands.get(cmd)
                if handler is None:
                    out.append(ERROR)
                elif handler(parts, out, now):
                    return eol + 1, True
                pos = eol + 1  # after the handler: a held write leaves pos in front of it
        except _WriteHeldError:
            return pos, HELD
        return pos, False

    # -- storage -----------------------------------------------------------------------

    def _storage(
        self,
        cmd: bytes,
        parts: list[bytes],
        buf: bytes,
        start: int,
        out: list[bytes],
        now: int,
    ) -> int:
        """Run one storage command; where the next command starts (-1: wait, -2: close)."""
        want = 6 if cmd == b"cas" else 5
        noreply = len(parts) == want + 1 and parts[want] == _NOREPLY
        if len(parts) != want and not noreply:
            out.append(ERROR)
            return start
        key = parts[1]
        try:
            flags = int(parts[2])
            exptime = int(parts[3])
            nbytes = int(parts[4])
            unique = int(parts[5]) if want == 6 else 0
        except ValueError:
            out.append(BAD_FORMAT)
            return start
        if len(key) > MAX_KEY or not 0 <= flags < 1 << 32 or nbytes < 0:
            out.append(BAD_FORMAT)
            return start
        if nbytes > MAX_DATA:
            out.append(TOO_LARGE)
            return -2
        end = start + nbytes + 2
        if end > len(buf):
            return -1
        if buf[end - 2 : end] != _CRLF:
            out.append(BAD_CHUNK)
            return -2
        reply = self._store(cmd, key, flags, expiry(exptime, now), buf, start, nbytes, unique, now)
        if not noreply:
            out.append(reply)
        return end

    def _store(
        self,
        cmd: bytes,
        key: bytes,
        flags: int,
        exptime: int,
        buf: bytes,
        start: int,
        nbytes: int,
        unique: int,
        now: int,
    ) -> bytes:
        arena = self.arena
        self.counters["cmd_set"] += 1
        if nbytes > arena.max_item:
            arena.delete(key, now)  # memcached drops the old value too
            return TOO_LARGE
        value: bytes | memoryview = memoryview(buf)[start : start + nbytes]
        if cmd != b"set":
            off = arena.find(key, now)
            if cmd == b"add":
                if off:
                    arena.bump(off)
                    return NOT_STORED
            elif not off:
                if cmd == b"cas":
                    self.counters["cas_misses"] += 1
                    return NOT_FOUND
                return NOT_STORED
            elif cmd == b"cas":
                if arena.read(off)[2] != unique:
                    self.counters["cas_badval"] += 1
                    return EXISTS
                self.counters["cas_hits"] += 1
            elif cmd != b"replace":  # append, prepend: the old item's flags and expiry stay
                old_flags, old_n, _cas, old_exp, at = arena.read(off)
                old = arena.mm[at : at + old_n]
                value = old + value if cmd == b"append" else bytes(value) + old
                if len(value) > arena.max_item:
                    return TOO_LARGE
                flags, exptime = old_flags, old_exp
        try:
            stored = arena.store(key, flags, exptime, value)
        finally:
            if isinstance(value, memoryview):
                value.release()
        return STORED if stored else NO_MEMORY

    # -- retrieval ---------------------------------------------------------------------

    def _get(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        return self._values(parts, 1, parts[0] == b"gets", None, out, now)

    def _gat(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        try:
            exptime = expiry(int(parts[1]), now)
        except (IndexError, ValueError):
            out.append(BAD_FORMAT if len(parts) > 1 else ERROR)
            return False
        self.counters["cmd_touch"] += 1
        return self._values(parts, 2, parts[0] == b"gats", exptime, out, now)

    def _values(
        self,
        parts: list[bytes],
        first: int,
        with_cas: bool,
        touch: int | None,
        out: list[bytes],
        now: int,
    ) -> bool:
        if len(parts) <= first:
            out.append(ERROR)
            return False
        arena = self.arena
        mm = arena.mm
        counters = self.counters
        for i in range(first, len(parts)):
            key = parts[i]
            if len(key) > MAX_KEY:
                out.append(BAD_FORMAT)
                return False
            counters["cmd_get"] += 1
            off = arena.find(key, now)
            if not off:
                counters["get_misses"] += 1
                continue
            counters["get_hits"] += 1
            arena.bump(off)
            if touch is not None:
                arena.touch(off, touch)
            flags, nbytes, cas, _exp, at = arena.read(off)
            if with_cas:
                out.append(b"VALUE %s %d %d %d\r\n" % (key, flags, nbytes, cas))
            else:
                out.append(b"VALUE %s %d %d\r\n" % (key, flags, nbytes))
            out.append(mm[at : at + nbytes] + _CRLF)
        out.append(END)
        return False

    # -- the rest ----------------------------------------------------------------------

    def _delete(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        noreply = parts[-1] == _NOREPLY
        args = parts[1 : len(parts) - noreply]
        if not args or len(args) > 2 or (len(args) == 2 and args[1] != b"0"):
            out.append(b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n")
            return False
        found = self.arena.delete(args[0], now)
        self.counters["delete_hits" if found else "delete_misses"] += 1
        if not noreply:
            out.append(DELETED if found else NOT_FOUND)
        return False

    def _arith(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        noreply = len(parts) == 4 and parts[3] == _NOREPLY
        if len(parts) != 3 and not noreply:
            out.append(ERROR)
            return False
        incr = parts[0] == b"incr"
        name = "incr" if incr else "decr"
        delta_text = parts[2]
        if not delta_text.isdigit() or int(delta_text) >= _U64:
            out.append(BAD_DELTA)
            return False
        key = parts[1]
        arena = self.arena
        off = arena.find(key, now)
        if not off:
            self.counters[name + "_misses"] += 1
            if not noreply:
                out.append(NOT_FOUND)
            return False
        flags, nbytes, _cas, exptime, at = arena.read(off)
        text = arena.mm[at : at + nbytes].rstrip(b" ")
        if not text.isdigit() or int(text) >= _U64:
            out.append(NON_NUMERIC)
            return False
        self.counters[name + "_hits"] += 1
        number = int(text)
        delta = int(delta_text)
        number = (number + delta) % _U64 if incr else max(0, number - delta)
        result = b"%d" % number
        if not arena.store(key, flags, exptime, result):
            out.append(NO_MEMORY)
        elif not noreply:
            out.append(result + _CRLF)
        return False

    def _touch(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        noreply = len(parts) == 4 and parts[3] == _NOREPLY
        if len(parts) != 3 and not noreply:
            out.append(ERROR)
            return False
        try:
            exptime = expiry(int(parts[2]), now)
        except ValueError:
            out.append(BAD_FORMAT)
            return False
        self.counters["cmd_touch"] += 1
        off = self.arena.find(parts[1], now)
        if off:
            self.arena.touch(off, exptime)
        self.counters["touch_hits" if off else "touch_misses"] += 1
        if not noreply:
            out.append(TOUCHED if off else NOT_FOUND)
        return False

    def _flush_all(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        noreply = parts[-1] == _NOREPLY
        args = parts[1 : len(parts) - noreply]
        try:
            delay = int(args[0]) if args else 0
        except ValueError:
            out.append(BAD_FORMAT)
            return False
        if len(args) > 1:
            out.append(ERROR)
            return False
        self.counters["cmd_flush"] += 1
        self.arena.flush(expiry(delay, now) if delay > 0 else now, now)
        if not noreply:
            out.append(OK)
        return False

    def _version(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        out.append(b"VERSION " + self.version + _CRLF)
        return False

    def _verbosity(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        if parts[-1] != _NOREPLY:
            out.append(OK)
        return False

    def _quit(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        return True

    def stats(self, now: float) -> list[tuple[str, int | str]]:
        """The ``stats`` rows, in memcached's names."""
        arena = self.arena
        rows: list[tuple[str, int | str]] = [
            ("pid", os.getpid()),
            ("uptime", int(now - self.started)),
            ("time", int(now)),
            ("version", self.version.decode()),
            ("pointer_size", 64),
            ("threads", 1),
        ]
        rows += self.server_stats()
        rows += self.counters.items()
        rows += [
            ("curr_items", arena.curr_items),
            ("total_items", arena.total_items),
            ("bytes", arena.bytes_used),
            ("limit_maxbytes", arena.memory),
            ("evictions", arena.evictions),
            ("arena_recovered", int(arena.recovered)),
        ]
        return rows

    def _stats(self, parts: list[bytes], out: list[bytes], now: int) -> bool:
        what = parts[1] if len(parts) > 1 else b""
        rows: list[tuple[str, int | str]]
        if not what:
            rows = self.stats(time.time())
        elif what == b"settings":
            rows = [
                ("maxbytes", self.arena.memory),
                ("item_size_max", self.arena.max_item),
                ("slab_page_size", self.arena.page_size),
                ("evictions", "on"),
            ]
        elif what in (b"slabs", b"items"):
            rows = []
            for cls, chunk, pages, items in self.arena.slab_stats():
                if what == b"slabs":
                    rows += [(f"{cls}:chunk_size", chunk), (f"{cls}:total_pages", pages)]
                rows.append((f"items:{cls}:number" if what == b"items" else f"{cls}:used", items))
        elif what == b"reset":
            for name in self.counters:
                self.counters[name] = 0
            out.append(b"RESET\r\n")
            return False
        else:
            out.append(ERROR)
            return False
        out.extend(b"STAT %s %s\r\n" % (name.encode(), str(value).encode()) for name, value in rows)
        out.append(END)
        return False
