"""The data the built-in file handlers write into the handover image.

The analog of the kernel's ``include/linux/kho/abi/memfd.h``: what one
handler's serialized state looks like, byte by byte, and nothing about how a
live file is read or checked (that is the handler's job, in
:mod:`liveupdate.core.handlers`). It is ABI: an image written by one version
of luod is read by the next, and ``luoctl inspect`` decodes it without the
core. A layout never changes under its compatible string; a new layout gets
a new one (``socket-v2``).

Every record is little-endian: a fixed header (its first byte the layout
version, :data:`FORMAT_VERSION`, except ``memfd-v1`` which predates it),
then zero or more byte strings, each a ``u16`` length and its bytes.
:class:`HandlerRecord` implements the encoding, the strict decoding (a
:class:`ValueError` naming the compatible for anything malformed: too short,
another version, trailing bytes) and the two descriptions; a record declares
its header and fields only. The layouts themselves are documented on each
record class and in ``docs/concepts/handlers.md``.
"""

from __future__ import annotations

from typing import Any

from liveupdate.handler_abi.record import FORMAT_VERSION, ByteFields, HandlerRecord, pack_bytes
from liveupdate.handler_abi.records import (
    EventfdRecord,
    FileRecord,
    MemfdRecord,
    PidfdRecord,
    PipeRecord,
    PtyRecord,
)
from liveupdate.handler_abi.socket import SocketRecord, encode_address, format_address

__all__ = [
    "FORMAT_VERSION",
    "RECORDS",
    "ByteFields",
    "EventfdRecord",
    "FileRecord",
    "HandlerRecord",
    "MemfdRecord",
    "PidfdRecord",
    "PipeRecord",
    "PtyRecord",
    "SocketRecord",
    "describe_data",
    "encode_address",
    "format_address",
    "pack_bytes",
]

#: The record type of every built-in compatible string.
RECORDS: dict[str, type[HandlerRecord]] = {
    record.compatible: record
    for record in (
        MemfdRecord,
        SocketRecord,
        PipeRecord,
        EventfdRecord,
        FileRecord,
        PtyRecord,
        PidfdRecord,
    )
}


def describe_data(compatible: str, data: bytes) -> dict[str, Any] | None:
    """What a built-in handler's ``data`` says, for ``luoctl inspect``.

    ``None`` for a compatible string this module does not know (a
    third-party handler's: its layout is its own); ``{"error": reason}``
    when the data is malformed.
    """
    record = RECORDS.get(compatible)
    if record is None:
        return None
    try:
        return record.decode(data).describe_data()
    except ValueError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
