"""The record of the built-in socket handler (``socket-v1``) and its address bytes."""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Self

from liveupdate.handler_abi.record import ByteFields, HandlerRecord

__all__ = [
    "ACCEPTED_SOCKETS",
    "SOCKET_HAS_PEER",
    "SOCKET_LISTENING",
    "SocketRecord",
    "encode_address",
    "format_address",
]

SOCKET_LISTENING = 0x01
SOCKET_HAS_PEER = 0x02
_INET = struct.Struct("<H")
_INET6 = struct.Struct("<HII")
_FAMILIES: dict[int, str] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
}
_TYPES: dict[int, str] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "dgram",
    socket.SOCK_SEQPACKET: "seqpacket",
}

#: (family, type, protocol) -> short name, for every kind ``socket-v1`` takes.
ACCEPTED_SOCKETS: dict[tuple[int, int, int], str] = {
    (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP): "tcp",
    (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP): "tcp6",
    (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP): "udp",
    (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP): "udp6",
    (socket.AF_UNIX, socket.SOCK_STREAM, 0): "unix-stream",
    (socket.AF_UNIX, socket.SOCK_DGRAM, 0): "unix-dgram",
    (socket.AF_UNIX, socket.SOCK_SEQPACKET, 0): "unix-seqpacket",
}


def encode_address(family: int, addr: Any) -> bytes:
    """The ``socket-v1`` bytes of an address as Python's ``getsockname`` returns it.

    ``AF_INET``: ``u16 port`` then 4 address bytes; ``AF_INET6``: ``u16
    port, u32 flowinfo, u32 scope_id`` then 16 address bytes; ``AF_UNIX``:
    the ``sun_path`` bytes (a path, an abstract name starting with NUL, or
    nothing for an unnamed socket).
    """
    if family == socket.AF_INET:
        host, port = addr
        return _INET.pack(port) + socket.inet_pton(socket.AF_INET, host)
    if family == socket.AF_INET6:
        host, port, flowinfo, scope_id = addr
        # Python may append "%scope" to a link-local host; the id is kept apart.
        host = host.partition("%")[0]
        return _INET6.pack(port, flowinfo, scope_id) + socket.inet_pton(socket.AF_INET6, host)
    if family == socket.AF_UNIX:
        return addr if isinstance(addr, bytes) else os.fsencode(addr)
    raise ValueError(f"address family {family} is not supported by socket-v1")


def format_address(family: int, raw: bytes) -> str:
    """A readable form of ``socket-v1`` address bytes.

    ``1.2.3.4:80``, ``[::1]:80`` (``[fe80::1%2]:80`` with a scope), a Unix
    path, ``@name`` for an abstract name (NUL bytes shown as ``\\x00``), and
    ``""`` for an unnamed Unix socket.
    """
    if family == socket.AF_INET:
        if len(raw) != _INET.size + 4:
            raise ValueError(f"AF_INET address of {len(raw)} bytes")
        (port,) = _INET.unpack_from(raw)
        return f"{socket.inet_ntop(socket.AF_INET, raw[_INET.size :])}:{port}"
    if family == socket.AF_INET6:
        if len(raw) != _INET6.size + 16:
            raise ValueError(f"AF_INET6 address of {len(raw)} bytes")
        port, _flowinfo, scope_id = _INET6.unpack_from(raw)
        host = socket.inet_ntop(socket.AF_INET6, raw[_INET6.size :])
        scope = f"%{scope_id}" if scope_id else ""
        return f"[{host}{scope}]:{port}"
    if family == socket.AF_UNIX:
        if raw[:1] == b"\0":
            name = raw[1:].decode("utf-8", "backslashreplace").replace("\0", "\\x00")
            return "@" + name
        return raw.decode("utf-8", "backslashreplace")
    raise ValueError(f"address family {family} is not supported by socket-v1")


@dataclass(frozen=True)
class SocketRecord(HandlerRecord):
    """``socket-v1``: ``u8 version, u8 flags (0x01 listening, 0x02 peer), u16
    family, u16 type, u16 protocol, u64 inode``, then the local address and,
    with flag 0x02 only, the peer's (see :func:`encode_address`)."""

    compatible = "socket-v1"
    kind = "socket"
    header = struct.Struct("<BBHHHQ")

    family: int
    type: int
    protocol: int
    listening: bool
    inode: int
    local: bytes
    peer: bytes | None

    def header_fields(self) -> tuple[int, ...]:
        flags = (SOCKET_LISTENING if self.listening else 0) | (
            SOCKET_HAS_PEER if self.peer is not None else 0
        )
        return (flags, self.family, self.type, self.protocol, self.inode)

    def byte_fields(self) -> tuple[bytes, ...]:
        return (self.local,) if self.peer is None else (self.local, self.peer)

    @classmethod
    def from_fields(cls, values: tuple[int, ...], rest: ByteFields) -> Self:
        flags, family, type_, proto, inode = values
        if flags & ~(SOCKET_LISTENING | SOCKET_HAS_PEER):
            raise ValueError(f"unknown flags {flags:#x}")
        local = rest.take()
        peer = rest.take() if flags & SOCKET_HAS_PEER else None
        return cls(family, type_, proto, bool(flags & SOCKET_LISTENING), inode, local, peer)

    @property
    def socket_kind(self) -> str:
        """``tcp``, ``udp6``, ``unix-seqpacket``... (numbers for an unknown kind)."""
        triple = (self.family, self.type, self.protocol)
        return ACCEPTED_SOCKETS.get(triple, f"{self.family}/{self.type}/{self.protocol}")

    def to_dict(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "type": "socket",
            "socket": self.socket_kind,
            "family": _FAMILIES.get(self.family, str(self.family)),
            "socktype": _TYPES.get(self.type, str(self.type)),
            "protocol": self.protocol,
            "listening": self.listening,
            "inode": self.inode,
            "address": format_address(self.family, self.local),
        }
        if self.peer is not None:
            desc["peer"] = format_address(self.family, self.peer)
        return desc
