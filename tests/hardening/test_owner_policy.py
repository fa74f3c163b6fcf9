"""Who may drive the state machine, between real uids (issue 8, finding 2).

PREPARE, CANCEL and REBOOT are luod's operator's: uid 0, luod's own uid, and
members of ``--admin-group`` (primary gid or a supplementary group, both as
the kernel reported them at connect time); anyone else gets ``EACCES``, the
contract's errno for "your credentials do not allow this". FINISH is open to
all, but an unprivileged caller finishes only its own incoming sessions.
GET_STATE stays open to all. UNPRESERVE on a session fd passed to another uid
is owner-checked like UPDATE and SET_FLAGS.

Clients run as other uids through ``setpriv``, like ``tests/test_owner_checks.py``
(whose helpers this module reuses), against luod running as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import Luod
from test_owner_checks import (
    AGENT,
    GIDS,
    SETPRIV,
    UID_A,
    UID_B,
    Agent,
    _make_readable,
    _system_python_ok,
    _world_tmp,
)

pytestmark = [
    pytest.mark.luod_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids"),
    pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux) to switch uids"),
]

PYTHON = "/usr/bin/python3"
#: The --admin-group of these tests (no such group needs to exist: a gid is enough).
ADMIN_GID = 61900
UID_ADMIN = 60011
UID_MEMBER = 60012


class UidAgent(Agent):
    """An ``owner_agent.py`` as ``uid`` with primary ``gid`` and supplementary ``groups``."""

    def __init__(
        self,
        uid: int,
        gid: int,
        groups: tuple[int, ...],
        lib: Path,
        device: str,
        log: Path,
    ) -> None:
        self.uid = uid
        self.log = log
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(lib),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        assert SETPRIV is not None
        groups_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
        cmd = [SETPRIV, "--reuid", str(uid), "--regid", str(gid), *groups_arg, PYTHON]
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [*cmd, str(lib / AGENT.name), device, str(theirs.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=env,
                cwd=lib,
                pass_fds=[theirs.fileno()],
                bufsize=0,
            )
        theirs.close()
        self._buf = b""
        ready = self._answer()
        assert ready == {"ok": True, "ready": True}, ready


@pytest.fixture(scope="module", name="lib")
def lib_fixture() -> Iterator[Path]:
    """A world-readable copy of the client library and the agent."""
    if not _system_python_ok():
        pytest.skip(f"needs {PYTHON} >= 3.11 for the non-root clients")
    root = Path(tempfile.mkdtemp(prefix="luod-policy-lib-", dir=_world_tmp()))
    try:
        src = Path(__file__).resolve().parents[2] / "src" / "liveupdate"
        shutil.copytree(src, root / "liveupdate", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(AGENT, root / AGENT.name)
        _make_readable(root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(name="start_luod")
def start_luod_fixture() -> Iterator[Callable[..., Luod]]:
    """luod as root on a 0666 socket every uid can reach, with extra options."""
    started: list[tuple[Luod, Path]] = []

    def start(*args: str) -> Luod:
        base = Path(tempfile.mkdtemp(prefix="luod-policy-", dir=_world_tmp()))
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        state.chmod(0o755)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        daemon = Luod(
            str(state / "device"), state, base / "luod.log", ["--socket-mode", "0666", *args], env
        )
        started.append((daemon, base))
        return daemon.start()

    yield start
    for daemon, base in started:
        if daemon.proc is not None:
            daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(name="agent")
def agent_fixture(lib: Path, tmp_path: Path) -> Iterator[Callable[..., UidAgent]]:
    """Start agents: ``agent(luod, uid, gid=..., groups=...)``."""
    started: list[UidAgent] = []

    def start(
        daemon: Luod, uid: int, gid: int | None = None, groups: tuple[int, ...] = ()
    ) -> UidAgent:
        log = tmp_path / f"agent-{uid}-{len(started)}.log"
        new = UidAgent(
            uid, GIDS.get(uid, uid) if gid is None else gid, groups, lib, daemon.socket, log
        )
        started.append(new)
        return new

    yield start
    for each in started:
        each.stop()


def state(daemon: Luod) -> liveupdate.StateInfo:
    with daemon.open(timeout=10.0) as dev:
        return dev.get_state()


def sessions(daemon: Luod) -> dict[str, tuple[int, str]]:
    """Session name -> (owner uid, direction), as root sees them."""
    with daemon.open(timeout=10.0) as dev:
        listing = dev.list_sessions(files=False)
    return {s.name: (s.uid, s.direction.name.lower()) for s in listing.sessions}


def handed_over(daemon: Luod, name: str, data: bytes) -> None:
    """A root session with one memfd, handed over (incoming, waiting)."""
    with daemon.open(timeout=10.0) as dev:
        session = dev.create_session(name)
    fd = os.memfd_create(name)
    try:
        os.write(fd, data)
        session.preserve(fd, 1)
    finally:
        os.close(fd)
    session.update()


def read_back(daemon: Luod, name: str) -> bytes:
    with daemon.open(timeout=10.0) as dev:
        session = dev.retrieve_session(name)
    with session:
        fd = session.retrieve(1)
        try:
            return os.pread(fd, 100, 0)
        finally:
            os.close(fd)


# -- the scenarios --------------------------------------------------------------------------


def test_state_events_from_another_uid_are_refused(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    daemon = start_luod()
    b = agent(daemon, UID_B)
    handed_over(daemon, "root-held", b"root's state")
    before = state(daemon)
    assert before.state == uapi.LuodState.UPDATED

    for event in ("prepare", "cancel", "reboot"):
        b.denied("event", event=event)
        after = state(daemon)
        assert (after.state, after.generation) == (before.state, before.generation), event
    # GET_STATE stays open to all.
    assert b.ok("state") == {"ok": True, "state": "updated", "generation": 1}
    # FINISH is allowed, but B has no session: root's is untouched.
    b.ok("event", event="finish")
    assert sessions(daemon) == {"root-held": (0, "incoming")}
    assert read_back(daemon, "root-held") == b"root's state"


def test_unprivileged_finish_finishes_only_the_callers_own_sessions(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    daemon = start_luod()
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    handed_over(daemon, "root-held", b"root's")
    a.ok("create", name="a-held", data="A's", token=1)
    a.ok("update", name="a-held")
    b.ok("create", name="b-held", data="B's", token=1)
    b.ok("update", name="b-held")
    assert {n for n, (_uid, d) in sessions(daemon).items() if d == "incoming"} == {
        "root-held",
        "a-held",
        "b-held",
    }

    b.ok("event", event="finish")
    assert sessions(daemon) == {"root-held": (0, "incoming"), "a-held": (UID_A, "incoming")}
    assert state(daemon).state == uapi.LuodState.UPDATED  # others still unfinished
    assert a.ok("retrieve", name="a-held", token=1)["data"] == "A's"

    # Root's FINISH finishes everyone's.
    with daemon.open(timeout=10.0) as dev:
        dev.set_event(uapi.LuodEvent.FINISH)
    assert sessions(daemon) == {"a-held": (UID_A, "incoming")}  # retrieved: kept until closed
    assert state(daemon).state == uapi.LuodState.NORMAL


def test_unpreserve_on_a_passed_session_fd_is_owner_checked(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    daemon = start_luod()
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    a.ok("create", name="a-pass", data="A's file", token=7)
    a.ok("send", name="a-pass")
    _msg, fds, _flags, _addr = socket.recv_fds(a.channel, 1, 1)
    assert len(fds) == 1
    try:
        socket.send_fds(b.channel, [b"S"], fds)
    finally:
        os.close(fds[0])
    b.ok("recv", key="a-pass")

    b.denied("unpreserve", name="a-pass", token=7)
    with daemon.open(timeout=10.0) as dev:
        (entry,) = dev.list_sessions("a-pass").sessions
    assert [f.token for f in entry.files or ()] == [7]
    # The owner may.
    a.ok("unpreserve", name="a-pass", token=7)
    with daemon.open(timeout=10.0) as dev:
        (entry,) = dev.list_sessions("a-pass").sessions
    assert entry.files == ()


def test_admin_group_members_may_drive_the_state_machine(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    daemon = start_luod("--admin-group", str(ADMIN_GID))
    by_primary = agent(daemon, UID_ADMIN, gid=ADMIN_GID)
    by_supplementary = agent(daemon, UID_MEMBER, groups=(ADMIN_GID,))
    outsider = agent(daemon, UID_B)

    by_primary.ok("event", event="prepare")
    assert state(daemon).state == uapi.LuodState.PREPARED
    outsider.denied("event", event="cancel")
    assert state(daemon).state == uapi.LuodState.PREPARED
    by_supplementary.ok("event", event="cancel")
    assert state(daemon).state == uapi.LuodState.NORMAL

    # An admin's FINISH is a privileged one: it finishes everyone's sessions.
    handed_over(daemon, "root-held", b"root's")
    outsider.ok("create", name="b-held", data="B's", token=1)
    outsider.ok("update", name="b-held")
    by_supplementary.ok("event", event="finish")
    assert sessions(daemon) == {}

    # And its REBOOT is accepted: the next generation serves.
    with daemon.open(timeout=10.0) as dev:
        root_session = dev.create_session("over-the-reboot")
    assert by_primary.ok("event", event="reboot")["generation"] == 1
    root_session.close()
    assert state(daemon).generation == 2
    assert sessions(daemon) == {"over-the-reboot": (0, "incoming")}


def test_without_admin_group_a_group_gives_no_privilege(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    daemon = start_luod()
    member = agent(daemon, UID_ADMIN, gid=ADMIN_GID, groups=(ADMIN_GID, 0))
    member.denied("event", event="prepare")
    member.denied("event", event="reboot")
    assert state(daemon).state == uapi.LuodState.NORMAL


def test_another_uid_cannot_take_the_name_of_a_session_waiting_for_its_successor(
    start_luod: Callable[..., Luod], agent: Callable[..., UidAgent]
) -> None:
    """Finding 6: the clash used to be accepted, then failed every reboot with EEXIST."""
    daemon = start_luod()
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    a.ok("create", name="shared", data="A's state", token=1)
    a.ok("update", name="shared")  # waits for its successor, across reboots too

    refused = b.call("create", name="shared")
    assert (refused["ok"], refused.get("errno")) == (False, "EEXIST"), refused
    b.ok("create", name="b-own")

    # Nothing blocks the reboot; A's session is still waiting afterwards.
    with daemon.open(timeout=10.0) as dev:
        dev.set_event(uapi.LuodEvent.REBOOT)
    assert state(daemon).generation == 2
    assert sessions(daemon) == {"shared": (UID_A, "incoming"), "b-own": (UID_B, "incoming")}
    refused = b.call("create", name="shared")
    assert (refused["ok"], refused.get("errno")) == (False, "EEXIST"), refused

    # Its owner may create the name before retrieving (what `luoctl run` does).
    a.ok("create", name="shared")
    assert a.ok("retrieve", name="shared", token=1, key="prev")["data"] == "A's state"
