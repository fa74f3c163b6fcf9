"""The handler data layouts (``liveupdate.handler_abi``) and the handler base class.

The bytes below were produced by the handlers before they shared
``RecordHandler`` and their records moved to the ABI package: an image
written then must decode the same forever, and a record written now must be
byte for byte what was written then.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from liveupdate import handler_abi
from liveupdate.core.file import PreservedFile, file_key
from liveupdate.core.handlers import builtin_handlers, default_registry
from liveupdate.core.handlers._record import RecordHandler
from liveupdate.handler_abi import (
    EventfdRecord,
    FileRecord,
    HandlerRecord,
    MemfdRecord,
    PidfdRecord,
    PipeRecord,
    PtyRecord,
    SocketRecord,
)

GOLDEN: list[tuple[HandlerRecord, str, dict[str, Any]]] = [
    (
        MemfdRecord(4096, 17, 0x0F),
        "001000000000000011000000000000000f000000",
        {"type": "memfd", "size": 4096, "position": 17, "seals": 15},
    ),
    (
        PidfdRecord(-1, 0o4000),
        "01000000ffffffff00080000",
        {"version": 1, "type": "pidfd", "pid": -1, "nonblock": True, "flags": 2048},
    ),
    (
        PtyRecord(7, 0o2),
        "010000000700000002000000",
        {"version": 1, "type": "pty", "pts": 7, "path": "/dev/pts/7", "flags": 2},
    ),
    (
        EventfdRecord(0x1234, 0o4002, 1, 99),
        "010100000208000034120000000000006300000000000000",
        {
            "version": 1,
            "type": "eventfd",
            "count": 4660,
            "flags": 2050,
            "nonblock": True,
            "semaphore": True,
            "id": 99,
        },
    ),
    (
        EventfdRecord(5, 2, 0xFF, 2**64 - 1),
        "01ff0000020000000500000000000000ffffffffffffffff",
        {"version": 1, "type": "eventfd", "count": 5, "flags": 2, "nonblock": False},
    ),
    (
        PipeRecord(1, True, 5, 65536, 4242, b"/run/fifo (deleted)"),
        "010101000500000000000100921000000000000013002f72756e2f6669666f202864656c6574656429",
        {
            "version": 1,
            "type": "fifo",
            "end": "write",
            "path": "/run/fifo (deleted)",
            "size": 5,
            "capacity": 65536,
            "inode": 4242,
        },
    ),
    (
        FileRecord(2, 0o200000, 0, 2049, 131, b"/var/lib/x"),
        "01020000000001000000000000000000010800000000000083000000000000000a002f7661722f6c69622f78",
        {
            "version": 1,
            "type": "directory",
            "path": "/var/lib/x",
            "position": 0,
            "flags": 65536,
            "dev": 2049,
            "inode": 131,
        },
    ),
    (
        SocketRecord(2, 1, 6, True, 777, bytes.fromhex("50007f000001"), None),
        "01010200010006000903000000000000060050007f000001",
        {
            "version": 1,
            "type": "socket",
            "socket": "tcp",
            "family": "inet",
            "socktype": "stream",
            "protocol": 6,
            "listening": True,
            "inode": 777,
            "address": "127.0.0.1:80",
        },
    ),
    (
        SocketRecord(1, 5, 0, False, 778, b"\0abs", b"/run/peer.sock"),
        "01020100050000000a030000000000000400006162730e002f72756e2f706565722e736f636b",
        {
            "version": 1,
            "type": "socket",
            "socket": "unix-seqpacket",
            "family": "unix",
            "socktype": "seqpacket",
            "protocol": 0,
            "listening": False,
            "inode": 778,
            "address": "@abs",
            "peer": "/run/peer.sock",
        },
    ),
]


@pytest.mark.parametrize(("record", "hex_data", "described"), GOLDEN)
def test_records_encode_and_decode_exactly_as_images_already_hold_them(
    record: HandlerRecord, hex_data: str, described: dict[str, Any]
) -> None:
    data = bytes.fromhex(hex_data)
    assert record.encode() == data
    assert type(record).decode(data) == record
    decoded = handler_abi.describe_data(record.compatible, data)
    # Same keys in the same order: luoctl inspect prints them as they come.
    assert decoded is not None and list(decoded.items()) == list(described.items())


def test_every_builtin_compatible_has_a_record_and_a_golden_vector() -> None:
    builtins = [h.compatible for h in builtin_handlers()]
    assert sorted(handler_abi.RECORDS) == sorted(builtins)
    assert {r.compatible for r, _, _ in GOLDEN} == set(builtins)


@pytest.mark.parametrize(("record", "hex_data", "described"), GOLDEN)
def test_malformed_data_is_a_value_error_naming_the_compatible(
    record: HandlerRecord, hex_data: str, described: dict[str, Any]
) -> None:
    data = bytes.fromhex(hex_data)
    bad = [b"", data[:-1], data + b"\0"]
    if record.versioned:
        bad.append(bytes([2]) + data[1:])
    for blob in bad:
        with pytest.raises(ValueError, match=record.compatible):
            type(record).decode(blob)
        error = handler_abi.describe_data(record.compatible, blob)
        assert error is not None and record.compatible in error["error"]


def test_unknown_layouts_are_not_decoded() -> None:
    assert handler_abi.describe_data("timerfd-v1", b"{}") is None


def test_byte_strings_longer_than_a_u16_do_not_encode() -> None:
    with pytest.raises(ValueError, match="u16"):
        FileRecord(1, 0, 0, 0, 0, b"x" * 0x10000).encode()


def test_unknown_socket_flags_and_pipe_modes_are_refused() -> None:
    socket_flags_4 = SocketRecord.header.pack(1, 0x04, 2, 1, 6, 777) + b"\0\0"
    with pytest.raises(ValueError, match="socket-v1 data: unknown flags 0x4"):
        SocketRecord.decode(socket_flags_4)
    pipe_mode_3 = PipeRecord.header.pack(1, 3, 0, 0, 0, 0, 1) + b"\0\0"
    with pytest.raises(ValueError, match="pipe-v1 data: access mode 3"):
        PipeRecord.decode(pipe_mode_3)


# -- the base class, on live files ------------------------------------------------------


def _live_files() -> list[tuple[int, list[Any]]]:
    """One open file per built-in handler (fd, things to close)."""
    r, w = os.pipe()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    master, slave = os.openpty()
    memfd = os.memfd_create("records")
    os.write(memfd, b"abc")
    directory = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    pidfd = os.pidfd_open(os.getpid())
    eventfd = os.eventfd(3)
    keep: list[Any] = [listener, r, w, master, slave, memfd, directory, pidfd, eventfd]
    fds = [memfd, listener.fileno(), r, eventfd, directory, master, pidfd]
    return [(fd, keep) for fd in fds]


@pytest.fixture
def live() -> Any:
    files = _live_files()
    yield [fd for fd, _ in files]
    for obj in files[0][1]:
        obj.close() if isinstance(obj, socket.socket) else os.close(obj)


def test_every_builtin_handler_round_trips_its_record_through_the_base(live: list[int]) -> None:
    registry = default_registry(plugins=False)
    seen = []
    for fd in live:
        st = os.fstat(fd)
        handler = registry.find(fd, st)
        assert isinstance(handler, RecordHandler)
        assert handler.compatible == handler.record.compatible
        file = PreservedFile(1, handler, fd, file_key(fd, st))
        handler.preserve(file)
        data = handler.freeze(file)
        record = handler.record.decode(data)
        assert record == handler.capture(file)  # nothing moved in between
        assert record.encode() == data
        handler.restore(PreservedFile(1, handler, fd, file.key, data))
        # Inspection through the handler and through the ABI agree.
        assert handler.describe_data(data) == handler_abi.describe_data(handler.compatible, data)
        # A file no longer held is described from its data, like a live one.
        offline = handler.describe(PreservedFile(1, handler, -1, file.key, data))
        assert offline["type"] == handler.describe(file)["type"] == record.to_dict()["type"]
        seen.append(handler.compatible)
    assert sorted(seen) == sorted(handler_abi.RECORDS)


def test_a_description_of_unreadable_data_falls_back_to_the_kind() -> None:
    for handler in builtin_handlers():
        assert isinstance(handler, RecordHandler)
        described = handler.describe(PreservedFile(1, handler, -1, (0, 0, 0), b"\xff"))
        assert described == {"type": handler.record.kind}
