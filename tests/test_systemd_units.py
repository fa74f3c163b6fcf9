"""luod's systemd units: shipped in the package, installed by ``luoctl install-units``,
and doing what they say, with real processes.

* The package ships ``luod.socket`` and ``luod.service`` (package data of
  ``liveupdate``, listed in ``pyproject.toml`` so that the wheel has them).
* ``luoctl install-units --dir DIR`` writes them with the commands of this
  installation in ``ExecStart=`` and ``ExecReload=``; ``--dry-run`` writes
  nothing.
* The installed units are well-formed: ``systemd-analyze verify`` (Debian's
  ``systemd``) runs offline, without a running systemd, and must say nothing
  but that a setting is newer than the systemd installed; our own strict
  reading checks what the units must say whatever systemd is at hand.
* The fd store's settings fit what luod stores there (one fd per preserved
  file and its two state slots, :mod:`liveupdate.server.fdstore`) and
  luod's fd budget (``LimitNOFILE=``).
* ``ExecReload=``, the exact command line read out of the installed unit,
  live-updates a luod started by the unit's exact ``ExecStart=`` command
  line, socket-activated on the unit's own socket path (in a mount
  namespace of the test's, so ``/run/liveupdate`` is the test's alone), with
  the unit's ``CapabilityBoundingSet=`` and ``NoNewPrivileges=``, while
  another process holds the device open: the generation goes up, the
  holder's session comes through, and the service manager (the test's
  ``sd_notify`` peer) hears ``READY=1`` from the new main process.
"""

from __future__ import annotations

import array
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import liveupdate
from liveupdate.cli import units
from liveupdate.cli.luoctl import main as luoctl_main
from liveupdate.client.control import open_control
from liveupdate.core.policy import Limits
from liveupdate.server.fdstore import STATE_SLOTS
from liveupdate.server.luod import main as luod_main
from luodtest import LUOCTL, REPO, read_all, running, wait_for, wait_until

pytestmark = pytest.mark.luod_only

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
UNSHARE = shutil.which("unshare")
NSENTER = shutil.which("nsenter")
SETPRIV = shutil.which("setpriv")

#: systemd's own PATH for the processes it starts.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Settings newer than some systemd still in use, with the version that knows them:
#: an older ``systemd-analyze verify`` says it ignores them, and nothing else.
NEWER_SETTINGS = {"FileDescriptorStorePreserve": 254}


# -- reading a unit ---------------------------------------------------------------------

Unit = dict[str, dict[str, list[str]]]

_SECTION = re.compile(r"\[([A-Za-z]+)\]")
_SETTING = re.compile(r"([A-Z][A-Za-z0-9]*)=(.*)")


def parse_unit(text: str) -> Unit:
    """A unit file, read strictly: sections, ``Key=value`` lines (a key may
    repeat), comments and blank lines; anything else (a continuation line, a
    setting outside a section, trailing blanks) fails the test."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}: {line!r}"
        assert line == line.rstrip(), f"trailing blanks, {where}"
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"a continuation line, {where}"
        if match := _SECTION.fullmatch(line):
            assert match.group(1) not in unit, f"a section twice, {where}"
            section = unit.setdefault(match.group(1), {})
            continue
        match = _SETTING.fullmatch(line)
        assert match is not None and section is not None, f"not a setting of a section, {where}"
        section.setdefault(match.group(1), []).append(match.group(2))
    return unit


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section][key]
    assert len(values) == 1, f"[{section}] {key}= given {len(values)} times"
    return values[0]


def exec_argv(unit: Unit, key: str) -> list[str]:
    """An ``Exec*=`` command line as systemd reads it. Ours are plain words (no
    prefix, quote, specifier or variable): split at blanks is systemd's reading."""
    line = one(unit, "Service", key)
    assert re.fullmatch(r"[A-Za-z0-9_@+=:,./ -]+", line) and line[0] == "/", line
    return line.split()


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


@dataclass
class Installed:
    directory: Path
    socket: Unit
    service: Unit
    texts: dict[str, str]


