"""luod's command line and process behaviour, and luoctl's state commands.

Covers what an operator or a service manager sees: the options and their
help, the socket's permissions, the log formats, SIGTERM, the sd_notify
protocol, the fd limit, the default socket of an unprivileged user,
``--check-image``, and luoctl's prepare/cancel/state/finish/reboot.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

import liveupdate
from liveupdate.cli.luoctl import main as luoctl_main
from liveupdate.cli.schemas import STATE as STATE_SCHEMA
from liveupdate.handover_abi import FileRecord, HandoverImage, SessionRecord
from liveupdate.handover_codec import encode_image
from liveupdate.server import luod as luod_module
from luodtest import Luod, can_connect, event_names, events, memfd, wait_for

pytestmark = pytest.mark.luod_only

State = liveupdate.uapi.LuodState
OPTIONS = [
    "--socket",
    "--socket-mode",
    "--socket-group",
    "--state-dir",
    "--state-file",
    "--max-sessions",
    "--max-files",
    "--log-format",
    "--log-level",
    "--exec",
    "--check-image",
]
NOBODY = 65534


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def luoctl(sock: str, *args: str) -> Any:
    """Run luoctl in-process (the real click command); returns click's Result."""
    return CliRunner().invoke(luoctl_main, ["--socket", sock, *args])


def state_file(daemon: Luod) -> str:
    return (daemon.state_dir / "state").read_text().strip()


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


# ---------------------------------------------------------------------------
# luod's options
# ---------------------------------------------------------------------------


def test_help_documents_every_option() -> None:
    result = CliRunner().invoke(luod_module.main, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in OPTIONS:
        assert f"  {option} " in result.output, option
    for hidden in ("--handover", "--listen-fd", "--lock-fd"):
        assert hidden not in result.output
    for param in luod_module.main.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{param.opts} has no help text"
    assert "$XDG_RUNTIME_DIR/liveupdate/device" in result.output


def test_bad_socket_mode_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        luod_module.main, ["--socket", str(tmp_path / "s"), "--socket-mode", "9x"]
    )
    assert result.exit_code == 2
    assert "'9x' is not octal" in result.output
    assert not (tmp_path / "s").exists()


