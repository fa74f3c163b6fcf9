"""The save file of a standalone kvcache (``--save-file``): every item, written at a stop.

The "restart with the state saved to a file" way the benchmark compares
liveupdate with: a SIGTERM writes every live item to the file (a temporary
file renamed over it, so a crash mid-save leaves the previous one); a start
loads it when it exists. Items come out least recently used first, so
loading them in order rebuilds the same LRU order.

Format: ``KVSAVE\\0\\1``, then per item ``u32 exptime, u32 flags, u32 value
length, u8 key length`` (little-endian), the key and the value.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from liveupdate.kvcache.arena import Arena

__all__ = ["MAGIC", "load", "save"]

MAGIC = b"KVSAVE\x00\x01"
_RECORD = struct.Struct("<IIIB")


def save(arena: Arena, path: str | Path, now: int) -> int:
    """Write every item of ``arena`` still live at ``now`` to ``path``; how many."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb", buffering=1 << 20) as f:
        f.write(MAGIC)
        for item in arena.items(now):
            f.write(_RECORD.pack(item.exptime, item.flags, len(item.value), len(item.key)))
            f.write(item.key)
            f.write(item.value)
            count += 1
    os.replace(tmp, path)
    return count


def load(arena: Arena, path: str | Path, now: int) -> int:
    """Store every item of the save file at ``path`` that has not expired; how many."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path}: not a kvcache save file")
    view = memoryview(data)
    at = len(MAGIC)
    count = 0
    while at + _RECORD.size <= len(data):
        exptime, flags, nbytes, nkey = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        key = data[at : at + nkey]
        value = view[at + nkey : at + nkey + nbytes]
        at += nkey + nbytes
        if (exptime == 0 or exptime > now) and arena.store(key, flags, exptime, value):
            count += 1
    return count
