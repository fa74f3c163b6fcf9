"""The records of the built-in handlers of files, pipes, memfds, eventfds, PTYs and pidfds.

Each class documents its layout (little-endian); ``docs/concepts/handlers.md``
has them in tables.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, Self

from liveupdate.handler_abi.record import ByteFields, HandlerRecord

__all__ = [
    "EVENTFD_UNKNOWN_ID",
    "EVENTFD_UNKNOWN_SEMAPHORE",
    "FILE_DIRECTORY",
    "FILE_KINDS",
    "FILE_REGULAR",
    "PIPE_ENDS",
    "EventfdRecord",
    "FileRecord",
    "MemfdRecord",
    "PidfdRecord",
    "PipeRecord",
    "PtyRecord",
]


@dataclass(frozen=True)
class MemfdRecord(HandlerRecord):
    """``memfd-v1``: ``u64 size, u64 position, u32 seals`` at freeze (no version byte).

    Informational: the inherited fd *is* the file.
    """

    compatible = "memfd-v1"
    kind = "memfd"
    header = struct.Struct("<QQI")
    versioned = False

    size: int
    position: int
    seals: int

    def header_fields(self) -> tuple[int, ...]:
        return (self.size, self.position, self.seals)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        return cls(*values)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "memfd", "size": self.size}

    def describe_data(self) -> dict[str, Any]:
        return {"type": "memfd", "size": self.size, "position": self.position, "seals": self.seals}


@dataclass(frozen=True)
class PidfdRecord(HandlerRecord):
    """``pidfd-v1``: ``u8 version, u8 0, u16 0, s32 pid, u32 open flags``.

    ``pid`` is fdinfo's: -1 once reaped, 0 outside luod's pid namespace.
    """

    compatible = "pidfd-v1"
    kind = "pidfd"
    header = struct.Struct("<BBHiI")

    pid: int
    flags: int

    def header_fields(self) -> tuple[int, ...]:
        return (0, 0, self.pid, self.flags)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        _r1, _r2, pid, flags = values
        return cls(pid, flags)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pidfd", "pid": self.pid, "nonblock": bool(self.flags & os.O_NONBLOCK)}

    def describe_data(self) -> dict[str, Any]:
        return {**super().describe_data(), "flags": self.flags}


@dataclass(frozen=True)
class PtyRecord(HandlerRecord):
    """``pty-v1``: ``u8 version, u8 0, u16 0, u32 pts index, u32 open flags``."""

    compatible = "pty-v1"
    kind = "pty"
    header = struct.Struct("<BBHII")

    index: int
    flags: int

    def header_fields(self) -> tuple[int, ...]:
        return (0, 0, self.index, self.flags)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        _r1, _r2, index, flags = values
        return cls(index, flags)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "pty", "pts": self.index, "path": f"/dev/pts/{self.index}"}

    def describe_data(self) -> dict[str, Any]:
        return {**super().describe_data(), "flags": self.flags}


#: ``EventfdRecord.id`` when the kernel does not show it.
EVENTFD_UNKNOWN_ID = 0xFFFF_FFFF_FFFF_FFFF
#: ``EventfdRecord.semaphore`` when the kernel does not show it.
EVENTFD_UNKNOWN_SEMAPHORE = 0xFF


@dataclass(frozen=True)
class EventfdRecord(HandlerRecord):
    """``eventfd-v1``: ``u8 version, u8 semaphore (0, 1, 255 unknown), u16 0,
    u32 open flags, u64 counter, u64 eventfd id (2**64-1 unknown)``."""

    compatible = "eventfd-v1"
    kind = "eventfd"
    header = struct.Struct("<BBHIQQ")

    count: int
    flags: int
    semaphore: int
    id: int

    def header_fields(self) -> tuple[int, ...]:
        return (self.semaphore, 0, self.flags, self.count, self.id)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        semaphore, _reserved, flags, count, id_ = values
        return cls(count, flags, semaphore, id_)

    def to_dict(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "type": "eventfd",
            "count": self.count,
            "flags": self.flags,
            "nonblock": bool(self.flags & os.O_NONBLOCK),
        }
        if self.semaphore != EVENTFD_UNKNOWN_SEMAPHORE:
            desc["semaphore"] = bool(self.semaphore)
        if self.id != EVENTFD_UNKNOWN_ID:
            desc["id"] = self.id
        return desc


PIPE_ENDS = {os.O_RDONLY: "read", os.O_WRONLY: "write", os.O_RDWR: "read-write"}


@dataclass(frozen=True)
class PipeRecord(HandlerRecord):
    """``pipe-v1``: ``u8 version, u8 access mode, u8 named, u8 0, u32 queued
    bytes, u32 capacity, u64 inode``, then the ``/proc/self/fd`` link."""

    compatible = "pipe-v1"
    kind = "pipe"
    header = struct.Struct("<BBBBIIQ")

    accmode: int
    named: bool
    queued: int
    capacity: int
    inode: int
    link: bytes

    def header_fields(self) -> tuple[int, ...]:
        queued, capacity = min(self.queued, 0xFFFFFFFF), min(self.capacity, 0xFFFFFFFF)
        return (self.accmode, int(self.named), 0, queued, capacity, self.inode)

    def byte_fields(self) -> tuple[bytes, ...]:
        return (self.link,)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        accmode, named, _reserved, queued, capacity, inode = values
        if accmode not in PIPE_ENDS or named not in (0, 1):
            raise ValueError(f"access mode {accmode}, named {named}")
        return cls(accmode, bool(named), queued, capacity, inode, rest.take())

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "fifo" if self.named else "pipe",
            "end": PIPE_ENDS.get(self.accmode, str(self.accmode)),
            "path": self.link.decode("utf-8", "backslashreplace"),
            "size": self.queued,
            "capacity": self.capacity,
            "inode": self.inode,
        }


FILE_REGULAR = 1
FILE_DIRECTORY = 2
FILE_KINDS = {FILE_REGULAR: "file", FILE_DIRECTORY: "directory"}


@dataclass(frozen=True)
class FileRecord(HandlerRecord):
    """``file-v1``: ``u8 version, u8 kind (1 file, 2 directory), u16 0, u32
    open flags, u64 position, u64 st_dev, u64 st_ino``, then the path."""

    compatible = "file-v1"
    kind = "file"
    header = struct.Struct("<BBHIQQQ")

    file_kind: int
    flags: int
    position: int
    dev: int
    inode: int
    path: bytes

    def header_fields(self) -> tuple[int, ...]:
        return (self.file_kind, 0, self.flags, self.position, self.dev, self.inode)

    def byte_fields(self) -> tuple[bytes, ...]:
        return (self.path,)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        file_kind, _reserved, flags, position, dev, inode = values
        if file_kind not in FILE_KINDS:
            raise ValueError(f"unknown kind {file_kind}")
        return cls(file_kind, flags, position, dev, inode, rest.take())

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": FILE_KINDS.get(self.file_kind, str(self.file_kind)),
            "path": self.path.decode("utf-8", "backslashreplace"),
            "position": self.position,
            "flags": self.flags,
            "dev": self.dev,
            "inode": self.inode,
        }
