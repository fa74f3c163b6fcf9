"""The client side of a participant fd, against a plain socketpair standing for luod."""

from __future__ import annotations

import os
import socket

import pytest

from liveupdate.client.participant import Participant, ParticipantClosedError


def test_a_close_with_our_answer_unread_is_a_close_not_a_reset() -> None:
    ours, luods = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    part = Participant(ours.detach(), b"late")
    # An answer luod never read (it came too late), then luod's end closes:
    # the kernel reports ECONNRESET on our next receive.
    with socket.socket(fileno=os.dup(part.fileno())) as view:
        view.send(b"an answer nobody reads")
    luods.close()
    with pytest.raises(ParticipantClosedError):
        part.read_event(timeout=10)
    part.close()
