"""Tests of the handover image (``liveupdate.handover_abi`` and ``liveupdate.handover_codec``).

Crafted images are edited with libfdt's read-write interface (``fdt_setprop``,
``fdt_add_subnode``...), not with the codec's own writer, so that the reader
is tested against trees it did not produce itself; ``dtc`` is the
independent oracle (it shares no code path with the codec's writer).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import libfdt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liveupdate.handover_abi import (
    IMAGE_COMPATIBLE,
    IMAGE_FLAG_AWAITING_SUCCESSOR,
    IMAGE_VERSION,
    SUPPORTED_VERSIONS,
    CorruptImageError,
    FileRecord,
    HandoverError,
    HandoverImage,
    SessionRecord,
    UnknownVersionError,
)
from liveupdate.handover_codec import decode_image, encode_image, image_to_dict

U64_MAX = 2**64 - 1
DTC = shutil.which("dtc")


def sample_image() -> HandoverImage:
    """A small image touching every field: two handlers, -1 fd, odd names."""
    return HandoverImage(
        liveupdate_number=3,
        writer="luod 0.1.0 pid 123",
        sessions=[
            SessionRecord(
                name=b"db",
                uid=1000,
                gid=100,
                pid=4242,
                created=1732650000.123456,
                flags=1,
                files=[
                    FileRecord(token=0, compatible="memfd-v1", fd=5, data=b"\x00\x01\x02"),
                    FileRecord(token=U64_MAX, compatible="pipe-v1", fd=-1, data=b""),
                    FileRecord(token=7, compatible="memfd-v1", fd=6, data=b"x" * 24),
                ],
            ),
            SessionRecord(name=b"\xff\xfe", uid=0, gid=0, pid=1, created=0.0),
            SessionRecord(
                name=b"n" * 63,
                uid=2**32 - 1,
                gid=2**32 - 1,
                pid=2**32 - 1,
                created=1.5,
                files=[FileRecord(token=0, compatible="memfd-v1", fd=7, data=b"\0" * 5)],
            ),
        ],
    )


def roundtrip(image: HandoverImage) -> HandoverImage:
    decoded = decode_image(encode_image(image))
    assert decoded == image
    return decoded


# --------------------------------------------------------------------------
# Helpers editing images through libfdt's read-write interface
# --------------------------------------------------------------------------


def _packed(tree: Any) -> bytes:
    tree.pack()
    return bytes(tree.as_bytearray()[: tree.totalsize()])


def with_tree(image: HandoverImage, change: Any) -> bytes:
    """Encode ``image``, apply ``change(tree)`` to a ``libfdt.Fdt``, re-pack."""
    tree = libfdt.Fdt(encode_image(image))
    tree.resize(tree.totalsize() + 4096)
    change(tree)
    return _packed(tree)


def edit(image: HandoverImage, path: str, prop: str, value: bytes | None) -> bytes:
    """Encode ``image``, then set (or remove, if None) one property via libfdt."""

    def change(tree: Any) -> None:
        node = tree.path_offset(path)
        if value is None:
            tree.delprop(node, prop)
        else:
            tree.setprop(node, prop, value)

    return with_tree(image, change)


def new_tree(build: Any) -> bytes:
    """A DTB written from scratch by libfdt: ``build(writer)`` fills the root."""
    writer = libfdt.FdtSw()
    writer.finish_reservemap()
    with writer.add_node(""):
        build(writer)
    tree = writer.as_fdt()
    return _packed(tree)


def corrupt_reason(data: bytes) -> str:
    with pytest.raises(CorruptImageError) as info:
        decode_image(data)
    return info.value.reason


# --------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------


def test_empty_image_roundtrip() -> None:
    image = HandoverImage(liveupdate_number=0, sessions=[])
    decoded = roundtrip(image)
    assert decoded.version == IMAGE_VERSION == 1
    assert decoded.writer == ""
    assert 1 in SUPPORTED_VERSIONS
    assert IMAGE_COMPATIBLE == "luo-v1"


def test_sample_roundtrip() -> None:
    roundtrip(sample_image())


def test_encoding_is_deterministic() -> None:
    assert encode_image(sample_image()) == encode_image(sample_image())


def test_non_utf8_names_roundtrip() -> None:
    names = [b"\xff", b"\x80abc", bytes(range(1, 64)), b"caf\xc3\xa9", b"\xfe\xff" * 31]
    image = HandoverImage(
        liveupdate_number=1,
        sessions=[SessionRecord(name=n, uid=0, gid=0, pid=1, created=0.0) for n in names],
    )
    decoded = roundtrip(image)
    assert [s.name for s in decoded.sessions] == names


def test_token_extremes_roundtrip() -> None:
    files = [
        FileRecord(token=0, compatible="memfd-v1", fd=3, data=b"a"),
        FileRecord(token=U64_MAX, compatible="memfd-v1", fd=4, data=b"b"),
        FileRecord(token=2**63, compatible="memfd-v1", fd=-1, data=b""),
    ]
    image = HandoverImage(
        liveupdate_number=U64_MAX,
        sessions=[SessionRecord(b"s", 0, 0, 0, 0.0, 0xFFFFFFFF, files)],
    )
    decoded = roundtrip(image)
    assert [f.token for f in decoded.sessions[0].files] == [0, U64_MAX, 2**63]
    # The same token may be used in two sessions.
    image.sessions.append(
        SessionRecord(b"t", 0, 0, 0, 0.0, files=[FileRecord(0, "memfd-v1", 9, b"")])
    )
    roundtrip(image)


def test_many_sessions_roundtrip() -> None:
    now = time.time()
    image = HandoverImage(
        liveupdate_number=2,
        sessions=[
            SessionRecord(b"session %d" % i, 1000, 1000, 100 + i, now + i) for i in range(2000)
        ],
    )
    roundtrip(image)


def test_many_files_roundtrip() -> None:
    files = [FileRecord(t, "memfd-v1", 3 + t, t.to_bytes(24, "big")) for t in range(10000)]
    image = HandoverImage(7, [SessionRecord(b"big", 0, 0, 1, 1732650000.5, 0, files)])
    decoded = roundtrip(image)
    assert decoded.sessions[0].files[9999].data == (9999).to_bytes(24, "big")


@pytest.mark.parametrize("created", [0.0, 1.5, 123.456, 1732650000.123456, 4102444800.999999])
def test_created_roundtrips_exactly(created: float) -> None:
    image = HandoverImage(1, [SessionRecord(b"s", 0, 0, 0, created)])
    assert decode_image(encode_image(image)).sessions[0].created == created


def test_created_clock_readings_roundtrip_exactly() -> None:
    for _ in range(200):
        created = time.time()
        image = HandoverImage(1, [SessionRecord(b"s", 0, 0, 0, created)])
        assert decode_image(encode_image(image)).sessions[0].created == created


def test_decode_accepts_bytes_like() -> None:
    data = encode_image(sample_image())
    assert decode_image(bytearray(data)) == sample_image()
    assert decode_image(memoryview(data)) == sample_image()
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_image_to_dict_is_json() -> None:
    result = image_to_dict(sample_image())
    text = json.dumps(result)
    assert json.loads(text) == result
    assert result["compatible"] == "luo-v1"
    assert result["liveupdate_number"] == 3
    db, binary, long = result["sessions"]
    assert (db["name"], db["name_encoding"]) == ("db", "utf-8")
    assert (binary["name"], binary["name_encoding"]) == ("fffe", "hex")
    assert long["name"] == "n" * 63
    assert db["files"][0] == {
        "token": 0,
        "compatible": "memfd-v1",
        "fd": 5,
        "size": 3,
        "data": "000102",
    }
    assert db["files"][1]["token"] == U64_MAX


# --------------------------------------------------------------------------
# The writer refuses what the reader would refuse
# --------------------------------------------------------------------------


def _one(**changes: Any) -> HandoverImage:
    session: dict[str, Any] = {
        "name": b"s",
        "uid": 0,
        "gid": 0,
        "pid": 1,
        "created": 0.0,
        "flags": 0,
        "files": [],
    }
    session.update(changes)
    return HandoverImage(1, [SessionRecord(**session)])


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (_one(name=b""), "0 bytes long"),
        (_one(name=b"x" * 64), "64 bytes long"),
        (_one(name=b"a\0b"), "NUL"),
        (_one(name="text"), "must be bytes"),
        (_one(uid=-1), "uid"),
        (_one(pid=2**32), "pid"),
        (_one(flags=2**32), "flags"),
        (_one(created=-1.0), "created"),
        (_one(created=float("nan")), "created"),
        (_one(created=2.0e10), "u64 nanoseconds"),
        (_one(files=[FileRecord(-1, "memfd-v1", 3, b"")]), "token"),
        (_one(files=[FileRecord(2**64, "memfd-v1", 3, b"")]), "token"),
        (
            _one(files=[FileRecord(1, "memfd-v1", 3, b""), FileRecord(1, "memfd-v1", 4, b"")]),
            "duplicate token 1",
        ),
        (_one(files=[FileRecord(1, "", 3, b"")]), "compatible"),
        (_one(files=[FileRecord(1, "mémfd-v1", 3, b"")]), "compatible"),
        (_one(files=[FileRecord(1, "memfd-v1", -2, b"")]), "fd -2"),
        (_one(files=[FileRecord(1, "memfd-v1", 2**31, b"")]), "fd"),
        (
            _one(files=[FileRecord(1, "memfd-v1", 3, b""), FileRecord(2, "memfd-v1", 3, b"")]),
            "fd 3 is already carried",
        ),
        (_one(files=[FileRecord(1, "memfd-v1", 3, "text")]), "data must be bytes"),  # type: ignore[arg-type]
        (HandoverImage(-1, []), "liveupdate number"),
        (HandoverImage(2**64, []), "liveupdate number"),
        (HandoverImage(1, [], writer="a\0b"), "writer"),
        (
            HandoverImage(
                1, [SessionRecord(b"s", 0, 0, 1, 0.0), SessionRecord(b"s", 0, 0, 2, 0.0)]
            ),
            "already used by session 0",
        ),
        (HandoverImage(1, [], version=2), "version 2"),
    ],
)
def test_encode_rejects_invalid_images(image: HandoverImage, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_image(image)


def test_fd_numbers_are_unique_across_sessions() -> None:
    image = HandoverImage(
        1,
        [
            SessionRecord(b"a", 0, 0, 1, 0.0, files=[FileRecord(1, "memfd-v1", 10, b"")]),
            SessionRecord(b"b", 0, 0, 1, 0.0, files=[FileRecord(1, "memfd-v1", 10, b"")]),
        ],
    )
    with pytest.raises(ValueError, match="fd 10 is already carried by session 0 file 0"):
        encode_image(image)
    # Files carried without an fd never collide.
    image.sessions[1].files[0].fd = -1
    image.sessions[0].files[0].fd = -1
    roundtrip(image)


# --------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------


def test_unknown_compatible_version() -> None:
    data = encode_image(sample_image()).replace(b"luo-v1\0", b"luo-v9\0")
    with pytest.raises(UnknownVersionError) as info:
        decode_image(data)
    assert info.value.found == 9
    assert info.value.supported == SUPPORTED_VERSIONS
    assert "version 9" in info.value.reason
    assert "reads: 1" in info.value.reason


def test_unknown_luo_version_property() -> None:
    data = edit(sample_image(), "/", "luo,version", struct.pack(">I", 42))
    with pytest.raises(UnknownVersionError, match=r"version 42 .*reads: 1"):
        decode_image(data)


def test_unknown_version_wins_over_unknown_layout() -> None:
    """A future layout is reported as a version problem, not as corruption."""

    def build(writer: Any) -> None:
        writer.property_string("compatible", "luo-v2")
        writer.property_u32("luo,version", 2)
        with writer.add_node("sessions"):
            pass

    with pytest.raises(UnknownVersionError) as info:
        decode_image(new_tree(build))
    assert info.value.found == 2
    assert isinstance(info.value, HandoverError)


def test_foreign_device_tree_is_corrupt_not_unknown_version() -> None:
    data = new_tree(lambda writer: writer.property_string("compatible", "acme,board"))
    assert "not a LUO handover image" in corrupt_reason(data)


# --------------------------------------------------------------------------
# Corrupt images
# --------------------------------------------------------------------------


def test_truncated_images() -> None:
    data = encode_image(sample_image())
    for size in (0, 1, 39, 40, 100, len(data) - 4, len(data) - 1):
        with pytest.raises(CorruptImageError):
            decode_image(data[:size])


def test_trailing_bytes() -> None:
    assert "header says" in corrupt_reason(encode_image(sample_image()) + b"\0\0\0\0")


def test_wrong_magic() -> None:
    data = bytearray(encode_image(sample_image()))
    data[0] ^= 0xFF
    assert "not a flattened device tree" in corrupt_reason(bytes(data))


def test_random_bytes() -> None:
    assert "FDT header" in corrupt_reason(b"hello")
    assert "magic" in corrupt_reason(bytes(range(256)))


def test_old_fdt_format_version() -> None:
    data = bytearray(encode_image(sample_image()))
    struct.pack_into(">I", data, 20, 16)
    assert "FDT format version 16" in corrupt_reason(bytes(data))


def test_blocks_outside_the_image() -> None:
    data = bytearray(encode_image(sample_image()))
    struct.pack_into(">I", data, 36, 10**6)  # size_dt_struct
    assert "outside the image" in corrupt_reason(bytes(data))


@pytest.mark.parametrize(
    ("path", "prop", "value", "match"),
    [
        ("/", "liveupdate-number", b"\0\0\0\1", "'liveupdate-number' is 4 bytes, expected 8"),
        ("/", "luo,version", b"\0\0\1", "'luo,version' is 3 bytes, expected 4"),
        ("/", "session-count", struct.pack(">I", 4), "session-count is 4 but 3"),
        ("/", "session-count", None, "missing property 'session-count'"),
        ("/", "writer", b"luod", "writer"),
        ("/", "handlers", b"memfd-v1", "not NUL-terminated"),
        ("/", "handlers", b"memfd-v1\0", "handler 1, but /handlers has 1"),
        ("/", "handlers", b"memfd-v1\0memfd-v1\0", "twice"),
        ("/", "handlers", b"memfd-v1\0\x01\0", "printable"),
        ("/", "compatible", b"luo-v1\0luo-v0\0", "exactly one string"),
        ("/session-0", "owner", b"\0" * 8, "'owner' is 8 bytes, expected 12"),
        ("/session-0", "created", b"\0" * 4, "'created' is 4 bytes"),
        ("/session-0", "flags", b"", "'flags' is 0 bytes"),
        ("/session-0", "session-name", b"db", "not NUL-terminated"),
        ("/session-0", "session-name", b"\0", "0 bytes long"),
        ("/session-0", "session-name", b"x" * 64 + b"\0", "64 bytes long"),
        ("/session-0", "session-name", b"d\0b\0", "contains a NUL"),
        ("/session-0", "session-name", b"\xff\xfe\0", "already used by session 0"),
        ("/session-0", "session-name", None, "missing property 'session-name'"),
        ("/session-0", "file-count", struct.pack(">I", 2), "expected 16 for 2 files"),
        ("/session-0", "file-tokens", b"\0" * 20, "'file-tokens' is 20 bytes, expected 24"),
        ("/session-0", "file-fds", b"\0" * 11, "'file-fds' is 11 bytes"),
        ("/session-0", "file-fds", struct.pack(">3i", 5, -1, 5), "fd 5 is already carried"),
        ("/session-0", "file-fds", struct.pack(">3i", 5, -2, 6), "fd -2"),
        ("/session-0", "file-handlers", struct.pack(">3I", 0, 1, 2), "handler 2"),
        ("/session-0", "file-tokens", struct.pack(">3Q", 1, 2, 1), "duplicate token 1"),
        ("/session-0", "file-data-sizes", struct.pack(">3I", 3, 0, 25), "add up to 28"),
        ("/session-0", "file-data-sizes", struct.pack(">3I", 2**32 - 1, 0, 0), "add up to"),
        ("/session-0", "file-data", b"", "file-data is 0 bytes"),
    ],
)
def test_bad_properties(path: str, prop: str, value: bytes | None, match: str) -> None:
    assert match in corrupt_reason(edit(sample_image(), path, prop, value))


def test_unknown_properties_are_ignored() -> None:
    data = edit(sample_image(), "/session-1", "vendor,extra", b"\1\2\3")
    assert decode_image(data) == sample_image()


def test_session_nodes_must_be_in_order() -> None:
    def rename(tree: Any) -> None:
        tree.set_name(tree.path_offset("/session-1"), "session-5")

    assert "expected 'session-1'" in corrupt_reason(with_tree(sample_image(), rename))


def test_sessions_have_no_child_nodes() -> None:
    def add_child(tree: Any) -> None:
        tree.add_subnode(tree.path_offset("/session-2"), "file@0")

    assert "unexpected child node 'file@0'" in corrupt_reason(with_tree(sample_image(), add_child))


def test_extra_root_child_is_counted() -> None:
    def add_child(tree: Any) -> None:
        tree.add_subnode(0, "session-3")

    assert "session-count is 3 but 4" in corrupt_reason(with_tree(sample_image(), add_child))


# Structure-level corruption, crafted by hand: libfdt's writers cannot build
# these. libfdt's fdt_check_full refuses most of them (its error is named in the
# reason); duplicate names and non-ASCII names are refused by flattree on top.


def _dtb(struct_block: bytes, strings: bytes = b"compatible\0") -> bytes:
    header_size, rsvmap = 40, b"\0" * 16
    off_struct = header_size + len(rsvmap)
    off_strings = off_struct + len(struct_block)
    total = off_strings + len(strings)
    header = struct.pack(
        ">10I", 0xD00DFEED, total, off_struct, off_strings, header_size, 17, 16, 0,
        len(strings), len(struct_block),
    )  # fmt: skip
    return header + rsvmap + struct_block + strings


def _tok(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


BEGIN_ROOT = _tok(1, 0)
END_NODE = _tok(2)
END = _tok(9)
PROP_COMPAT = _tok(3, 7, 0) + b"luo-v1\0\0"


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (BEGIN_ROOT + PROP_COMPAT + END, "FDT_ERR_BADSTRUCTURE"),  # FDT_END inside /
        (BEGIN_ROOT + PROP_COMPAT + END_NODE + END_NODE + END, "FDT_ERR_BADSTRUCTURE"),
        (BEGIN_ROOT + END_NODE + BEGIN_ROOT + END_NODE + END, "FDT_ERR_BADSTRUCTURE"),  # 2 roots
        (PROP_COMPAT + BEGIN_ROOT + END_NODE + END, "FDT_ERR_BADOFFSET"),  # prop outside nodes
        (BEGIN_ROOT + PROP_COMPAT + PROP_COMPAT + END_NODE + END, "duplicate property"),
        (BEGIN_ROOT + _tok(3, 4, 99) + b"abcd" + END_NODE + END, "FDT_ERR_BADOFFSET"),  # name
        (BEGIN_ROOT + _tok(3, 4000, 0) + END_NODE + END, "FDT_ERR_BADSTRUCTURE"),  # value
        (BEGIN_ROOT + _tok(7) + END_NODE + END, "FDT_ERR_BADSTRUCTURE"),  # unknown tag
        (BEGIN_ROOT + END_NODE, "FDT_ERR_TRUNCATED"),  # ends before FDT_END
        (BEGIN_ROOT + END_NODE + _tok(4) + END, "FDT_ERR_BADSTRUCTURE"),  # tag after the root
        (_tok(1) + b"x\0\0\0" + END_NODE + END, "FDT_ERR_BADSTRUCTURE"),  # root has a name
        (BEGIN_ROOT + _tok(1) + b"abcd", "FDT_ERR_BADSTRUCTURE"),  # unterminated name
        (BEGIN_ROOT + _tok(1) + b"\xff\0\0\0" + END_NODE + END_NODE + END, "not ASCII"),
        (
            BEGIN_ROOT + (_tok(1) + b"a\0\0\0" + END_NODE) * 2 + END_NODE + END,
            "duplicate node 'a'",
        ),
        (END, "FDT_ERR_BADOFFSET"),  # no root node
        (BEGIN_ROOT + END_NODE + END, "missing property 'compatible'"),
    ],
)
def test_bad_structure(block: bytes, match: str) -> None:
    assert match in corrupt_reason(_dtb(block))


def test_nop_tags_are_skipped() -> None:
    """FDT_NOP is valid FDT (libfdt's fdt_nop_property leaves it): a NOP'ed property is gone."""
    data = bytearray(encode_image(sample_image()))
    (off_struct,) = struct.unpack_from(">I", data, 8)
    # The root's FDT_BEGIN_NODE plus its empty, padded name take 8 bytes; the
    # first property follows. Turn that property into NOPs.
    (length,) = struct.unpack_from(">I", data, off_struct + 12)
    words = (12 + length + 3) // 4
    assert data[off_struct + 8 : off_struct + 12] == _tok(3)
    data[off_struct + 8 : off_struct + 8 + 4 * words] = _tok(4) * words
    assert "missing property 'compatible'" in corrupt_reason(bytes(data))


def test_nop_between_the_root_and_fdt_end_is_corrupt() -> None:
    """libfdt allows nothing but FDT_END after the root node, not even FDT_NOP."""
    data = bytearray(encode_image(sample_image()))
    (off_struct,) = struct.unpack_from(">I", data, 8)
    (size_struct,) = struct.unpack_from(">I", data, 36)
    # Replace the final FDT_END by FDT_NOP FDT_END, growing the block by 4.
    end = off_struct + size_struct
    data[end - 4 : end] = _tok(4, 9)
    struct.pack_into(">I", data, 36, size_struct + 4)
    struct.pack_into(">I", data, 12, struct.unpack_from(">I", data, 12)[0] + 4)
    struct.pack_into(">I", data, 4, len(data))
    assert "FDT_ERR_BADSTRUCTURE" in corrupt_reason(bytes(data))


# --------------------------------------------------------------------------
# Fuzzing: garbage in, HandoverError out
# --------------------------------------------------------------------------

SEED = encode_image(sample_image())
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_only_handover_errors(data: bytes) -> None:
    try:
        image = decode_image(data)
    except HandoverError:
        return
    # Whatever decodes must be a valid image the writer can reproduce.
    assert decode_image(encode_image(image)) == image


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data: bytes) -> None:
    _decode_only_handover_errors(data)


@FUZZ
@given(st.binary(max_size=64))
def test_fuzz_random_body_with_valid_magic(body: bytes) -> None:
    _decode_only_handover_errors(struct.pack(">I", 0xD00DFEED) + body)


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=8),
    st.integers(0, len(SEED)),
    st.binary(max_size=8),
)
def test_fuzz_mutated_image(edits: list[tuple[int, int]], cut: int, insert: bytes) -> None:
    data = bytearray(SEED)
    for position, value in edits:
        data[position] = value
    data[cut:cut] = insert
    _decode_only_handover_errors(bytes(data))


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), max_size=4))
def test_fuzz_mutated_image_with_fixed_size(edits: list[tuple[int, int]]) -> None:
    """Byte flips that keep totalsize right get past the header checks."""
    data = bytearray(SEED)
    for position, value in edits:
        data[max(position, 40)] = value
    _decode_only_handover_errors(bytes(data))


# --------------------------------------------------------------------------
# Standard tools
# --------------------------------------------------------------------------


@pytest.mark.skipif(DTC is None, reason="dtc not installed (Debian: device-tree-compiler)")
def test_dtc_reads_image(tmp_path: Path) -> None:
    path = tmp_path / "handover.dtb"
    path.write_bytes(encode_image(sample_image()))
    assert DTC is not None
    result = subprocess.run(
        [DTC, "-I", "dtb", "-O", "dts", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert 'compatible = "luo-v1";' in result.stdout
    assert 'session-name = "db";' in result.stdout
    assert "session-name = [ff fe 00];" in result.stdout
    assert "liveupdate-number = <0x00 0x03>;" in result.stdout
    # No warnings either: no "name" property clash, no unit address without reg.
    assert result.stderr == ""


def _dtc(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    assert DTC is not None
    return subprocess.run([DTC, *args], input=stdin, capture_output=True, check=False, timeout=30)


@pytest.mark.skipif(DTC is None, reason="dtc not installed (Debian: device-tree-compiler)")
def test_image_rewritten_by_dtc_decodes_the_same() -> None:
    """dtc's own writer (not libfdt) re-flattens the tree: the reader must agree."""
    image = sample_image()
    result = _dtc("-I", "dtb", "-O", "dtb", "-", stdin=encode_image(image))
    assert result.returncode == 0, result.stderr
    assert decode_image(result.stdout) == image


# --------------------------------------------------------------------------
# Images written before libfdt: committed, decoded forever
# --------------------------------------------------------------------------

#: Written by the ``fdt``-package writer this project used until libfdt
#: replaced it (commit 8c32512's ``core/handover.py``), never regenerated.
PRE_LIBFDT_IMAGE = Path(__file__).parent / "data" / "handover-v1-2026-11-30.dtb"

PRE_LIBFDT_RECORDS = HandoverImage(
    liveupdate_number=0x1_0000_0005,
    writer="luod 0.1.0 pid 4321 (caf\u00e9)",
    sessions=[
        SessionRecord(
            name=b"db",
            uid=1000,
            gid=100,
            pid=4242,
            created=1732650000.123456,
            flags=1,
            files=[
                FileRecord(0, "memfd-v1", 5, bytes(range(40))),
                FileRecord(U64_MAX, "pipe-v1", 6, b"\x01\x00\x00\x00pipe-data"),
                FileRecord(7, "eventfd-v1", -1, b"\x00\x00\x00\x00\x00\x00\x00\x2a"),
            ],
        ),
        SessionRecord(
            name=b"caf\xc3\xa9 \xe2\x98\x83 \xf0\x9f\x98\x80",
            uid=0,
            gid=0,
            pid=1,
            created=0.0,
            flags=0,
            files=[
                FileRecord(1, "file-v1", 7, b"/var/lib/x\x00"),
                FileRecord(2, "socket-v1", 8, b""),
            ],
        ),
        SessionRecord(
            name=b"\xff\xfe\x80 not utf-8",
            uid=65534,
            gid=65534,
            pid=2**32 - 1,
            created=1.5,
            flags=0x8000_0001,
        ),
        SessionRecord(
            name=b"n" * 63,
            uid=2**32 - 1,
            gid=2**32 - 1,
            pid=99,
            created=4102444800.999999,
            flags=0x8000_0000,
            files=[
                FileRecord(2**63, "pidfd-v1", 9, b"\x00" * 16),
                FileRecord(3, "pty-v1", 10, b"pty"),
                FileRecord(4, "memfd-v1", 11, b""),
            ],
        ),
        SessionRecord(
            name=b"session-0 /with\tspaces,and=punct\"'",
            uid=1,
            gid=2,
            pid=3,
            created=1700000000.0,
        ),
    ],
)


def test_image_written_before_libfdt_decodes_to_its_records() -> None:
    decoded = decode_image(PRE_LIBFDT_IMAGE.read_bytes())
    assert decoded == PRE_LIBFDT_RECORDS
    assert decoded.version == 1
    assert [type(s.name) for s in decoded.sessions] == [bytes] * 5
    assert all(type(f.data) is bytes for s in decoded.sessions for f in s.files)
    # And the libfdt writer still writes what that reader expects.
    assert decode_image(encode_image(decoded)) == PRE_LIBFDT_RECORDS


def test_image_written_before_libfdt_flags_the_awaiting_successor_bit() -> None:
    flags = [s.flags for s in decode_image(PRE_LIBFDT_IMAGE.read_bytes()).sessions]
    assert [bool(f & IMAGE_FLAG_AWAITING_SUCCESSOR) for f in flags] == [
        False,
        False,
        True,
        True,
        False,
    ]


@pytest.mark.skipif(DTC is None, reason="dtc not installed (Debian: device-tree-compiler)")
def test_dtc_reads_image_written_before_libfdt() -> None:
    result = _dtc("-I", "dtb", "-O", "dts", str(PRE_LIBFDT_IMAGE))
    assert result.returncode == 0, result.stderr
    assert b'session-name = "db";' in result.stdout
    assert result.stderr == b""
