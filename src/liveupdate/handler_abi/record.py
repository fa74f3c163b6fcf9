"""The layout every handler record shares, and its strict codec.

A record is little-endian: a fixed header (its first byte the layout
version, :data:`FORMAT_VERSION`, unless the record predates it), then zero or
more byte strings, each a ``u16`` length and its bytes.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

__all__ = ["FORMAT_VERSION", "ByteFields", "HandlerRecord", "pack_bytes"]

#: The first byte of every versioned record: the layout's version within its
#: compatible string (a new layout gets a new compatible, so this stays 1).
FORMAT_VERSION = 1

_LEN = struct.Struct("<H")


def pack_bytes(raw: bytes) -> bytes:
    """A byte-string field: ``u16 length`` then the bytes (at most 65535)."""
    if len(raw) > 0xFFFF:
        raise ValueError(f"{len(raw)} bytes do not fit a u16 length")
    return _LEN.pack(len(raw)) + raw


class ByteFields:
    """The byte-string fields after a record's header, read in order."""

    def __init__(self, data: bytes, offset: int) -> None:
        self._data = data
        self.offset = offset

    def take(self) -> bytes:
        """The next field; :class:`ValueError` when it is truncated."""
        data, offset = self._data, self.offset
        if offset + _LEN.size > len(data):
            raise ValueError("truncated length field")
        (length,) = _LEN.unpack_from(data, offset)
        start = offset + _LEN.size
        if start + length > len(data):
            raise ValueError(f"truncated field: {length} bytes announced, {len(data) - start} left")
        self.offset = start + length
        return data[start : self.offset]


class HandlerRecord(ABC):
    """One handler's data: a fixed header, then byte-string fields.

    A subclass (a frozen dataclass) declares :attr:`compatible`,
    :attr:`kind`, :attr:`header` and implements :meth:`header_fields`,
    :meth:`from_fields` and :meth:`to_dict`; records with byte strings
    override :meth:`byte_fields` too.
    """

    #: The handler's compatible string (``"pipe-v1"``).
    compatible: ClassVar[str]
    #: The ``type`` of a description when nothing more can be said.
    kind: ClassVar[str]
    #: The fixed header, version byte included when :attr:`versioned`.
    header: ClassVar[struct.Struct]
    #: Whether the header starts with :data:`FORMAT_VERSION`.
    versioned: ClassVar[bool] = True

    @abstractmethod
    def header_fields(self) -> tuple[int, ...]:
        """The header's values in order, without the version byte."""

    def byte_fields(self) -> tuple[bytes, ...]:
        """The byte strings after the header, in order."""
        return ()

    @classmethod
    @abstractmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        """The record of decoded header ``values``; takes its byte strings from ``rest``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The description listings show (``type`` first)."""

    def describe_data(self) -> dict[str, Any]:
        """Everything the data says, for ``luoctl inspect``."""
        return {"version": FORMAT_VERSION, **self.to_dict()}

    def encode(self) -> bytes:
        values = self.header_fields()
        head = (
            self.header.pack(FORMAT_VERSION, *values)
            if self.versioned
            else self.header.pack(*values)
        )
        return head + b"".join(pack_bytes(raw) for raw in self.byte_fields())

    @classmethod
    def decode(cls, data: bytes) -> Self:
        """Parse the record; :class:`ValueError` naming the compatible when malformed."""
        size = cls.header.size
        if len(data) < size:
            raise ValueError(
                f"{cls.compatible} data of {len(data)} bytes, expected at least {size}"
            )
        values = cls.header.unpack_from(data)
        if cls.versioned:
            if values[0] != FORMAT_VERSION:
                raise ValueError(
                    f"{cls.compatible} data format {values[0]}, this version reads {FORMAT_VERSION}"
                )
            values = values[1:]
        rest = ByteFields(data, size)
        try:
            record = cls.from_fields(values, rest)
        except ValueError as exc:
            raise ValueError(f"{cls.compatible} data: {exc}") from None
        if rest.offset == size < len(data):
            raise ValueError(f"{cls.compatible} data of {len(data)} bytes, expected {size}")
        if rest.offset != len(data):
            raise ValueError(f"{cls.compatible} data has {len(data) - rest.offset} trailing bytes")
        return record
