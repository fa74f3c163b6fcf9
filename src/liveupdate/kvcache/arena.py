"""The item arena: every byte of the cache in one memfd, the index included.

Everything a process needs to serve is inside the file, so a new process
(an update, a restart after a crash) ``mmap``s it and serves at once: there
is no index to rebuild and nothing to load, whatever the cache's size. The
layout (little-endian; offsets are bytes from the start of the file, 0 is
"none")::

    header (4 KiB)   magic, geometry, counters, one row per slab class
    page map         one byte per slab page: its class + 1 (0: not assigned yet)
    index            nbuckets x u64: the first item of each hash chain
    slab pages       page_size bytes each, cut into equal chunks per class

An item is one chunk: a 52-byte header (hash chain link, LRU links, cas,
expiry, flags, value length, checksum, key length, class, live byte), the key,
then the value. Slab classes have chunk sizes growing by 1.25x; a class gets
pages one at a time as it fills and, once every page is assigned, reuses the
chunk of its least recently used item (LRU eviction, per class, as memcached
does). Free chunks are chained through their LRU ``next`` field.

Crash consistency (a checksum per item and a dirty marker): a process that
opens the arena marks it in use and marks it clean again only when it hands
over or stops in order. An item's live byte is written last, after its
header, key and value, and covered by a CRC-32 of its cas, flags, lengths,
key and value. A process that finds the arena in use (its predecessor was
killed, possibly in the middle of a ``set``) does not trust the index or the
links: it rebuilds them from the slab pages, keeping every live chunk whose
checksum matches (the newest when a key appears twice) and freeing the rest.
That scan is the one cost that grows with the cache, and only a crash pays it.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "ITEM_HEADER",
    "MAX_KEY",
    "Arena",
    "ArenaError",
    "FaultHook",
    "ItemView",
]

MAGIC = b"KVCACHE\x01"
#: A key's most bytes (the memcached protocol's limit).
MAX_KEY = 250

# The header's fields, after the magic.
_HEADER = struct.Struct("<8sII" + "Q" * 18)
_HEADER_SIZE = 4096
_CLASSES_AT = 256
#: A class row: chunk size, LRU head, LRU tail, free list, items, pages, carve point, carve end.
_CLASS = struct.Struct("<8Q")
_MAX_CLASSES = (_HEADER_SIZE - _CLASSES_AT) // _CLASS.size
_Q = struct.Struct("<Q")
_I = struct.Struct("<I")

STATE_CLEAN = 0
STATE_IN_USE = 1

# Offsets of the header's mutable u64 fields.
_STATE = 12
_CAS = 88
_CURR_ITEMS = 96
_BYTES = 104
_EVICTIONS = 112
_TOTAL_ITEMS = 120
_FLUSH_CAS = 128
_FLUSH_AT = 136
_PAGES_USED = 48

#: An item's header: hash next, LRU prev, LRU next, cas, exptime, flags,
#: value length, CRC-32, key length, class, live, pad.
ITEM_HEADER = struct.Struct("<QQQQIIIIBBBx")
_H_NEXT = 0
_PREV = 8
_NEXT = 16
_CAS_AT = 24
_EXP = 32
_NBYTES = 40
_CRC = 44
_LIVE = 50
_HDR = ITEM_HEADER.size
#: What the checksum covers besides key and value.
_META = struct.Struct("<QIIB")
#: cas, exptime, flags, value length, (checksum skipped), key length: from offset 24.
_ITEM_READ = struct.Struct("<QIII4xB")

_FIRST_CHUNK = 64
_GROWTH = 1.25


class ArenaError(Exception):
    """The file is not an arena, or not one this version can use."""


#: Called at each step of a ``set`` (``"value"``: half the value written,
#: ``"link"``: the new item linked, the old not yet unlinked). Tests use it to
#: kill the process there (``KVCACHE_FAULT``).
FaultHook = Callable[[str], None]


@dataclass(frozen=True)
class ItemView:
    """One item as read from the arena (a copy)."""

    key: bytes
    value: bytes
    flags: int
    exptime: int
    cas: int


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _chunk_sizes(page_size: int) -> list[int]:
    sizes: list[int] = []
    size = _FIRST_CHUNK
    while size < page_size and len(sizes) < _MAX_CLASSES - 1:
        sizes.append(size)
        size = _round_up(int(size * _GROWTH), 8)
    sizes.append(page_size)
    return sizes


def page_size_for(memory: int, max_item: int) -> int:
    """Slab page size: 1 MiB like memcached, smaller for a small cache (16 pages at least)."""
    page = min(1 << 20, max(64 << 10, memory // 16))
    if max_item <= 0:
        return page
    return _round_up(max(page, max_item + _HDR + MAX_KEY), 4096)


class Arena:
    """A cache arena mapped from a memfd (or any shmem file)."""

    def __init__(self, fd: int, fault: FaultHook | None = None) -> None:
        """Map an arena made by :meth:`create`; rebuild its index if it was left in use.

        ``fd`` stays the caller's; the mapping holds its own reference.
        """
        size = os.fstat(fd).st_size
        if size < _HEADER_SIZE:
            raise ArenaError(f"fd {fd}: {size} bytes, too small for an arena")
        self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mv = memoryview(self.mm)
        fields = _HEADER.unpack_from(self.mm, 0)
        if fields[0] != MAGIC:
            self.close(clean=False)
            raise ArenaError(f"fd {fd}: not a kvcache arena (magic {fields[0]!r})")
        (
            _magic,
            _version,
            state,
            self.size,
            self.memory,
            self.page_size,
            self.npages,
            _used,
            self.nbuckets,
            self.index_at,
            self.pagemap_at,
            self.pages_at,
            *_rest,
        ) = fields
        self.max_item = self.page_size - _HDR - MAX_KEY
        self.mask = self.nbuckets - 1
        self.chunk_sizes = [
            _CLASS.unpack_from(self.mm, _CLASSES_AT + i * _CLASS.size)[0]
            for i in range(_MAX_CLASSES)
        ]
        self.chunk_sizes = [s for s in self.chunk_sizes if s]
        self.fault = fault
        #: Whether opening found the arena left in use (and rebuilt it).
        self.recovered = state != STATE_CLEAN
        if self.recovered:
            self.rebuild()
        _I.pack_into(self.mm, _STATE, STATE_IN_USE)

    @classmethod
    def create(cls, memory: int, max_item: int = 0, name: str = "kvcache-arena") -> int:
        """A new memfd laid out as an empty arena with ``memory`` bytes of slab pages.

        ``max_item``: the largest value to fit (0: as large as a page allows).
        """
        page_size = page_size_for(memory, max_item)
        npages = max(1, memory // page_size)
        nbuckets = 1 << max(10, (max(1, memory // 128) - 1).bit_length())
        pagemap_at = _HEADER_SIZE
        index_at = _round_up(pagemap_at + npages, 4096)
        pages_at = _round_up(index_at + nbuckets * 8, 4096)
        size = pages_at + npages * page_size
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, _HEADER_SIZE) as mm:
                _HEADER.pack_into(
                    mm, 0, MAGIC, 1, STATE_CLEAN, size, npages * page_size, page_size,
                    npages, 0, nbuckets, index_at, pagemap_at, pages_at, *([0] * 9),
                )  # fmt: skip
                for i, chunk in enumerate(_chunk_sizes(page_size)):
                    _CLASS.pack_into(mm, _CLASSES_AT + i * _CLASS.size, chunk, 0, 0, 0, 0, 0, 0, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def mark_clean(self) -> None:
        """Mark the arena consistent for the next process (no store may follow)."""
        _I.pack_into(self.mm, _STATE, STATE_CLEAN)

    def close(self, clean: bool = True) -> None:
        """Unmap; ``clean`` marks the arena consistent for the next process.

        Unmapping a written mapping costs time in proportion to its size
        (about 45 ms per GiB here): a hand-over marks the arena clean and
        lets the successor go first, and unmaps only afterwards.
        """
        if clean:
            self.mark_clean()
        self.mv.release()
        self.mm.close()

    # -- counters ----------------------------------------------------------------------

    def _get(self, at: int) -> int:
        return int(_Q.unpack_from(self.mm, at)[0])

    def _add(self, at: int, delta: int) -> None:
        _Q.pack_into(self.mm, at, _Q.unpack_from(self.mm, at)[0] + delta)

    @property
    def curr_items(self) -> int:
        return self._get(_CURR_ITEMS)

    @property
    def bytes_used(self) -> int:
        return self._get(_BYTES)

    @property
    def evictions(self) -> int:
        return self._get(_EVICTIONS)

    @property
    def total_items(self) -> int:
        return self._get(_TOTAL_ITEMS)

    @property
    def last_cas(self) -> int:
        """The cas of the latest store: every store advances it, nothing else does."""
        return self._get(_CAS)

    @property
    def clean(self) -> bool:
        return int(_I.unpack_from(self.mm, _STATE)[0]) == STATE_CLEAN

    def flush(self, at: int, now: int) -> None:
        """Invalidate every item stored so far, now (``at`` <= now) or at time ``at``."""
        if at <= now:
            _Q.pack_into(self.mm, _FLUSH_CAS, self._get(_CAS))
            _Q.pack_into(self.mm, _FLUSH_AT, 0)
        else:
            _Q.pack_into(self.mm, _FLUSH_AT, at)

    # -- lookups -----------------------------------------------------------------------

    def _bucket(self, key: bytes) -> int:
        return int(self.index_at + (zlib.crc32(key) & self.mask) * 8)

    def _find(self, key: bytes) -> int:
        mm = self.mm
        nkey = len(key)
        off = _Q.unpack_from(mm, self._bucket(key))[0]
        while off:
            if mm[off + 48] == nkey and mm[off + _HDR : off + _HDR + nkey] == key:
                return int(off)
            off = _Q.unpack_from(mm, off)[0]
        return 0

    def _dead(self, off: int, now: int) -> bool:
        cas, exptime, _flags, _nbytes, _nkey = _ITEM_READ.unpack_from(self.mm, off + _CAS_AT)
        if exptime and exptime <= now:
            return True
        flush_at = _Q.unpack_from(self.mm, _FLUSH_AT)[0]
        if flush_at and flush_at <= now:
            self.flush(flush_at, now)
        return bool(cas <= _Q.unpack_from(self.mm, _FLUSH_CAS)[0])

    def find(self, key: bytes, now: int) -> int:
        """The live item for ``key`` (its offset), or 0; reaps it if expired or flushed."""
        off = self._find(key)
        if off and self._dead(off, now):
            self._remove(off)
            return 0
        return off

    def read(self, off: int) -> tuple[int, int, int, int, int]:
        """``(flags, nbytes, cas, exptime, value offset)`` of the item at ``off``."""
        cas, exptime, flags, nbytes, nkey = _ITEM_READ.unpack_from(self.mm, off + _CAS_AT)
        return flags, nbytes, cas, exptime, off + _HDR + nkey

    def bump(self, off: int) -> None:
        """Mark the item most recently used."""
        row = _CLASSES_AT + self.mm[off + 49] * _CLASS.size
        if _Q.unpack_from(self.mm, row + 8)[0] != off:
            self._lru_unlink(off, row)
            self._lru_push(off, row)

    def touch(self, off: int, exptime: int) -> None:
        _I.pack_into(self.mm, off + _EXP, exptime)

    def delete(self, key: bytes, now: int) -> bool:
        off = self.find(key, now)
        if off:
            self._remove(off)
        return bool(off)

    # -- storing -----------------------------------------------------------------------

    def class_for(self, total: int) -> int:
        """The slab class whose chunks fit ``total`` bytes (header included), or -1."""
        for i, size in enumerate(self.chunk_sizes):
            if total <= size:
                return i
        return -1

    def store(self, key: bytes, flags: int, exptime: int, value: bytes | memoryview) -> int:
        """Store ``key`` (replacing its item); its cas, or 0 when there is no room.

        The new item is written whole, then marked live and linked into its
        hash chain, then the old item is unlinked: a crash at any point leaves
        either the old item or the new one (see the module's notes).
        """
        mm = self.mm
        nkey = len(key)
        nbytes = len(value)
        cls = self.class_for(_HDR + nkey + nbytes)
        if cls < 0:
            return 0
        row = _CLASSES_AT + cls * _CLASS.size
        off = self._alloc(row, cls)
        if not off:
            return 0
        cas = _Q.unpack_from(mm, _CAS)[0] + 1
        _Q.pack_into(mm, _CAS, cas)
        crc = zlib.crc32(value, zlib.crc32(key, zlib.crc32(_META.pack(cas, flags, nbytes, nkey))))
        ITEM_HEADER.pack_into(mm, off, 0, 0, 0, cas, exptime, flags, nbytes, crc, nkey, cls, 0)
        at = off + _HDR
        mm[at : at + nkey] = key
        at += nkey
        if self.fault is not None:
            half = nbytes // 2
            mm[at : at + half] = value[:half]
            self.fault("value")
            mm[at + half : at + nbytes] = value[half:]
        else:
            mm[at : at + nbytes] = value
        old = self._find(key)
        mm[off + _LIVE] = 1
        bucket = self._bucket(key)
        _Q.pack_into(mm, off, _Q.unpack_from(mm, bucket)[0])
        _Q.pack_into(mm, bucket, off)
        if self.fault is not None:
            self.fault("link")
        if old:
            self._remove(old)
        self._lru_push(off, row)
        self._count(off, 1)
        self._add(_TOTAL_ITEMS, 1)
        return int(cas)

    def _count(self, off: int, sign: int) -> None:
        row = _CLASSES_AT + self.mm[off + 49] * _CLASS.size
        self._add(row + 32, sign)
        self._add(_CURR_ITEMS, sign)
        nbytes = _I.unpack_from(self.mm, off + _NBYTES)[0]
        self._add(_BYTES, sign * (_HDR + self.mm[off + 48] + nbytes))

    def _alloc(self, row: int, cls: int) -> int:
        mm = self.mm
        chunk, _head, tail, free, _n, _pages, carve, carve_end = _CLASS.unpack_from(mm, row)
        if free:
            _Q.pack_into(mm, row + 24, _Q.unpack_from(mm, free + _NEXT)[0])
            return int(free)
        if carve + chunk > carve_end:
            used = _Q.unpack_from(mm, _PAGES_USED)[0]
            if used < self.npages:
                _Q.pack_into(mm, _PAGES_USED, used + 1)
                mm[self.pagemap_at + used] = cls + 1
                carve = self.pages_at + used * self.page_size
                _Q.pack_into(mm, row + 56, carve + self.page_size)
                self._add(row + 40, 1)
                carve_end = carve + self.page_size
        if carve and carve + chunk <= carve_end:
            _Q.pack_into(mm, row + 48, carve + chunk)
            return int(carve)
        if tail:
            self._remove(tail, free_it=False)
            self._add(_EVICTIONS, 1)
            return int(tail)
        return 0

    def _remove(self, off: int, free_it: bool = True) -> None:
        """Unlink the item from its chain and its LRU, then free its chunk."""
        mm = self.mm
        nkey = mm[off + 48]
        at = self._bucket(bytes(mm[off + _HDR : off + _HDR + nkey]))
        while (cur := _Q.unpack_from(mm, at)[0]) and cur != off:
            at = cur  # a chain link is an item's first field
        if cur:
            _Q.pack_into(mm, at, _Q.unpack_from(mm, off)[0])
        mm[off + _LIVE] = 0
        row = _CLASSES_AT + mm[off + 49] * _CLASS.size
        self._lru_unlink(off, row)
        self._count(off, -1)
        if free_it:
            _Q.pack_into(mm, off + _NEXT, _Q.unpack_from(mm, row + 24)[0])
            _Q.pack_into(mm, row + 24, off)

    def _lru_unlink(self, off: int, row: int) -> None:
        mm = self.mm
        prev, nxt = struct.unpack_from("<QQ", mm, off + _PREV)
        if prev:
            _Q.pack_into(mm, prev + _NEXT, nxt)
        else:
            _Q.pack_into(mm, row + 8, nxt)
        if nxt:
            _Q.pack_into(mm, nxt + _PREV, prev)
        else:
            _Q.pack_into(mm, row + 16, prev)

    def _lru_push(self, off: int, row: int) -> None:
        mm = self.mm
        head = _Q.unpack_from(mm, row + 8)[0]
        struct.pack_into("<QQ", mm, off + _PREV, 0, head)
        if head:
            _Q.pack_into(mm, head + _PREV, off)
        else:
            _Q.pack_into(mm, row + 16, off)
        _Q.pack_into(mm, row + 8, off)

    # -- whole-arena walks -------------------------------------------------------------

    def _chunks(self) -> Iterator[tuple[int, int, int]]:
        """``(offset, class, row)`` of every carved chunk of every assigned page."""
        mm = self.mm
        for page in range(_Q.unpack_from(mm, _PAGES_USED)[0]):
            cls = mm[self.pagemap_at + page] - 1
            if cls < 0 or cls >= len(self.chunk_sizes):
                continue
            row = _CLASSES_AT + cls * _CLASS.size
            chunk, _h, _t, _f, _n, _p, carve, carve_end = _CLASS.unpack_from(mm, row)
            start = self.pages_at + page * self.page_size
            end = start + self.page_size - chunk + 1
            if start < carve_end <= start + self.page_size:
                end = carve  # the class's current page: carved up to here
            yield from ((off, cls, row) for off in range(start, end, chunk))

    def _intact(self, off: int) -> bool:
        mm = self.mm
        cas, _exp, flags, nbytes, nkey = _ITEM_READ.unpack_from(mm, off + _CAS_AT)
        chunk = self.chunk_sizes[mm[off + 49]]
        if mm[off + _LIVE] != 1 or not nkey or _HDR + nkey + nbytes > chunk:
            return False
        body = self.mv[off + _HDR : off + _HDR + nkey + nbytes]
        crc = zlib.crc32(body, zlib.crc32(_META.pack(cas, flags, nbytes, nkey)))
        return bool(crc == _I.unpack_from(mm, off + _CRC)[0])

    def rebuild(self) -> tuple[int, int]:
        """Rebuild index, LRU lists, free lists and counters from the slab pages.

        Returns ``(items kept, chunks dropped)``: a chunk marked live whose
        checksum does not match (torn), or an older copy of a key, is dropped.
        """
        mm = self.mm
        mm[self.index_at : self.index_at + self.nbuckets * 8] = bytes(self.nbuckets * 8)
        for i in range(len(self.chunk_sizes)):
            row = _CLASSES_AT + i * _CLASS.size
            struct.pack_into("<QQQQ", mm, row + 8, 0, 0, 0, 0)
        for at in (_CURR_ITEMS, _BYTES):
            _Q.pack_into(mm, at, 0)
        live: list[tuple[int, int]] = []
        dropped = 0
        for off, cls, row in self._chunks():
            if mm[off + 49] == cls and self._intact(off):
                live.append((_Q.unpack_from(mm, off + _CAS_AT)[0], off))
                continue
            dropped += mm[off + _LIVE] == 1
            mm[off + 49] = cls
            mm[off + _LIVE] = 0
            _Q.pack_into(mm, off + _NEXT, _Q.unpack_from(mm, row + 24)[0])
            _Q.pack_into(mm, row + 24, off)
        live.sort(reverse=True)  # newest first: it wins over an older copy of its key
        kept: list[int] = []
        for _cas, off in live:
            nkey = mm[off + 48]
            key = bytes(mm[off + _HDR : off + _HDR + nkey])
            row = _CLASSES_AT + mm[off + 49] * _CLASS.size
            if self._find(key):
                dropped += 1
                mm[off + _LIVE] = 0
                _Q.pack_into(mm, off + _NEXT, _Q.unpack_from(mm, row + 24)[0])
                _Q.pack_into(mm, row + 24, off)
                continue
            bucket = self._bucket(key)
            _Q.pack_into(mm, off, _Q.unpack_from(mm, bucket)[0])
            _Q.pack_into(mm, bucket, off)
            kept.append(off)
        for off in reversed(kept):  # oldest pushed first: the newest ends at the head
            self._lru_push(off, _CLASSES_AT + mm[off + 49] * _CLASS.size)
            self._count(off, 1)
        if live:
            _Q.pack_into(mm, _CAS, max(self._get(_CAS), live[0][0]))
        return len(kept), dropped

    def items(self, now: int | None = None) -> Iterator[ItemView]:
        """Every item, least recently used first in each class (copies).

        With ``now``, only those not expired or flushed by then. Storing them
        again in this order rebuilds the same LRU order.
        """
        mm = self.mm
        for i in range(len(self.chunk_sizes)):
            off = _Q.unpack_from(mm, _CLASSES_AT + i * _CLASS.size + 16)[0]
            while off:
                if now is not None and self._dead(off, now):
                    off = _Q.unpack_from(mm, off + _PREV)[0]
                    continue
                flags, nbytes, cas, exptime, at = self.read(off)
                nkey = mm[off + 48]
                yield ItemView(
                    bytes(mm[off + _HDR : off + _HDR + nkey]),
                    bytes(mm[at : at + nbytes]),
                    flags,
                    exptime,
                    cas,
                )
                off = _Q.unpack_from(mm, off + _PREV)[0]

    def slab_stats(self) -> list[tuple[int, int, int, int]]:
        """``(class, chunk size, pages, items)`` of each class that has pages."""
        rows = []
        for i, chunk in enumerate(self.chunk_sizes):
            row = _CLASSES_AT + i * _CLASS.size
            _c, _h, _t, _f, items, pages, _cv, _ce = _CLASS.unpack_from(self.mm, row)
            if pages:
                rows.append((i, chunk, pages, items))
        return rows