def install(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``luoctl [ARGS] install-units --dir DIRECTORY`` as a real command."""
    return subprocess.run(
        [*LUOCTL, *args, "install-units", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def installed(tmp_path: Path) -> Installed:
    directory = tmp_path / "system"
    directory.mkdir()
    result = install(directory)
    assert result.returncode == 0, result.stderr
    texts = {name: (directory / name).read_text() for name in units.UNIT_NAMES}
    return Installed(
        directory,
        parse_unit(texts["luod.socket"]),
        parse_unit(texts["luod.service"]),
        texts,
    )


# -- what the package ships -------------------------------------------------------------


def test_the_wheel_carries_both_units_as_package_data() -> None:
    """pyproject's package-data globs name every shipped unit (else pip would
    install luoctl without the units it installs)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["liveupdate"]
    shipped = REPO / "src" / "liveupdate" / "data" / "systemd"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(units.UNIT_NAMES)
    for name in units.UNIT_NAMES:
        relative = f"data/systemd/{name}"
        assert any(fnmatch.fnmatch(relative, g) for g in globs), (relative, globs)
        assert units.shipped_unit(name) == (shipped / name).read_text()


def test_the_shipped_units_run_the_commands_a_system_wide_install_puts_in_usr_local_bin() -> None:
    """As shipped, a plain cp works for ``pip install`` as root: the documented way
    without ``luoctl install-units``."""
    service = parse_unit(units.shipped_unit("luod.service"))
    assert exec_argv(service, "ExecStart")[0] == "/usr/local/bin/luod"
    assert exec_argv(service, "ExecReload")[0] == "/usr/local/bin/luoctl"
    assert set(units.SHIPPED_COMMANDS) == {"/usr/local/bin/luod", "/usr/local/bin/luoctl"}


# -- luoctl install-units ---------------------------------------------------------------


def _runs_this_installation(argv: list[str], module: str) -> None:
    """``argv`` is this interpreter running ``module``, or the console script of
    this installation (whose ``#!`` names this interpreter)."""
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK), argv
    if argv[1:4] == ["-P", "-m", module]:
        assert os.path.samefile(argv[0], sys.executable), argv
        return
    first = Path(argv[0]).read_bytes().split(b"\n", 1)[0]
    assert first.startswith(b"#!"), argv
    assert first[2:].split()[0].decode() == sys.executable, first


def test_install_units_writes_units_that_run_this_installation(installed: Installed) -> None:
    start = exec_argv(installed.service, "ExecStart")
    reload = exec_argv(installed.service, "ExecReload")
    _runs_this_installation(start, "liveupdate.server.luod")
    _runs_this_installation(reload, "liveupdate.cli.luoctl")
    # The commands answer with this package's version: it is this installation.
    for argv, module in ((start, "liveupdate.server.luod"), (reload, "liveupdate.cli.luoctl")):
        program = argv[:4] if argv[1:4] == ["-P", "-m", module] else argv[:1]
        version = subprocess.run(
            [*program, "--version"], capture_output=True, text=True, timeout=60, check=True
        )
        assert liveupdate.__version__ in version.stdout
    # Nothing else changed: the units are the shipped ones, commands aside.
    for name in units.UNIT_NAMES:
        path = installed.directory / name
        assert path.stat().st_mode & 0o777 == 0o644
        shipped = units.shipped_unit(name).splitlines()
        written = installed.texts[name].splitlines()
        assert len(shipped) == len(written)
        changed = [(a, b) for a, b in zip(shipped, written, strict=True) if a != b]
        assert all(a.startswith(("ExecStart=", "ExecReload=")) for a, _ in changed), changed
        for a, b in changed:  # the command is replaced, its arguments kept
            key, arguments = a.split("=", 1)[0], a.split(" ", 1)[1]
            assert b.startswith(f"{key}=/") and b.endswith(f" {arguments}"), (a, b)


