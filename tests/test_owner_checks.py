"""Owner checks between two real uids (luod only).

luod records the credentials of whoever created a session (``SO_PEERCRED`` of
the device opener) and refuses another uid, root excepted, with ``EACCES``:
retrieving the session, listing it by name, and, on a session fd (which can be
passed around), ``LUOD_SESSION_UPDATE`` and ``LUOD_SESSION_SET_FLAGS``, judged by
the credentials the kernel attaches to each message (``SO_PASSCRED``). A
listing of all sessions hides other users' sessions and counts them. The owner
is part of the handover image, so it survives ``luoctl reboot``.

The clients run as uids :data:`UID_A` and :data:`UID_B` (no accounts needed,
gids of their own) through ``setpriv``, each a long-lived
``tests/owner/owner_agent.py`` driven by JSON lines. The venv's interpreter
may be unreadable to them (under ``/root``), and so may this checkout, so
they run the system ``python3`` on a world-readable copy of
``src/liveupdate``; luod's socket (mode 0666) lives in a world-traversable
directory of its own.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import liveupdate
from liveupdate import uapi
from luodtest import REPO, Luod, luoctl_reboot

SETPRIV = shutil.which("setpriv")
SYSTEM_PYTHON = "/usr/bin/python3"
UID_A = 60001
UID_B = 60002
#: Each uid's gid, different from it so that a uid/gid mix-up shows.
GIDS = {UID_A: 61001, UID_B: 61002}
AGENT = Path(__file__).resolve().parent / "owner" / "owner_agent.py"
LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]
#: Seconds an agent may take to answer one request.
ANSWER_TIMEOUT = 15.0


def _system_python_ok() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.luod_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as two other uids"),
    pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux) to switch uids"),
]


# -- a world-readable copy of the client library, luod in a reachable directory ----------


def _world_tmp() -> str:
    """A temp root every uid can traverse (``TMPDIR`` may point somewhere private)."""
    base = Path(tempfile.gettempdir()).resolve()
    for path in (base, *base.parents):
        if not os.stat(path).st_mode & 0o001:
            return "/tmp"
    return str(base)


def _make_readable(root: Path) -> None:
    root.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


@pytest.fixture(scope="module")
def system_python() -> str:
    if not _system_python_ok():
        pytest.skip(f"needs {SYSTEM_PYTHON} >= 3.11 for the non-root clients")
    return SYSTEM_PYTHON


@pytest.fixture(scope="module")
def readable_lib(system_python: str) -> Iterator[Path]:
    """A 0755/0644 copy of ``src/liveupdate`` plus the agent script."""
    lib = Path(tempfile.mkdtemp(prefix="luod-owner-lib-", dir=_world_tmp()))
    try:
        shutil.copytree(
            REPO / "src" / "liveupdate",
            lib / "liveupdate",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        shutil.copy(AGENT, lib / AGENT.name)
        _make_readable(lib)
        yield lib
    finally:
        shutil.rmtree(lib, ignore_errors=True)


@pytest.fixture
def daemon() -> Iterator[Luod]:
    """luod as root on a 0666 socket in a 0755 directory every uid can reach."""
    base = Path(tempfile.mkdtemp(prefix="luod-owner-", dir=_world_tmp()))
    base.chmod(0o755)
    state = base / "state"
    state.mkdir()
    state.chmod(0o755)  # luod's check_private_dir accepts it: root's, not group/other-writable
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    luod = Luod(str(state / "device"), state, base / "luod.log", ["--socket-mode", "0666"], env)
    try:
        luod.start()
        yield luod
    finally:
        if luod.proc is not None:
            luod.stop()
        shutil.rmtree(base, ignore_errors=True)


# -- the agents -----------------------------------------------------------------------------


class Agent:
    """One ``owner_agent.py`` running as ``uid``; :meth:`call` sends a request."""

    def __init__(self, uid: int, python: str, lib: Path, device: str, log: Path) -> None:
        self.uid = uid
        self.log = log
        #: The test's end of the fd-passing channel (``SCM_RIGHTS``).
        self.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(lib),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "LANG": "C.UTF-8",
        }
        assert SETPRIV is not None  # the module is skipped without it
        gid = str(GIDS[uid])
        cmd = [SETPRIV, "--reuid", str(uid), "--regid", gid, "--clear-groups", python]
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

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            chunk = os.read(self.proc.stdout.fileno(), 65536) if readable else b""
            if not chunk:
                why = "timed out" if not readable else f"exited {self.proc.poll()}"
                raise AssertionError(
                    f"agent uid {self.uid} {why}:\n{self.log.read_text(errors='replace')}"
                )
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        return self._answer()

    def ok(self, op: str, **args: Any) -> dict[str, Any]:
        """:meth:`call` that must succeed."""
        answer = self.call(op, **args)
        assert answer["ok"], f"uid {self.uid} {op} {args}: {answer}"
        return answer

    def denied(self, op: str, **args: Any) -> dict[str, Any]:
        """:meth:`call` that must fail with EACCES (``PermissionDeniedError``)."""
        answer = self.call(op, **args)
        assert not answer["ok"], f"uid {self.uid} {op} {args} was allowed: {answer}"
        assert (answer["errno"], answer["error"]) == ("EACCES", "PermissionDeniedError"), answer
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.channel.close()


@pytest.fixture
def agents(
    system_python: str, readable_lib: Path, daemon: Luod, tmp_path: Path
) -> Iterator[Callable[[int], Agent]]:
    """Start agents by uid; all are stopped at teardown."""
    started: list[Agent] = []

    def start(uid: int) -> Agent:
        agent = Agent(
            uid, system_python, readable_lib, daemon.socket, tmp_path / f"agent-{uid}.log"
        )
        started.append(agent)
        who = agent.ok("whoami")
        assert (who["uid"], who["euid"], who["gid"]) == (uid, uid, GIDS[uid]), who
        return agent

    yield start
    for agent in started:
        agent.stop()


def root_listing(daemon: Luod, name: str | None = None) -> dict[str, Any]:
    with liveupdate.open_device(daemon.socket, timeout=10.0) as dev:
        # The listing as luod's JSON: these tests compare whole documents.
        return dev.list_sessions(name, files=False).to_dict()


def owners(listing: dict[str, Any]) -> dict[str, tuple[int, str]]:
    """Session name -> (owner uid, direction)."""
    return {s["name"]: (s["uid"], s["direction"]) for s in listing["sessions"]}


# -- the scenarios --------------------------------------------------------------------------


def test_other_uid_cannot_retrieve_or_list_a_handed_over_session(
    daemon: Luod, agents: Callable[[int], Agent]
) -> None:
    a, b = agents(UID_A), agents(UID_B)
    a.ok("create", name="a-sess", data="A's memory", token=0x1A)
    a.ok("update", name="a-sess")  # handed over: incoming, waiting for a retriever
    b.ok("create", name="b-sess")

    b.denied("retrieve", name="a-sess", token=0x1A)
    # A listing of everything shows B its own session only, and counts A's.
    mine = b.ok("list")
    assert mine["sessions"] == [{"name": "b-sess", "uid": UID_B, "direction": "outgoing"}]
    assert mine["hidden"] == 1
    b.denied("list", name="a-sess")
    assert b.ok("list", name="b-sess")["hidden"] == 0

    # Root sees everything, with the owners.
    everything = root_listing(daemon)
    assert owners(everything) == {"a-sess": (UID_A, "incoming"), "b-sess": (UID_B, "outgoing")}
    assert everything["hidden"] == 0
    named = root_listing(daemon, "a-sess")
    assert owners(named) == {"a-sess": (UID_A, "incoming")}
    assert [s["retrieved"] for s in named["sessions"]] == [False], "B's refusal took it"

    # A sees its own and not B's, and gets its session and its file back.
    own = a.ok("list")
    assert (owners(own), own["hidden"]) == ({"a-sess": (UID_A, "incoming")}, 1)
    assert a.ok("retrieve", name="a-sess", token=0x1A)["data"] == "A's memory"
    a.ok("finish", name="a-sess")
    # Even once retrieved, B learns nothing but EACCES about A's session.
    b.denied("retrieve", name="a-sess")


def test_passed_session_fd_is_checked_per_message(
    daemon: Luod, agents: Callable[[int], Agent]
) -> None:
    a, b = agents(UID_A), agents(UID_B)
    a.ok("create", name="a-pass", data="passed around", token=7)
    # A's session fd goes to B through the test (SCM_RIGHTS both ways).
    a.ok("send", name="a-pass")
    _msg, fds, _flags, _addr = socket.recv_fds(a.channel, 1, 1)
    assert len(fds) == 1
    rootheld = liveupdate.Session.from_fd(fds[0])
    try:
        socket.send_fds(b.channel, [b"S"], [rootheld.fileno()])
        b.ok("recv", key="a-pass")

        # GET_NAME has no owner check: holding the fd is enough to ask.
        assert b.ok("get_name", name="a-pass")["name"] == "a-pass"
        # The changes to the session are the owner's (or root's), whoever holds the fd.
        b.denied("update", name="a-pass")
        b.denied("set_flags", name="a-pass", flags=uapi.LUOD_SESSION_KEEP_ON_CLOSE)
        b.denied("keep_on_close", name="a-pass")
        (listed,) = root_listing(daemon, "a-pass")["sessions"]
        assert (listed["uid"], listed["direction"], listed["flags"]) == (UID_A, "outgoing", 0)

        # Same fd, but the caller is root (this process): allowed.
        assert rootheld.set_flags(uapi.LUOD_SESSION_KEEP_ON_CLOSE) == 0
        assert rootheld.set_flags(0) == uapi.LUOD_SESSION_KEEP_ON_CLOSE
        # And the owner itself, on its own copy of the fd.
        assert a.ok("set_flags", name="a-pass", flags=0)["old_flags"] == 0
    finally:
        rootheld.close()

    # B's refusals left the session intact: A hands it over and takes it back.
    a.ok("update", name="a-pass")
    dead = b.call("get_name", name="a-pass")  # the hand-over closed every copy
    assert (dead["ok"], dead.get("errno")) == (False, "ENODEV"), dead
    b.denied("retrieve", name="a-pass")
    assert a.ok("retrieve", name="a-pass", token=7)["data"] == "passed around"


def test_owner_survives_a_luod_reboot(daemon: Luod, agents: Callable[[int], Agent]) -> None:
    a, b = agents(UID_A), agents(UID_B)
    a.ok("create", name="a-held", data="held across", token=1)  # kept open over the reboot
    a.ok("create", name="a-upd", data="handed over", token=2)
    a.ok("update", name="a-upd")  # waits for its successor across the reboot
    b.ok("create", name="b-held", data="B's", token=3)

    luoctl_reboot(daemon, wait=None)

    listing = root_listing(daemon)
    assert listing["generation"] == 2
    assert {s["name"]: s["gid"] for s in listing["sessions"]} == {
        "a-held": GIDS[UID_A],
        "a-upd": GIDS[UID_A],
        "b-held": GIDS[UID_B],
    }
    assert owners(listing) == {
        "a-held": (UID_A, "incoming"),
        "a-upd": (UID_A, "incoming"),
        "b-held": (UID_B, "incoming"),
    }
    b.denied("retrieve", name="a-held")
    b.denied("retrieve", name="a-upd")
    b.denied("list", name="a-held")
    seen_by_b = b.ok("list")
    assert (seen_by_b["generation"], seen_by_b["hidden"]) == (2, 2)
    assert seen_by_b["sessions"] == [{"name": "b-held", "uid": UID_B, "direction": "incoming"}]
    a.denied("retrieve", name="b-held")

    assert a.ok("retrieve", name="a-held", token=1, key="a-held-2")["data"] == "held across"
    assert a.ok("retrieve", name="a-upd", token=2, key="a-upd-2")["data"] == "handed over"
    assert b.ok("retrieve", name="b-held", token=3, key="b-held-2")["data"] == "B's"


def test_root_may_retrieve_another_users_session(
    daemon: Luod, agents: Callable[[int], Agent]
) -> None:
    a, b = agents(UID_A), agents(UID_B)
    a.ok("create", name="a-root", data="for root too", token=9)
    a.ok("update", name="a-root")
    b.denied("retrieve", name="a-root")

    with liveupdate.open_device(daemon.socket, timeout=10.0) as dev:
        session = dev.retrieve_session("a-root")
    with session:
        fd = session.retrieve(9)
        try:
            assert os.pread(fd, 100, 0) == b"for root too"
        finally:
            os.close(fd)
        (listed,) = root_listing(daemon, "a-root")["sessions"]
        # Retrieving does not make root the owner.
        assert (listed["uid"], listed["retrieved"]) == (UID_A, True)
        session.finish()