def test_socket_mode_defaults_to_0600(luod: Luod) -> None:
    st = os.stat(luod.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()


def test_socket_mode_and_group_are_applied(luod_factory: Callable[..., Luod]) -> None:
    group = next((g for g in grp.getgrall() if g.gr_gid != os.getegid()), None)
    if group is None:
        pytest.skip("no second group on this machine")
    daemon = luod_factory("--socket-mode", "0660", "--socket-group", group.gr_name)
    st = os.stat(daemon.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    with daemon.open() as dev:  # still a working device
        dev.get_state()


def test_state_dir_and_state_file_options(
    luod_factory: Callable[..., Luod], tmp_path: Path
) -> None:
    state_dir = tmp_path / "elsewhere"
    state = tmp_path / "watched-state"
    daemon = luod_factory("--state-dir", str(state_dir), "--state-file", str(state))
    assert (state_dir / "luod.lock").read_text() == f"{daemon.pid}\n"
    assert state.read_text() == "normal\n"
    assert not (daemon.state_dir / "luod.lock").exists()


# ---------------------------------------------------------------------------
# logs and signals
# ---------------------------------------------------------------------------


def _start_json(luod_factory: Callable[..., Luod]) -> Luod:
    daemon = luod_factory("--log-format", "json", start=False)
    daemon.start(wait=False)
    wait_for(lambda: bool(events(daemon, "started")) and can_connect(daemon.socket), "luod", 20)
    with daemon.open() as dev:
        dev.get_state()
    # The close travels to luod asynchronously: a SIGTERM sent at once may be
    # handled first, and the stop then closes the connection without the
    # device-closed event this log is meant to show.
    wait_for(lambda: bool(events(daemon, "device-closed")), "device-closed", 20)
    assert daemon.stop() == 0
    return daemon


def test_json_log_events_are_json_objects(luod_factory: Callable[..., Luod]) -> None:
    daemon = _start_json(luod_factory)
    events = []
    for line in daemon.log_text().splitlines():
        if line.startswith("{"):
            obj = json.loads(line)
            assert isinstance(obj, dict)
            assert {"ts", "level", "event", "pid"} <= obj.keys()
            assert isinstance(obj["ts"], float)
            events.append(obj)
    names = [e["event"] for e in events]
    for name in ("started", "device-opened", "device-closed", "signal", "stopped"):
        assert name in names
    started = events[names.index("started")]
    assert started["version"] == luod_module.__version__
    assert started["generation"] == 1
    assert started["level"] == "info"
    assert started["restored"] is False


def test_json_log_has_only_json_lines(luod_factory: Callable[..., Luod]) -> None:
    daemon = _start_json(luod_factory)
    for line in daemon.log_text().splitlines():
        assert isinstance(json.loads(line), dict), line


def test_json_log_pid_is_the_daemons(luod_factory: Callable[..., Luod]) -> None:
    daemon = _start_json(luod_factory)
    events = [json.loads(x) for x in daemon.log_text().splitlines() if x.startswith("{")]
    opened = next(e for e in events if e["event"] == "device-opened")
    assert os.getpid() in opened.values()  # the client is still named
    for obj in events:
        assert obj["pid"] == daemon.pid, obj


def test_human_log_is_one_line_per_event_with_its_fields(
    luod_factory: Callable[..., Luod],
) -> None:
    """``--log-format human`` (the default) writes ``stamp luod[pid] LEVEL event k=v ...``.

    The rest of the suite runs luod with JSON logs and reads events; this is
    the one test of the human format's text.
    """
    daemon = luod_factory("--log-format", "human")
    assert daemon.stop() == 0
    lines = daemon.log_text().splitlines()
    started = next(line for line in lines if " started " in line)
    stamp, who, level, name, *fields = started.split(" ")
    assert stamp.endswith("Z") and "T" in stamp, started
    assert (who, level, name) == (f"luod[{daemon.pid}]", "INFO", "started"), started
    assert f"version={luod_module.__version__}" in fields, started
    assert "generation=1" in fields, started
    assert lines[-1].endswith(" stopped"), lines[-1]
    assert not any(line.startswith("{") for line in lines), lines


def test_sigterm_stops_cleanly(luod: Luod, stack: contextlib.ExitStack) -> None:
    with luod.open() as dev:
        session = stack.enter_context(dev.create_session("held"))
    session.preserve(stack.enter_context(os.fdopen(memfd(b"x"), "rb")), 1)
    assert luod.stop(signal.SIGTERM) == 0
    assert not os.path.lexists(luod.socket)
    assert events(luod, "signal", signal="SIGTERM")
    assert event_names(luod)[-1] == "stopped"


def test_sd_notify_ready_stopping_and_reboot(
    luod_factory: Callable[..., Luod], tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    path = tmp_path / "notify"
    notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
    notify.bind(str(path))
    notify.settimeout(20)
    daemon = luod_factory(start=False)
    daemon.env["NOTIFY_SOCKET"] = str(path)  # the factory drops the caller's
    daemon.start()

    def next_message() -> list[str]:
        return notify.recv(4096).decode().split("\n")

    assert next_message() == ["READY=1", "STATUS=serving generation 1"]

    with daemon.open() as dev:
        session = stack.enter_context(dev.create_session("kept"))
        session.preserve(stack.enter_context(os.fdopen(memfd(b"x"), "rb")), 1)
        dev.set_event(liveupdate.uapi.LuodEvent.REBOOT)
    assert next_message() == ["STATUS=live update in progress"]
    # The main pid moves to the successor: the old generation says so (enough
    # for NotifyAccess=main), and so does the successor with its READY
    # (NotifyAccess=all); the two datagrams may arrive in either order.
    messages = sorted([next_message(), next_message()], key=len)
    successor = daemon.pid
    assert messages == [
        [f"MAINPID={successor}"],
        [f"MAINPID={successor}", "READY=1", "STATUS=serving generation 2"],
    ]
    with daemon.open() as dev:
        assert dev.get_state().generation == 2

    assert daemon.stop() == 0
    assert next_message() == ["STOPPING=1"]


def test_nofile_soft_limit_is_raised_to_hard(luod_factory: Callable[..., Luod]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 128:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} is not usable here")
    daemon = luod_factory(start=False)
    # A low soft limit the child inherits; above what this process has open
    # (the fixtures of earlier tests), or the start itself would hit it.
    low = max(64, len(os.listdir("/proc/self/fd")) + 64)
    assert low < hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        daemon.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{daemon.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard), str(hard)]
    assert events(daemon, "started", nofile=hard)


# ---------------------------------------------------------------------------
# an unprivileged user's default socket
# ---------------------------------------------------------------------------


@pytest.fixture
def nobody() -> Iterator[tuple[list[str], dict[str, str], Path]]:
    """(command prefix, env, XDG_RUNTIME_DIR) to run this package as uid 65534.

    The test venv's interpreter may live where that user cannot read (e.g.
    under /root), so the system python3 runs this checkout's sources with
    this venv's site-packages on PYTHONPATH.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    setpriv, python = shutil.which("setpriv"), shutil.which("python3", path="/usr/bin:/bin")
    if setpriv is None or python is None:
        pytest.skip("needs setpriv and a system python3")
    check = subprocess.run(
        [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.stdout.strip() != "True":
        pytest.skip("the system python3 is older than 3.11")
    runtime = Path(tempfile.mkdtemp(prefix="luod-xdg-"))
    os.chown(runtime, NOBODY, NOBODY)
    runtime.chmod(0o700)
    src = Path(liveupdate.__file__).resolve().parents[1]
    env = {
        "PATH": "/usr/bin:/bin",
        "XDG_RUNTIME_DIR": str(runtime),
        "PYTHONPATH": f"{src}:{sysconfig.get_paths()['purelib']}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    prefix = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", python]
    try:
        yield prefix, env, runtime
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def test_default_socket_of_an_unprivileged_user(
    nobody: tuple[list[str], dict[str, str], Path],
) -> None:
    prefix, env, runtime = nobody
    snippet = (
        "import os; from liveupdate import paths; print(os.geteuid(), paths.default_socket_path())"
    )
    out = subprocess.run(
        [*prefix, "-c", snippet], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(NOBODY), f"{runtime}/liveupdate/device"]
    no_xdg = {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"}
    out = subprocess.run(
        [*prefix, "-c", snippet], env=no_xdg, capture_output=True, text=True, check=True
    ).stdout.split()
    # Under /tmp/liveupdate-UID/ (the docstring says .../device, the code
    # returns .../liveupdate/device: either way the user's own directory).
    assert out[0] == str(NOBODY)
    assert out[1].startswith(f"/tmp/liveupdate-{NOBODY}/") and out[1].endswith("/device")

    # luod itself, unprivileged and without --socket, serves there.
    sock = runtime / "liveupdate" / "device"
    proc = subprocess.Popen(
        [*prefix, "-m", "liveupdate.server.luod"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: can_connect(str(sock)) or proc.poll() is not None, "luod", 20)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        st = os.stat(sock)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
        with liveupdate.open_device(sock, timeout=5) as dev:
            assert dev.get_state().generation == 1
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stderr:
            proc.stderr.close()
    assert not sock.exists()


# ---------------------------------------------------------------------------
# --check-image
# ---------------------------------------------------------------------------


def test_check_image(luod: Luod, tmp_path: Path, stack: contextlib.ExitStack) -> None:
    with luod.open() as dev:
        session = stack.enter_context(dev.create_session("db"))
    session.preserve(stack.enter_context(os.fdopen(memfd(b"data"), "rb")), 7)
    result = luoctl(luod.socket, "reboot", "--no-exec", "--wait", "20")
    assert result.exit_code == 0, result.output
    good = luod.state_dir / "last-handover.dtb"

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "liveupdate.server.luod", "--check-image", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = check(good)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "ok: image v1, 1 sessions, 1 files"

    garbage = tmp_path / "garbage.dtb"
    garbage.write_bytes(b"\xd0\x0d\xfe\xed" + os.urandom(60))
    bad = check(garbage)
    assert bad.returncode == 1
    assert f"cannot read handover image {garbage}" in bad.stderr

    unknown = tmp_path / "unknown.dtb"
    image = HandoverImage(
        liveupdate_number=1,
        sessions=[
            SessionRecord(
                name=b"s",
                uid=0,
                gid=0,
                pid=1,
                created=1.0,
                files=[FileRecord(token=1, compatible="teleporter-v9", fd=5, data=b"")],
            )
        ],
    )
    unknown.write_bytes(encode_image(image))
    refused = check(unknown)
    assert refused.returncode == 1
    assert "teleporter-v9 unknown to this luod" in refused.stderr

    missing = check(tmp_path / "missing.dtb")
    assert missing.returncode == 1
    assert "cannot read handover image" in missing.stderr


# ---------------------------------------------------------------------------
# luoctl: the state machine
# ---------------------------------------------------------------------------


def test_luoctl_prepare_cancel_and_state(luod: Luod) -> None:
    result = luoctl(luod.socket, "--json", "state")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["state"] == "normal"
    assert data["generation"] == 1
    # Every field of GET_STATE, as documented (liveupdate.cli.schemas.STATE).
    assert set(data) == set(STATE_SCHEMA)
    assert state_file(luod) == "normal"

    result = luoctl(luod.socket, "prepare")
    assert result.exit_code == 0, result.output
    assert "prepared" in result.stdout
    assert json.loads(luoctl(luod.socket, "--json", "state").stdout)["state"] == "prepared"
    assert state_file(luod) == "prepared"

    result = luoctl(luod.socket, "--json", "cancel")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"event": "cancel", "generation": 1}
    assert state_file(luod) == "normal"

    result = luoctl(luod.socket, "cancel")  # nothing to cancel
    assert result.exit_code == 1
    assert "luoctl:" in result.stderr and "(EINVAL)" in result.stderr
    assert state_file(luod) == "normal"
    with luod.open() as dev:
        assert dev.get_state().state == State.NORMAL


def test_luoctl_prepare_failure_says_why(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory("--exec", "/bin/false")  # a next version that reads nothing
    result = luoctl(daemon.socket, "prepare")
    assert result.exit_code == 1
    assert "pre-flight failed" in result.stderr and "(EIO)" in result.stderr
    assert state_file(daemon) == "normal"


def test_luoctl_cancel_error_is_current(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory("--exec", "/bin/false")
    assert luoctl(daemon.socket, "prepare").exit_code == 1  # leaves a last_error behind
    result = luoctl(daemon.socket, "cancel")
    assert result.exit_code == 1
    assert "(EINVAL)" in result.stderr
    assert "pre-flight" not in result.stderr
    assert "not prepared" in result.stderr


def test_luoctl_reboot_no_exec_prints_generations(luod: Luod, stack: contextlib.ExitStack) -> None:
    pid = luod.pid
    result = luoctl(luod.socket, "reboot", "--no-exec", "--wait", "20")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("rebooted: generation 1 -> 2 in ")
    assert "(0 incoming sessions)" in result.stdout
    result = luoctl(luod.socket, "--json", "reboot", "--no-exec", "--wait", "20")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["old_generation"], data["new_generation"], data["state"]) == (2, 3, "normal")
    assert luod.pid == pid and luod.alive()
    assert [e["exec"] for e in events(luod, "reboot-complete")] == [False, False]


def test_luoctl_finish_after_reboot(luod: Luod, stack: contextlib.ExitStack) -> None:
    fds = {name: memfd(name.encode() * 100) for name in ("kept", "dropped")}
    for fd in fds.values():
        stack.callback(os.close, fd)
    with luod.open() as dev:
        for name, fd in fds.items():
            stack.enter_context(dev.create_session(name)).preserve(fd, 1)
    result = luoctl(luod.socket, "--json", "reboot", "--wait", "20")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["incoming_sessions"] == 2
    assert json.loads(result.stdout)["state"] == "updated"
    assert state_file(luod) == "updated"

    with luod.open() as dev:
        kept = stack.enter_context(dev.retrieve_session("kept"))
    retrieved = kept.retrieve(1)
    stack.callback(os.close, retrieved)

    result = luoctl(luod.socket, "finish")
    assert result.exit_code == 0, result.output
    assert "finished every incoming session" in result.stdout
    assert state_file(luod) == "normal"
    with luod.open() as dev:
        info = dev.get_state()
        assert info.state == State.NORMAL
        assert info.preserved_files == 0
        with pytest.raises(liveupdate.NotFoundError):
            dev.retrieve_session("dropped")  # never retrieved: discarded
    with pytest.raises(liveupdate.NotFoundError):
        kept.retrieve(1)  # finished
    assert os.pread(retrieved, 400, 0) == b"kept" * 100  # ours alone now
    held = {os.stat(f"/proc/{luod.pid}/fd/{n}").st_ino for n in os.listdir(f"/proc/{luod.pid}/fd")}
    assert os.fstat(fds["dropped"]).st_ino not in held