def test_install_units_dry_run_prints_the_units_and_writes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "system"
    directory.mkdir()
    result = install(directory, "--json")
    assert result.returncode == 0
    before = {p.name: p.read_text() for p in directory.iterdir()}

    dry = subprocess.run(
        [*LUOCTL, "install-units", "--dir", str(tmp_path / "nowhere"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "nowhere").exists()
    for name in units.UNIT_NAMES:
        assert f"# {tmp_path / 'nowhere' / name}\n" in dry.stdout
        assert before[name] in dry.stdout  # the very text an install writes
    assert {p.name: p.read_text() for p in directory.iterdir()} == before


def test_install_units_says_what_it_did_to_each_unit(tmp_path: Path) -> None:
    directory = tmp_path / "system"
    directory.mkdir()
    (directory / "luod.service").write_text("[Service]\nExecStart=/bin/true\n")

    first = install(directory, "--json")
    second = install(directory, "--json")

    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    actions = {Path(u["path"]).name: u["action"] for u in json.loads(first.stdout)["units"]}
    assert actions == {"luod.socket": "wrote", "luod.service": "replaced"}
    again = json.loads(second.stdout)
    assert again["dry_run"] is False
    assert [u["action"] for u in again["units"]] == ["unchanged", "unchanged"]
    assert [u["content"] for u in again["units"]] == [
        (directory / name).read_text() for name in units.UNIT_NAMES
    ]
    # Written in one step: no temporary file is left beside them.
    assert sorted(p.name for p in directory.iterdir()) == sorted(units.UNIT_NAMES)


def test_install_units_into_a_missing_directory_fails_in_words(tmp_path: Path) -> None:
    result = install(tmp_path / "no-such-dir")

    assert result.returncode == 1
    assert result.stderr.startswith("luoctl: ") and "(ENOTDIR)" in result.stderr
    assert "--dir" in result.stderr
    assert not (tmp_path / "no-such-dir").exists()


def test_without_a_console_script_the_units_run_this_python_on_the_module() -> None:
    argv = units.command_for("no-such-console-script", "liveupdate.cli.luoctl")

    assert argv == [sys.executable, "-P", "-m", "liveupdate.cli.luoctl"]
    version = subprocess.run(
        [*argv, "--version"], capture_output=True, text=True, timeout=60, check=True, cwd="/"
    )
    assert liveupdate.__version__ in version.stdout


@pytest.mark.parametrize(
    "path", ["/opt/my venv/bin/luod", "/opt/100%/bin/luod", "/opt/$HOME/luod", '/opt/"q"/luod']
)
def test_a_command_systemd_would_read_differently_is_refused(path: str) -> None:
    with pytest.raises(ValueError, match="copy the shipped units"):
        units.render_unit(
            units.shipped_unit("luod.service"),
            {"/usr/local/bin/luod": [path], "/usr/local/bin/luoctl": ["/usr/bin/luoctl"]},
        )


# -- well-formed ------------------------------------------------------------------------


def _systemd_version() -> int:
    assert SYSTEMD_ANALYZE is not None
    out = subprocess.run(
        [SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (Debian package systemd)"
)
def test_the_installed_units_pass_systemd_analyze_verify(installed: Installed) -> None:
    """verify loads the units in a manager of its own (no running systemd needed),
    checks every setting and that ExecStart=/ExecReload= name executables."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *units.UNIT_NAMES],
        cwd=installed.directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    version = _systemd_version()
    for line in (result.stdout + result.stderr).splitlines():
        unknown = re.search(r"Unknown key '(\w+)' in section \[Service\], ignoring\.$", line)
        assert unknown is not None, f"systemd-analyze verify: {line}"
        # Only a setting this systemd is too old to know.
        assert version < NEWER_SETTINGS.get(unknown.group(1), 0), line


def test_the_units_say_what_luod_needs(installed: Installed) -> None:
    """Our own strict reading (whatever systemd is installed): the socket is
    luod's, the service is notified, reloads live-update and restarts."""
    sock, service = installed.socket, installed.service
    path = one(sock, "Socket", "ListenSequentialPacket")
    assert one(sock, "Socket", "Accept") == "no"
    assert one(sock, "Socket", "SocketMode") == "0600"
    assert one(sock, "Install", "WantedBy") == "sockets.target"

    assert one(service, "Unit", "Requires") == "luod.socket"
    assert one(service, "Service", "Type") == "notify"
    # The successor's READY=1 and MAINPID= come from a process systemd did not start.
    assert one(service, "Service", "NotifyAccess") == "all"
    assert one(service, "Service", "Restart") == "on-failure"
    # The socket's directory is luod's state directory: writable, and kept.
    assert one(service, "Service", "RuntimeDirectory") == os.path.basename(os.path.dirname(path))
    assert os.path.dirname(path) == "/run/" + one(service, "Service", "RuntimeDirectory")
    assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes"

    start = exec_argv(service, "ExecStart")
    reload = exec_argv(service, "ExecReload")
    # luod's own parser takes ExecStart's options: the unit's socket, the fd store.
    first = start.index("--socket")
    ctx = luod_main.make_context("luod", start[first:])
    assert ctx.params["socket_path"] == path and ctx.params["keeper"] == "fdstore"
    # luoctl's parser takes ExecReload's: a reboot of the same device, waiting
    # less than systemd lets a reload run (TimeoutStartSec= bounds ExecReload=).
    first, command = reload.index("--socket"), reload.index("reboot")
    group = luoctl_main.make_context("luoctl", reload[first:command], resilient_parsing=True)
    assert group.params["socket"] == path and not group.args
    reboot = luoctl_main.commands["reboot"].make_context("reboot", reload[command + 1 :])
    assert 0 < reboot.params["wait"] < float(one(service, "Service", "TimeoutStartSec"))


def test_the_fd_store_fits_luods_fd_budget(installed: Installed) -> None:
    """luod stores a copy of each preserved file and its state in two slots, and
    refuses a file the store could not take (``ENOSPC``): it must know the
    store's size (``$FDSTORE``, which systemd sets only from v254: the unit sets
    it too). At a restart the whole store comes back into luod's own table,
    where luod duplicates each copy: twice the store, the listener, stdio and
    the reserve luod keeps for its own work must fit ``LimitNOFILE=``."""
    service = installed.service
    nofile = int(one(service, "Service", "LimitNOFILE"))
    store = int(one(service, "Service", "FileDescriptorStoreMax"))
    assert one(service, "Service", "FileDescriptorStorePreserve") == "yes"
    assert f"FDSTORE={store}" in service["Service"]["Environment"]
    assert store - STATE_SLOTS >= Limits().max_files_per_uid  # room for real work
    stdio, listener = 3, 1
    assert stdio + listener + 2 * store + Limits().fd_reserve <= nofile


# -- the hardening leaves luod what it needs ----------------------------------------------


def bounding_set(unit: Unit) -> str:
    """``CapabilityBoundingSet=`` as setpriv's ``--bounding-set`` argument."""
    caps = one(unit, "Service", "CapabilityBoundingSet").split()
    assert caps and all(c.startswith("CAP_") for c in caps), caps
    return ",".join(["-all", *(f"+{c[4:].lower()}" for c in caps)])


def _can_unshare_mounts() -> bool:
    """Whether this root may make a mount namespace (a container may forbid it)."""
    if os.geteuid() != 0 or UNSHARE is None:
        return False
    probe = subprocess.run([UNSHARE, "--mount", "true"], capture_output=True, check=False)
    return probe.returncode == 0


needs_root_tools = pytest.mark.skipif(
    None in (SETPRIV, NSENTER, SOCKET_ACTIVATE) or not _can_unshare_mounts(),
    reason="needs root with mount namespaces, setpriv, unshare, nsenter (util-linux) "
    "and systemd-socket-activate",
)

CENSUS = (
    "import json, sys\n"
    "from liveupdate.server.census import take_census\n"
    "print(json.dumps(sorted(take_census().holders.get(int(sys.argv[1]), ()))))\n"
)


@needs_root_tools
def test_the_units_capabilities_let_luod_see_another_users_connections(
    installed: Installed,
) -> None:
    """The census behind ghost-hold detection reads every process's /proc/PID/fd:
    with only the unit's capabilities it still finds a socket another uid
    holds (and without them it would not, so the check can fail)."""
    assert SETPRIV is not None
    held, other = socket.socketpair()
    inode = os.fstat(held.fileno()).st_ino
    holder = subprocess.Popen(
        [SETPRIV, "--reuid", "65534", "--regid", "65534", "--clear-groups", "sleep", "60"],
        pass_fds=[held.fileno()],
    )
    held.close()
    other.close()
    try:

        def seen_with(caps: str) -> list[int]:
            out = subprocess.run(
                [SETPRIV, f"--bounding-set={caps}", "--inh-caps=-all", "--no-new-privs",
                 sys.executable, "-c", CENSUS, str(inode)],
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout  # fmt: skip
            return list(json.loads(out))

        assert wait_until(lambda: seen_with("+all") == [holder.pid])
        assert seen_with(bounding_set(installed.service)) == [holder.pid]
        assert seen_with("-all") == []
    finally:
        holder.kill()
        holder.wait()


# -- ExecReload= is a live update ---------------------------------------------------------


@dataclass
class NotifyPeer:
    """The service manager's end of ``sd_notify``: who said what (``SO_PASSCRED``),
    and the fd store (``FDSTORE=1``/``FDSTOREREMOVE=1`` by ``FDNAME=``)."""

    address: str
    messages: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    store: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.05)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        room = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, room, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                continue
            pid, fds = 0, array.array("i")
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self.lock:
                self.messages.append((pid, fields))
                name = fields.get("FDNAME", "stored")
                if fields.get("FDSTOREREMOVE") == "1":
                    for fd in self.store.pop(name, []):
                        os.close(fd)
                for fd in fds:
                    if fields.get("FDSTORE") == "1":
                        self.store.setdefault(name, []).append(fd)
                    else:
                        os.close(fd)

    def said(self, pid: int, key: str) -> list[str]:
        with self.lock:
            return [f[key] for p, f in self.messages if p == pid and key in f]

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.store)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)


#: Inside the test's mount namespace: a /run of its own, with the unit's
#: socket directory in it (the socket unit's DirectoryMode=), then the command.
PRIVATE_RUN = 'mount -t tmpfs -o mode=0755 luodtest /run && mkdir -m 0755 "$0" && exec "$@"'

#: A client that holds the device open (and a session) until its stdin closes.
HOLDER = """
import os, sys
import liveupdate
dev = liveupdate.open_device(sys.argv[1], timeout=30)
session = dev.create_session("held-across-reload")
fd = os.memfd_create("held")
os.write(fd, b"kept by the unit's reload")
session.preserve(fd, 7)
os.close(fd)
print("holding", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def peer() -> Iterator[NotifyPeer]:
    notify = NotifyPeer(f"@luod-units-test-{os.getpid()}-{threading.get_ident()}")
    yield notify
    notify.close()


@needs_root_tools
def test_exec_reload_live_updates_luod_while_another_process_holds_the_device(
    installed: Installed, peer: NotifyPeer, tmp_path: Path
) -> None:
    assert UNSHARE and NSENTER and SETPRIV and SOCKET_ACTIVATE
    service = installed.service
    path = one(installed.socket, "Socket", "ListenSequentialPacket")
    start = exec_argv(service, "ExecStart")
    reload = exec_argv(service, "ExecReload")
    # What systemd runs the unit's commands with, as far as a test can: its
    # environment (NOTIFY_SOCKET, and FDSTORE since v254), NoNewPrivileges=
    # and CapabilityBoundingSet=.
    assert one(service, "Service", "NoNewPrivileges") == "yes"
    sandbox = [SETPRIV, "--no-new-privs", f"--bounding-set={bounding_set(service)}"]
    sandbox += ["--inh-caps=-all", "--"]
    env = {
        "PATH": SYSTEMD_PATH,
        "NOTIFY_SOCKET": peer.address,
    }
    # Environment= of the unit (FDSTORE=, which systemd would also set itself).
    env.update(v.split("=", 1) for v in service["Service"].get("Environment", []))
    if "COVERAGE_PROCESS_CONFIG" in os.environ:  # the suite measures every luod
        env["COVERAGE_PROCESS_CONFIG"] = os.environ["COVERAGE_PROCESS_CONFIG"]
    passed = [arg for name in env for arg in ("-E", name)]
    activate = [SOCKET_ACTIVATE, "--seqpacket", "--listen", path, *passed]
    log = tmp_path / "luod.log"
    with open(log, "wb") as logf:
        first = subprocess.Popen(
            [UNSHARE, "--mount", "--propagation", "private", "--", "sh", "-c", PRIVATE_RUN,
             os.path.dirname(path), *sandbox, *activate, *start],
            stdout=logf, stderr=logf, env=env,
        )  # fmt: skip
    holder: subprocess.Popen[str] | None = None
    serving = 0
    try:
        # The first pid runs the whole chain by exec: it is socket-activate, then luod.
        namespace = f"/proc/{first.pid}/root"
        wait_for(lambda: os.path.exists(namespace + path), "the unit's socket", timeout=20)
        holder = subprocess.Popen(
            [NSENTER, "-t", str(first.pid), "-m", "--", *sandbox, sys.executable, "-c", HOLDER,
             path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n", (
            log.read_text()
        )
        serving = first.pid
        # The holder's connection activated luod, which holds the device for it.
        here = f"/proc/{holder.pid}/root"  # the namespace, whoever serves it
        with pytest.raises(liveupdate.DeviceBusyError):
            liveupdate.open_device(here + path, timeout=0.2)
        with open_control(here + os.path.join(os.path.dirname(path), "control")) as control:
            assert control.get_state().generation == 1
        assert peer.said(first.pid, "READY") == ["1"]
        assert "activated=True" in log.read_text()  # on the socket systemd would own
        # The copy of the held file went to the fd store (ExecStart's --keeper fdstore).
        wait_for(lambda: any(n.startswith("f-") for n in peer.names()), "a copy in the store")

        # systemctl reload luod: the unit's ExecReload=, run in the unit's namespace.
        result = subprocess.run(
            [NSENTER, "-t", str(holder.pid), "-m", "--", *sandbox, *reload],
            capture_output=True, text=True, env=env,
            timeout=float(one(service, "Service", "TimeoutStartSec")),
        )  # fmt: skip

        assert result.returncode == 0, result.stdout + result.stderr + log.read_text()
        assert "generation 1 -> 2" in result.stdout
        lock = Path(here + os.path.join(os.path.dirname(path), "luod.lock"))
        serving = int(lock.read_text().strip())
        assert serving != first.pid and running(serving)
        assert first.wait(timeout=20) == 0  # the old generation left, cleanly
        with open_control(here + os.path.join(os.path.dirname(path), "control")) as control:
            assert control.get_state().generation == 2
        # The service manager follows the new main process, which says READY=1 itself.
        assert wait_until(lambda: peer.said(serving, "READY") == ["1"]), peer.messages
        assert str(serving) in peer.said(first.pid, "MAINPID")
        # The holder's session came through the reload.
        with liveupdate.open_device(here + path, timeout=10) as dev:
            incoming = dev.retrieve_session("held-across-reload")
            fd = incoming.retrieve(7)
            try:
                assert read_all(fd) == b"kept by the unit's reload"
            finally:
                os.close(fd)
            incoming.finish()
            incoming.close()
    finally:
        if holder is not None:
            try:
                holder.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        for pid in {first.pid, serving} - {0}:
            if running(pid):
                os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not any(running(p) for p in {first.pid, serving} - {0}), 20)
        first.wait(timeout=20)
    assert "stopped" in log.read_text()
