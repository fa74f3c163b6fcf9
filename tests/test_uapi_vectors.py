"""liveupdate.uapi and liveupdate.wire against the machine-readable ABI vectors.

The vectors (``shared/abi/vectors.json`` beside the repository, or the file
named by ``LIVEUPDATE_VECTORS``) hold the numbers and layouts of Linux's LUO
uapi and of wire protocol v1. Every number here must match them byte for byte.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import inspect
import itertools
import json
import os
import re
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from liveupdate import uapi, wire

VECTORS_PATH = Path(
    os.environ.get(
        "LIVEUPDATE_VECTORS",
        Path(__file__).parents[1].parent / "shared/abi/vectors.json",
    )
)


def _load_vectors() -> dict[str, Any]:
    try:
        with VECTORS_PATH.open(encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
    except FileNotFoundError:  # pragma: no cover - setup problem, not a test outcome
        pytest.fail(f"ABI vectors not found at {VECTORS_PATH} (set LIVEUPDATE_VECTORS)")
    return data


V = _load_vectors()

_CTYPES_BY_NAME: dict[str, Any] = {
    "u8": ctypes.c_uint8,
    "u32": ctypes.c_uint32,
    "s32": ctypes.c_int32,
    "u64": ctypes.c_uint64,
}
_ARRAY_RE = re.compile(r"^(\w+)\[(\d+)\]$")
_DIRECTIONS = {
    "any": None,
    "outgoing": uapi.SessionDirection.OUTGOING,
    "incoming": uapi.SessionDirection.INCOMING,
}
_KINDS = {"device": uapi.FdKind.DEVICE, "session": uapi.FdKind.SESSION}


def _ctype(name: str) -> Any:
    m = _ARRAY_RE.match(name)
    if m:
        return _CTYPES_BY_NAME[m.group(1)] * int(m.group(2))
    return _CTYPES_BY_NAME[name]


def _same_ctype(actual: Any, expected: Any) -> bool:
    if issubclass(expected, ctypes.Array):
        return (
            issubclass(actual, ctypes.Array)
            and actual._length_ == expected._length_
            and actual._type_ is expected._type_
        )
    return actual is expected


def _field_doc_directions(struct_cls: type[ctypes.Structure]) -> dict[str, str]:
    doc = inspect.cleandoc(struct_cls.__doc__ or "")
    return {
        m.group(1): m.group(2)
        for m in re.finditer(r"^@(\w+):\s+(Input|Output);", doc, re.MULTILINE)
    }


IOCTL_ITEMS = sorted(V["ioctls"].items())
STRUCT_ITEMS = sorted(V["structs"].items())


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------


def test_constants() -> None:
    assert V["ioctl_type"] == uapi.LIVEUPDATE_IOCTL_TYPE
    assert V["session_name_length"] == uapi.LIVEUPDATE_SESSION_NAME_LENGTH
    assert V["device_cmd_base"] == uapi.LIVEUPDATE_CMD_BASE
    assert V["session_cmd_base"] == uapi.LIVEUPDATE_CMD_SESSION_BASE
    assert V["extension_device_cmd_base"] == uapi.LUOD_CMD_BASE
    assert V["extension_session_cmd_base"] == uapi.LUOD_CMD_SESSION_BASE
    assert uapi.LiveupdateCmd.CREATE_SESSION == uapi.LIVEUPDATE_CMD_BASE
    assert uapi.LiveupdateSessionCmd.PRESERVE_FD == uapi.LIVEUPDATE_CMD_SESSION_BASE


@pytest.mark.parametrize(
    ("block", "base"),
    [
        (uapi.LiveupdateCmd, uapi.LIVEUPDATE_CMD_BASE),
        (uapi.LiveupdateSessionCmd, uapi.LIVEUPDATE_CMD_SESSION_BASE),
        (uapi.LuodCmd, uapi.LUOD_CMD_BASE),
        (uapi.LuodSessionCmd, uapi.LUOD_CMD_SESSION_BASE),
    ],
    ids=lambda v: getattr(v, "__name__", hex(v) if isinstance(v, int) else str(v)),
)
def test_enum_blocks_are_packed_from_their_base(block: type[enum.IntEnum], base: int) -> None:
    """Rule 3: each block starts at its named base and has no gaps."""
    values = [member.value for member in block]
    assert values == list(range(base, base + len(values)))
    assert len(values) < 0x40  # a block never runs into the next one


# ---------------------------------------------------------------------------
# ioctl numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "vec"), IOCTL_ITEMS, ids=[n for n, _ in IOCTL_ITEMS])
def test_ioctl(name: str, vec: dict[str, Any]) -> None:
    number = vec["number"]
    # The module-level constant and the registry entry agree with the vectors.
    assert getattr(uapi, name) == number
    info = uapi.IOCTLS[number]
    assert info is uapi.info_by_name(name)
    assert info.name == name
    assert info.cmd == number
    assert info.struct is getattr(uapi, vec["struct"])
    assert info.struct.__name__ == vec["struct"]
    assert info.on is _KINDS[vec["on"]]
    assert info.direction is _DIRECTIONS[vec.get("direction", "any")]
    # Encoding: _IO(type, nr), no direction or size bits.
    assert uapi._IO(uapi.LIVEUPDATE_IOCTL_TYPE, vec["nr"]) == number
    assert uapi._IOC_NR(number) == vec["nr"]
    assert uapi._IOC_TYPE(number) == V["ioctl_type"]
    assert uapi._IOC_DIR_SIZE(number) == 0
    assert number == (V["ioctl_type"] << 8) | vec["nr"]
    # Sizes as the vectors state them.
    svec = V["structs"][vec["struct"]]
    assert info.sizeof == svec["sizeof"]
    assert info.min_size == svec["min_size"]
    assert uapi.min_size(info.struct, info.last_field) == svec["min_size"]
    # fd_in / fd_out follow the direction of the struct's fd field.
    fd_dir = {f[0]: f[4] for f in svec["fields"]}.get("fd")
    assert info.fd_in == (fd_dir == "in")
    assert info.fd_out == (fd_dir == "out")


def test_every_upstream_ioctl_is_registered() -> None:
    upstream = {vec["number"] for vec in V["ioctls"].values()}
    assert upstream <= set(uapi.IOCTLS)
    for number, info in uapi.IOCTLS.items():
        if number in upstream:
            continue
        # Anything else is a luod extension, in its own blocks and namespace.
        nr = uapi._IOC_NR(number)
        if info.on is uapi.FdKind.DEVICE:
            assert info.name.startswith("LUOD_IOCTL_")
            assert info.struct.__name__.startswith("luod_")
            assert uapi.LUOD_CMD_BASE <= nr < uapi.LUOD_CMD_SESSION_BASE
        else:
            assert info.name.startswith("LUOD_SESSION_")
            assert info.struct.__name__.startswith("luod_session_")
            assert uapi.LUOD_CMD_SESSION_BASE <= nr <= 0xFF


# ---------------------------------------------------------------------------
# Struct layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "svec"), STRUCT_ITEMS, ids=[n for n, _ in STRUCT_ITEMS])
def test_struct_layout(name: str, svec: dict[str, Any]) -> None:
    cls = getattr(uapi, name)
    assert ctypes.sizeof(cls) == svec["sizeof"]
    assert ctypes.alignment(cls) == svec["align"]
    assert [f[0] for f in cls._fields_] == [f[0] for f in svec["fields"]]
    doc_dirs = _field_doc_directions(cls)
    for fname, ftype, offset, size, direction in svec["fields"]:
        descr = getattr(cls, fname)
        assert descr.offset == offset, fname
        assert descr.size == size, fname
        actual_type = dict(cls._fields_)[fname]
        assert _same_ctype(actual_type, _ctype(ftype)), fname
        assert ctypes.sizeof(actual_type) == size
        # The struct's own documentation states the same direction.
        assert doc_dirs[fname] == {"in": "Input", "out": "Output"}[direction], fname
    infos = [i for i in uapi.IOCTLS.values() if i.struct is cls]
    assert len(infos) == 1, "one struct per ioctl"
    assert infos[0].min_size == svec["min_size"]


@pytest.mark.parametrize("info", list(uapi.IOCTLS.values()), ids=lambda i: i.name)
def test_struct_rules(info: uapi.IoctlInfo) -> None:
    """The design rules of uapi.md, for every registered ioctl (extensions too)."""
    cls = info.struct
    fields = cls._fields_
    # Rule 2: u32 size first.
    assert fields[0][0] == "size"
    assert fields[0][1] is ctypes.c_uint32
    # Rule 4: fixed width, no implicit padding, u64 8-aligned, fds are s32.
    end = 0
    for fname, ftype, *_ in fields:
        descr = getattr(cls, fname)
        assert descr.offset == end, f"{cls.__name__}.{fname}: implicit padding"
        if ftype is ctypes.c_uint64 or ftype is ctypes.c_int64:
            assert descr.offset % 8 == 0
        if fname == "fd":
            assert ftype is ctypes.c_int32
        end = descr.offset + descr.size
    assert ctypes.sizeof(cls) == end, f"{cls.__name__}: trailing padding"
    # Rule 6: the minimum size ends at a field boundary within the struct.
    assert 4 <= info.min_size <= info.sizeof
    assert hasattr(cls, info.last_field)
    # Rule 1: no two ioctls share a struct.
    assert sum(1 for i in uapi.IOCTLS.values() if i.struct is cls) == 1
    # Rule 5: the doc hangs on the struct.
    first = inspect.cleandoc(cls.__doc__ or "").splitlines()[0]
    assert first == f"struct {cls.__name__} - ioctl({info.name})"


def test_command_blocks_are_packed() -> None:
    """Rule 3: inside each block the numbers follow each other without gaps."""
    bases = [
        uapi.LIVEUPDATE_CMD_BASE,
        uapi.LIVEUPDATE_CMD_SESSION_BASE,
        uapi.LUOD_CMD_BASE,
        uapi.LUOD_CMD_SESSION_BASE,
        0x100,
    ]
    nrs = sorted(uapi._IOC_NR(n) for n in uapi.IOCTLS)
    for lo, hi in itertools.pairwise(bases):
        block = [nr for nr in nrs if lo <= nr < hi]
        if block:
            assert block == list(range(block[0], block[0] + len(block))), hex(lo)
    assert nrs[:2] == [uapi.LIVEUPDATE_CMD_BASE, uapi.LIVEUPDATE_CMD_BASE + 1]
    session = [nr for nr in nrs if uapi.LIVEUPDATE_CMD_SESSION_BASE <= nr < uapi.LUOD_CMD_BASE]
    assert session[0] == uapi.LIVEUPDATE_CMD_SESSION_BASE


# ---------------------------------------------------------------------------
# errno numbers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value"), sorted(V["errno"].items()))
def test_errno(name: str, value: int) -> None:
    assert getattr(errno, name) == value
    assert os.strerror(value)


# ---------------------------------------------------------------------------
# Wire constants
# ---------------------------------------------------------------------------

_FMT = {"u32": "I", "s32": "i"}


def _unpack(data: bytes, ftype: str, offset: int) -> int:
    value: int = struct.unpack_from("=" + _FMT[ftype], data, offset)[0]
    return value


def test_wire_constants() -> None:
    w = V["wire"]
    assert wire.HELLO.size == w["hello"]["size"]
    assert w["hello"]["magic"] == wire.HELLO_MAGIC
    assert w["hello"]["version"] == wire.PROTOCOL_VERSION
    assert wire.REQUEST_HEADER.size == w["request_header"]["size"]
    assert wire.REPLY_HEADER.size == w["reply_header"]["size"]
    assert w["max_arg_len"] == wire.MAX_ARG_LEN
    assert w["fd_placeholder_on_wire"] == wire.FD_PLACEHOLDER
    assert w["socket"] == "AF_UNIX SOCK_SEQPACKET"
    # "L U O D" in memory order.
    assert wire.HELLO_MAGIC.to_bytes(4, sys.byteorder) == b"LUOD"


def test_wire_hello_fields() -> None:
    hello = wire.encode_hello(-errno.EIO)
    expected = {
        "magic": wire.HELLO_MAGIC,
        "version": wire.PROTOCOL_VERSION,
        "status": -errno.EIO,
        "reserved": 0,
    }
    for fname, ftype, offset in V["wire"]["hello"]["fields"]:
        assert _unpack(hello, ftype, offset) == expected[fname], fname


def test_wire_header_fields() -> None:
    req = wire.encode_request(0xBA41, b"\x10" + bytes(15))
    for fname, ftype, offset in V["wire"]["request_header"]["fields"]:
        assert _unpack(req, ftype, offset) == {"cmd": 0xBA41, "arg_len": 16}[fname]
    rep = wire.encode_reply(-errno.ENOENT)
    for fname, ftype, offset in V["wire"]["reply_header"]["fields"]:
        assert _unpack(rep, ftype, offset) == {"ret": -errno.ENOENT, "out_len": 0}[fname]


# ---------------------------------------------------------------------------
# Byte-for-byte examples
# ---------------------------------------------------------------------------


def _create_session_request() -> bytes:
    arg = uapi.liveupdate_ioctl_create_session()
    arg.size = ctypes.sizeof(arg)
    arg.fd = wire.FD_PLACEHOLDER
    name = uapi.encode_name("test-session")
    arg.name[: len(name)] = name
    return wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, bytes(arg))


def _preserve_fd_request() -> bytes:
    arg = uapi.liveupdate_session_preserve_fd(
        size=ctypes.sizeof(uapi.liveupdate_session_preserve_fd), fd=5, token=0x1A
    )
    return wire.encode_request(uapi.LIVEUPDATE_SESSION_PRESERVE_FD, bytes(arg))


def _finish_request() -> bytes:
    arg = uapi.liveupdate_session_finish(size=ctypes.sizeof(uapi.liveupdate_session_finish))
    return wire.encode_request(uapi.LIVEUPDATE_SESSION_FINISH, bytes(arg))


def _hello_ebusy() -> bytes:
    return wire.encode_hello(-errno.EBUSY)


EXAMPLE_BUILDERS: dict[str, Callable[[], bytes]] = {
    "CREATE_SESSION request for name 'test-session'": _create_session_request,
    "PRESERVE_FD request, caller fd 5, token 0x1A": _preserve_fd_request,
    "FINISH request": _finish_request,
    "hello, open refused with EBUSY": _hello_ebusy,
}


def test_every_example_has_a_builder() -> None:
    assert {e["what"] for e in V["examples"]} == set(EXAMPLE_BUILDERS)


@pytest.mark.parametrize("example", V["examples"], ids=lambda e: e["what"])
def test_example_bytes(example: dict[str, str]) -> None:
    expected = bytes.fromhex(example["hex"])
    assert EXAMPLE_BUILDERS[example["what"]]().hex() == expected.hex()
    # And the decoders read the same bytes back.
    if example["what"].startswith("hello"):
        assert wire.decode_hello(expected) == -errno.EBUSY
    else:
        req = wire.decode_request(expected)
        info = uapi.IOCTLS[req.cmd]
        obj = info.struct.from_buffer_copy(req.arg)
        assert obj.size == info.sizeof == len(req.arg)


def test_create_session_example_name() -> None:
    req = wire.decode_request(bytes.fromhex(V["examples"][0]["hex"]))
    obj = uapi.liveupdate_ioctl_create_session.from_buffer_copy(req.arg)
    assert uapi.decode_name(obj.name) == b"test-session"
    assert obj.fd == wire.FD_PLACEHOLDER


# ---------------------------------------------------------------------------
# Small helpers of uapi
# ---------------------------------------------------------------------------


def test_info_by_name_unknown() -> None:
    with pytest.raises(KeyError):
        uapi.info_by_name("LIVEUPDATE_IOCTL_NOPE")


def test_encode_name() -> None:
    assert uapi.encode_name("sess") == b"sess"
    assert uapi.encode_name("żółw") == "żółw".encode()
    assert uapi.encode_name(b"raw\xff") == b"raw\xff"
    out = uapi.encode_name(bytearray(b"ba"))
    assert out == b"ba"
    assert type(out) is bytes


def test_decode_name() -> None:
    field = (ctypes.c_uint8 * uapi.LIVEUPDATE_SESSION_NAME_LENGTH)()
    assert uapi.decode_name(field) == b""
    field[:3] = b"abc"
    assert uapi.decode_name(field) == b"abc"
    assert uapi.decode_name(b"ab\0cd\0") == b"ab"
    full = b"x" * uapi.LIVEUPDATE_SESSION_NAME_LENGTH
    assert uapi.decode_name(full) == full


def test_ioc_helpers() -> None:
    assert uapi._IO(0xBA, 0x42) == 0xBA42
    assert uapi._IOC_TYPE(0xC008BA42) == 0xBA
    assert uapi._IOC_NR(0xC008BA42) == 0x42
    assert uapi._IOC_DIR_SIZE(0xC008BA42) == 0xC008
    assert uapi._IOC_DIR_SIZE(0xBA42) == 0
    assert uapi._IOC_TYPE(0x1242) == 0x12


def test_ioctl_info_properties() -> None:
    info = uapi.info_by_name("LIVEUPDATE_SESSION_GET_NAME")
    assert info.sizeof == ctypes.sizeof(uapi.liveupdate_session_get_name) == 72
    assert info.min_size == 72
    assert uapi.min_size(uapi.liveupdate_session_get_name, "reserved") == 8
    assert uapi.min_size(uapi.liveupdate_session_get_name, "size") == 4
