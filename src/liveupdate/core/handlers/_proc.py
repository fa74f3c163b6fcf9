"""What ``/proc/self`` says about an open fd, and small helpers the handlers share.

Handlers identify and describe files through ``/proc/self/fd/N`` (the link
target: a path, ``pipe:[ino]``, ``anon_inode:[eventfd]``...) and
``/proc/self/fdinfo/N`` (``pos``, ``flags`` and per-type lines such as
``eventfd-count`` or ``tty-index``). Both only *read* the kernel's view: none
of these helpers changes the open file (no ``read()``, no ``lseek()`` to a
new position).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Protocol

__all__ = [
    "FORMAT_VERSION",
    "check_header",
    "describe_record",
    "fd_link",
    "fd_link_bytes",
    "fdinfo",
    "open_flags",
    "pack_bytes",
    "unpack_bytes",
]

#: The first byte of every built-in handler's data: the layout's version
#: within its compatible string (a new layout gets a new compatible).
FORMAT_VERSION = 1

_LEN = struct.Struct("<H")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


def fd_link(fd: int) -> str:
    """The target of ``/proc/self/fd/<fd>`` (``""`` when it cannot be read)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fd_link_bytes(fd: int) -> bytes:
    """:func:`fd_link` as raw bytes (paths need not be valid UTF-8)."""
    try:
        return os.readlink(os.fsencode(f"/proc/self/fd/{fd}"))
    except OSError:
        return b""


def fdinfo(fd: int) -> dict[str, str]:
    """The ``key: value`` lines of ``/proc/self/fdinfo/<fd>`` (values stripped).

    Raises :class:`OSError` when the fd is not open.
    """
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        text = f.read()
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in info:
            info[key.strip()] = value.strip()
    return info


def open_flags(info: dict[str, str]) -> int:
    """The open file's status flags from fdinfo's octal ``flags`` line.

    ``O_CLOEXEC`` is dropped: it belongs to the descriptor (luod's own, which
    changes across the re-exec), not to the open file.
    """
    try:
        return int(info.get("flags", "0"), 8) & ~_O_CLOEXEC & 0xFFFFFFFF
    except ValueError:
        return 0


def pack_bytes(raw: bytes) -> bytes:
    """``u16 length`` then the bytes (at most 65535 of them)."""
    if len(raw) > 0xFFFF:
        raise ValueError(f"{len(raw)} bytes do not fit a u16 length")
    return _LEN.pack(len(raw)) + raw


def unpack_bytes(data: bytes, offset: int) -> tuple[bytes, int]:
    """Read a :func:`pack_bytes` field at ``offset``; returns it and the next offset."""
    if offset + _LEN.size > len(data):
        raise ValueError("truncated length field")
    (length,) = _LEN.unpack_from(data, offset)
    start = offset + _LEN.size
    if start + length > len(data):
        raise ValueError(f"truncated field: {length} bytes announced, {len(data) - start} left")
    return data[start : start + length], start + length


def check_header(data: bytes, size: int, compatible: str) -> None:
    """``ValueError`` unless ``data`` has at least ``size`` bytes and version 1."""
    if len(data) < size:
        raise ValueError(f"{compatible} data of {len(data)} bytes, expected at least {size}")
    if data[0] != FORMAT_VERSION:
        raise ValueError(f"{compatible} data format {data[0]}, this version reads {FORMAT_VERSION}")


class _Record(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


class _RecordType(Protocol):
    def of(self, fd: int) -> _Record: ...
    def decode(self, data: bytes) -> _Record: ...


def describe_record(record: _RecordType, fd: int, data: bytes, kind: str) -> dict[str, Any]:
    """``FileHandler.describe`` for handlers whose state is one record type.

    Reads the live file while luod holds it, else the recorded data; a
    listing never fails because one file cannot be inspected.
    """
    try:
        return (record.of(fd) if fd >= 0 else record.decode(data)).to_dict()
    except (OSError, ValueError):
        return {"type": kind}


def decode_record(record: _RecordType, data: bytes) -> Any:
    """``record.decode(data)``, a malformed record being ``EINVAL`` for ``restore``."""
    try:
        return record.decode(data)
    except ValueError as exc:
        raise OSError(errno.EINVAL, str(exc)) from None
