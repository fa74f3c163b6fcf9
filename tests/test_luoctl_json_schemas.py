"""Every ``luoctl --json`` document has a schema, shown in the guide and kept by real output.

The schemas are defined once (``liveupdate.cli.schemas``); the guide's
section of each command must show the rendered schema, and the documents a
real ``luoctl`` prints against a real ``luod`` must match them exactly: no
undocumented key, none missing, every value of its documented type.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liveupdate.cli.luoctl import main as luoctl_main
from liveupdate.cli.schemas import SCHEMAS, Schema, render_block, validate
from liveupdate.handover_abi import FileRecord, HandoverImage, SessionRecord
from liveupdate.handover_codec import encode_image
from luodtest import LUOCTL, REPO, Luod, luoctl, memfd, wait_for

GUIDE = REPO / "docs" / "guides" / "luoctl.md"


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", GUIDE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def json_of(daemon_socket: str, *args: str, schema: str) -> Any:
    """``luoctl --json ARGS``: must succeed and match ``SCHEMAS[schema]``."""
    result = luoctl(daemon_socket, "--json", *args)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    described = SCHEMAS[schema]
    assert described is not None
    assert validate(doc, described) == [], f"luoctl --json {' '.join(args)}: {result.stdout}"
    return doc


# -- the schemas, the commands and the guide ----------------------------------------------


def test_every_luoctl_command_has_a_json_schema() -> None:
    commands = set(luoctl_main.commands)
    described = {name.split()[0] for name in SCHEMAS}
    assert commands - described == set(), "commands whose --json output is not described"
    assert described - commands == set(), "schemas of commands luoctl does not have"


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_the_luoctl_guide_shows_each_schema_in_its_commands_section(name: str) -> None:
    body = _sections()[name.split()[0]]
    if SCHEMAS[name] is None:
        assert "prints no JSON" in body, f"luoctl {name}: say that it prints no JSON"
        return
    assert render_block(name) in body, (
        f"luoctl {name}: the guide's schema is out of date; paste the output of "
        f"`python -m liveupdate.cli.schemas '{name}'`"
    )


@pytest.mark.parametrize(
    ("doc", "schema", "problem"),
    [
        ({"a": 1}, {"a": "int", "b": "str"}, "$: 'b' is missing"),
        ({"a": 1, "c": 2}, {"a": "int"}, "$: 'c' is not documented"),
        ({"a": True}, {"a": "int"}, "$.a: True is not int"),
        ({"a": 1}, {"a": "bool"}, "$.a: 1 is not bool"),
        ({"a": "x"}, {"a": "float|null"}, "$.a: 'x' is not float|null"),
        ({"a": "maybe"}, {"a": ("yes", "no")}, "$.a: 'maybe' is not one of ('yes', 'no')"),
        ({"a": [1, "2"]}, {"a": ["int"]}, "$.a[1]: '2' is not int"),
        ({"m": {"x": 1, "y": "z"}}, {"m": {"*": "int"}}, "$.m.y: 'z' is not int"),
        ([], {"a": "int"}, "$: [] is not an object"),
    ],
)
def test_validate_reports_what_does_not_match(doc: Any, schema: Schema, problem: str) -> None:
    assert validate(doc, schema) == [problem]


@pytest.mark.parametrize(
    ("doc", "schema"),
    [
        ({"a": 1}, {"a": "float"}),  # a JSON number without a fraction is a float too
        ({"a": None}, {"a": "float|null"}),
        ({}, {"a?": "int"}),
        ({"a": 1, "b": {"c": [1]}}, {"a": "int", "*": "any"}),
        ({"a": {}}, {"a": "object"}),
    ],
)
def test_validate_accepts_what_the_notation_allows(doc: Any, schema: Schema) -> None:
    assert validate(doc, schema) == []


# -- real outputs ---------------------------------------------------------------------------


@pytest.fixture(name="populated")
def populated_fixture(luod: Luod) -> Iterator[Luod]:
    """luod holding ``vm`` (a memfd and a pipe) and ``web`` (a listening socket)."""
    with luod.open() as dev:
        vm = dev.create_session("vm")
        web = dev.create_session("web")
    r, w = os.pipe()
    listener = socket.create_server(("127.0.0.1", 0))
    ram = memfd(b"ram")
    try:
        vm.preserve(ram, 0x1A)
        vm.preserve(r, 2)
        web.preserve(listener, 1)
    finally:
        for fd in (ram, r, w):
            os.close(fd)
        listener.close()
    yield luod
    vm.close()
    web.close()


@pytest.mark.luod_only
def test_state_status_and_sessions_json_match_their_schemas(populated: Luod) -> None:
    state = json_of(populated.socket, "state", schema="state")
    assert state["preserved_files"] == 3
    status = json_of(populated.socket, "status", schema="status")
    assert status["files"]["preserved"] == 3
    listing = json_of(populated.socket, "sessions", schema="sessions")
    assert sorted(s["name"] for s in listing["sessions"]) == ["vm", "web"]
    one = json_of(populated.socket, "sessions", "web", schema="sessions")
    assert [s["name"] for s in one["sessions"]] == ["web"]


@pytest.mark.luod_only
def test_event_reboot_and_watch_json_match_their_schemas(populated: Luod) -> None:
    assert json_of(populated.socket, "prepare", schema="prepare")["event"] == "prepare"
    assert json_of(populated.socket, "cancel", schema="cancel")["event"] == "cancel"
    reboot = json_of(populated.socket, "reboot", "--wait", "60", schema="reboot")
    assert (reboot["old_generation"], reboot["new_generation"]) == (1, 2)
    assert reboot["incoming_sessions"] == 2
    updated = json_of(populated.socket, "status", schema="status")
    assert updated["state"] == "updated"
    assert json_of(populated.socket, "finish", schema="finish")["generation"] == 2
    watch = subprocess.Popen(
        [*LUOCTL, "--socket", populated.socket, "--json", "state", "--watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert watch.stdout is not None
    line = watch.stdout.readline()
    watch.send_signal(signal.SIGINT)
    watch.communicate(timeout=30)
    assert watch.returncode == 0
    watch_schema = SCHEMAS["state --watch"]
    assert watch_schema is not None
    assert validate(json.loads(line), watch_schema) == []


@pytest.mark.luod_only
def test_inspect_json_matches_its_schema(populated: Luod, tmp_path: Path) -> None:
    json_of(populated.socket, "reboot", "--no-exec", schema="reboot")
    image = populated.state_dir / "last-handover.dtb"
    doc = json_of(populated.socket, "inspect", str(image), schema="inspect")
    assert {f["compatible"] for s in doc["sessions"] for f in s["files"]} == {
        "memfd-v1",
        "pipe-v1",
        "socket-v1",
    }
    # A third-party handler's data is not decoded (null); a name that is not
    # UTF-8 is given in hex.
    foreign = tmp_path / "foreign.dtb"
    foreign.write_bytes(
        encode_image(
            HandoverImage(
                liveupdate_number=7,
                sessions=[
                    SessionRecord(
                        name=b"\xff\xfe",
                        uid=0,
                        gid=0,
                        pid=1,
                        created=1.0,
                        files=[FileRecord(token=1, compatible="vendor-x-v1", fd=9, data=b"\1")],
                    )
                ],
            )
        )
    )
    doc = json_of(populated.socket, "inspect", str(foreign), schema="inspect")
    [session] = doc["sessions"]
    assert session["name_encoding"] == "hex"
    assert session["files"][0]["decoded"] is None


@pytest.mark.luod_only
def test_update_json_matches_its_schema(luod: Luod, tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(
            [*LUOCTL, "--socket", luod.socket, "run", "--session", "svc", "--",
             sys.executable, "-c", "import time; time.sleep(600)"],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )  # fmt: skip
    try:
        children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
        wait_for(lambda: bool(children.read_text().split()), f"the service\n{log}", 30)
        doc = json_of(luod.socket, "update", "svc", schema="update")
        assert doc == {"session": "svc", "supervisor": supervisor.pid}
    finally:
        supervisor.send_signal(signal.SIGTERM)
        try:
            supervisor.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()


def test_install_units_json_matches_its_schema(tmp_path: Path) -> None:
    unused = str(tmp_path / "no-luod")  # install-units talks to no luod
    dry = json_of(
        unused, "install-units", "--dry-run", "--dir", str(tmp_path), schema="install-units"
    )
    assert dry["dry_run"] is True
    assert {u["action"] for u in dry["units"]} == {"would write"}
    assert os.listdir(tmp_path) == []
    done = json_of(unused, "install-units", "--dir", str(tmp_path), schema="install-units")
    assert {u["action"] for u in done["units"]} == {"wrote"}
    again = json_of(unused, "install-units", "--dir", str(tmp_path), schema="install-units")
    assert {u["action"] for u in again["units"]} == {"unchanged"}
