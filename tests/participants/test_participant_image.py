"""The participants' nodes of the handover image (``docs/concepts/handover.md``).

Written only when there are participants, read back exactly, refused as
corrupt when inconsistent; images without them (older ones included) are
unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import libfdt
import pytest

from liveupdate import uapi
from liveupdate.handover_abi import (
    MAX_PARTICIPANT_DATA,
    CorruptImageError,
    FileRecord,
    HandoverImage,
    ParticipantRecord,
    SessionRecord,
)
from liveupdate.handover_codec import decode_image, encode_image, image_to_dict

OLD_IMAGE = Path(__file__).resolve().parents[1] / "data" / "handover-v1-2026-11-30.dtb"


def _image(participants: list[ParticipantRecord]) -> HandoverImage:
    return HandoverImage(
        liveupdate_number=7,
        writer="luod test",
        sessions=[
            SessionRecord(b"db", 1000, 100, 42, 1.5, 0, [FileRecord(1, "memfd-v1", 5, b"abc")]),
            SessionRecord(b"web", 0, 0, 1, 2.0),
        ],
        participants=participants,
    )


PARTICIPANTS = [
    ParticipantRecord(b"vmm", 0, 0, 77, (0x1122334455667788).to_bytes(8, "little")),
    ParticipantRecord(b"\xff odd \x01", 1000, 100, 78, b""),
    ParticipantRecord(b"x" * 63, 2, 3, 4, bytes(range(256))),
]


def _edited(image: HandoverImage, change: Any) -> bytes:
    tree = libfdt.Fdt(encode_image(image))
    tree.resize(tree.totalsize() + 4096)
    change(tree)
    tree.pack()
    return bytes(tree.as_bytearray()[: tree.totalsize()])


def _corrupt(data: bytes) -> str:
    with pytest.raises(CorruptImageError) as info:
        decode_image(data)
    return info.value.reason


def test_participants_round_trip_in_registration_order() -> None:
    image = _image(PARTICIPANTS)
    decoded = decode_image(encode_image(image))
    assert decoded == image
    assert [p.name for p in decoded.participants] == [p.name for p in PARTICIPANTS]


def test_an_image_without_participants_has_no_participant_node_or_count() -> None:
    data = encode_image(_image([]))
    assert b"participant" not in data
    assert decode_image(data).participants == []


def test_an_image_written_before_participants_still_decodes() -> None:
    decoded = decode_image(OLD_IMAGE.read_bytes())
    assert decoded.participants == []
    assert decoded.sessions


def test_data_max_is_the_uapi_s() -> None:
    assert MAX_PARTICIPANT_DATA == uapi.LUOD_PARTICIPANT_DATA_MAX


@pytest.mark.parametrize(
    ("participants", "problem"),
    [
        ([ParticipantRecord(b"", 0, 0, 0)], "must be 1 to 63 bytes"),
        ([ParticipantRecord(b"a\0b", 0, 0, 0)], "must be 1 to 63 bytes"),
        ([ParticipantRecord(b"a", 0, 0, 0, bytes(257))], "at most 256 bytes"),
        ([ParticipantRecord(b"a", 2**32, 0, 0)], "is not a u32"),
        ([ParticipantRecord(b"a", 0, 0, 0), ParticipantRecord(b"a", 1, 1, 1)], "used twice"),
    ],
)
def test_the_writer_refuses_what_the_reader_would(
    participants: list[ParticipantRecord], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        encode_image(_image(participants))


def test_a_participant_count_that_disagrees_with_the_nodes_is_corrupt() -> None:
    def bump(tree: Any) -> None:
        tree.setprop(0, "participant-count", (4).to_bytes(4, "big"))

    assert "participant-count 4 but 5 nodes follow" in _corrupt(_edited(_image(PARTICIPANTS), bump))


def test_participant_nodes_without_a_count_are_corrupt() -> None:
    def drop(tree: Any) -> None:
        tree.delprop(0, "participant-count")

    reason = _corrupt(_edited(_image(PARTICIPANTS), drop))
    assert "session-count is 2 but 5 nodes follow" in reason


def test_a_participant_node_without_its_name_is_corrupt() -> None:
    def unname(tree: Any) -> None:
        tree.delprop(tree.path_offset("/participant-1"), "participant-name")

    assert "participant-name" in _corrupt(_edited(_image(PARTICIPANTS), unname))


def test_a_participant_node_among_the_sessions_is_corrupt() -> None:
    image = _image(PARTICIPANTS[:1])

    def rename(tree: Any) -> None:
        tree.set_name(tree.path_offset("/session-1"), "participant-9")

    assert "expected 'session-1'" in _corrupt(_edited(image, rename))


def test_luoctl_inspect_lists_participants_only_when_there_are() -> None:
    assert "participants" not in image_to_dict(_image([]))
    listed = image_to_dict(_image(PARTICIPANTS))["participants"]
    assert listed[0] == {
        "name": "vmm",
        "name_encoding": "utf-8",
        "uid": 0,
        "gid": 0,
        "pid": 77,
        "size": 8,
        "data": "8877665544332211",
    }
    assert listed[1]["name_encoding"] == "hex"
