"""The typed session listing: ``Device.list_sessions`` -> ``SessionListing``.

Parsing is pinned in process on documents shaped like luod's; the rest runs
against a real luod, whose listing must parse into the same objects and give
``luoctl sessions --json`` its document back unchanged.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest

import liveupdate
from liveupdate import uapi
from liveupdate.client.listing import FileInfo, SessionInfo, SessionListing, parse_listing
from luodtest import Luod, luoctl


def _session(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "db",
        "direction": "outgoing",
        "uid": 1000,
        "gid": 100,
        "pid": 4242,
        "created": 1732650000.5,
        "flags": 1,
        "keep_on_close": True,
        "retrieved": False,
        "finished": False,
        "nfiles": 1,
        "files": [{"token": 26, "handler": "memfd-v1", "type": "memfd", "size": 5}],
    }
    doc.update(changes)
    return doc


def _listing(*sessions: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {"generation": 3, "state": "normal", "sessions": list(sessions), **changes}


def test_a_listing_parses_into_typed_sessions_and_files() -> None:
    listing = parse_listing(_listing(_session(), _session(name="in", direction="incoming")), 2)
    assert (listing.generation, listing.state, listing.hidden) == (3, uapi.LuodState.NORMAL, 2)
    out, inc = listing.sessions
    assert isinstance(out, SessionInfo)
    assert out.direction is uapi.SessionDirection.OUTGOING
    assert inc.direction is uapi.SessionDirection.INCOMING
    assert (out.name, out.uid, out.gid, out.pid, out.created) == (
        "db",
        1000,
        100,
        4242,
        1732650000.5,
    )
    assert (out.flags, out.keep_on_close, out.retrieved, out.finished, out.nfiles) == (
        1,
        True,
        False,
        False,
        1,
    )
    assert out.files == (FileInfo(26, "memfd-v1", "memfd", {"size": 5}),)


def test_unknown_fields_are_kept_and_given_back() -> None:
    doc = _listing(
        _session(quota={"files": 3}, files=[{"token": 1, "handler": "x-v9", "colour": "red"}]),
        future_field=[1, 2],
    )
    listing = parse_listing(doc, 0)
    (session,) = listing.sessions
    assert session.extra == {"quota": {"files": 3}}
    assert listing.extra == {"future_field": [1, 2]}
    # A handler that says nothing of the type (a third-party one) is tolerated too.
    assert session.files == (FileInfo(1, "x-v9", None, {"colour": "red"}),)
    assert listing.to_dict() == {**doc, "hidden": 0}


def test_a_listing_without_files_says_none_not_empty() -> None:
    (empty,) = parse_listing(_listing(_session(files=[], nfiles=0))).sessions
    assert empty.files == ()
    doc = _session()
    del doc["files"]
    (session,) = parse_listing(_listing(doc)).sessions
    assert session.files is None
    assert "files" not in session.to_dict()


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([], "listing is not an object"),
        (_listing(_session(direction="sideways")), "direction 'sideways'"),
        (_listing(state="asleep"), "state 'asleep'"),
        (_listing(_session(uid="0")), "'uid' is '0', not a int"),
        (_listing(_session(uid=True)), "'uid' is True"),
        (_listing(_session(created="now")), "'created' is 'now', not a number"),
        (_listing(_session(files=[{"handler": "memfd-v1"}])), "'token' is None"),
        ({"generation": 1, "state": "normal"}, "'sessions' is None"),
    ],
)
def test_a_malformed_listing_is_eproto_naming_the_field(doc: Any, match: str) -> None:
    with pytest.raises(liveupdate.LiveUpdateError, match=match) as info:
        parse_listing(doc)
    assert info.value.errno == errno.EPROTO


# -- against luod ---------------------------------------------------------------------


@pytest.mark.luod_only
def test_luods_listing_is_typed_with_the_direction_enum(luod: Luod) -> None:
    with luod.open() as dev:
        outgoing = dev.create_session("typed")
        mfd = os.memfd_create("typed")
        os.write(mfd, b"hello")
        outgoing.preserve(mfd, 0x1A)
        os.close(mfd)
        outgoing.keep_on_close()
        listing = dev.list_sessions()
        bare = dev.list_sessions("typed", files=False)
    with outgoing:
        assert isinstance(listing, SessionListing)
        assert listing.state is uapi.LuodState.NORMAL and listing.hidden == 0
        (session,) = listing.sessions
        assert session.direction is uapi.SessionDirection.OUTGOING
        assert (session.name, session.uid, session.pid) == ("typed", os.getuid(), os.getpid())
        assert session.keep_on_close and session.flags == uapi.LUOD_SESSION_KEEP_ON_CLOSE
        (file,) = session.files or ()
        assert (file.token, file.handler, file.type) == (0x1A, "memfd-v1", "memfd")
        assert file.details == {"size": 5}
        (unlisted,) = bare.sessions
        assert unlisted.files is None and unlisted.nfiles == 1


@pytest.mark.luod_only
def test_luoctl_sessions_json_is_luods_document(luod: Luod) -> None:
    r, w = os.pipe()
    with luod.open() as dev:
        session = dev.create_session("as-json")
        session.preserve(r, 7)
        listing = dev.list_sessions()
    os.close(r)
    os.close(w)
    with session:
        proc = luoctl(luod.socket, "--json", "sessions")
        text = luoctl(luod.socket, "sessions")
    assert proc.returncode == 0 and text.returncode == 0, proc.stderr + text.stderr
    doc = json.loads(proc.stdout)
    assert doc == listing.to_dict()
    assert doc["sessions"][0]["direction"] == "outgoing"
    assert doc["sessions"][0]["files"][0]["type"] == "pipe"
    assert "as-json" in text.stdout and "outgoing" in text.stdout and "pipe-v1" in text.stdout
