"""The one helper module of the test suite: real luod processes and their tools.

Importable from any test module as ``luodtest`` (``tests/`` is on pytest's
``pythonpath``). The fixtures built on it live in ``conftest.py``. What is
here:

* :class:`Luod`, a real luod child process on a private socket, logging JSON
  events (``--log-format json``) unless the test chooses a format itself;
* :func:`events`, luod's log parsed into event dicts, so that tests assert on
  event names and fields instead of formatted text;
* :func:`wait_for` / :func:`wait_until`, bounded polling for asynchronous
  effects (a closed connection is released when luod's loop reads the EOF);
* :func:`memfd` and :func:`read_all`, real memfds with known contents;
* :func:`errno_of`, the errno a call fails with (0: none);
* :func:`luoctl` and :func:`luoctl_reboot`, the CLI as a real command;
* :func:`preserved_session` and :func:`assert_retrieves`, a session with one
  memfd and the check that its successor gets the same bytes;
* :func:`state`, :func:`sessions`, :func:`fds_settle`, :func:`raw_send` and
  :func:`can_connect`, short looks at and pokes into a running daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import liveupdate
from liveupdate import wire

TEST_DEVICE_ENV = "LIVEUPDATE_TEST_DEVICE"
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LIVEUPDATE_SHARED", REPO.parent / "shared"))
#: The kernel VM kit: ``run-in-vm.sh`` boots a real LUO kernel.
KERNEL_VM = SHARED / "kernel-vm"
RUN_IN_VM = KERNEL_VM / "run-in-vm.sh"
#: The job directory as the guest sees it (``run-in-vm.sh --out``).
GUEST_JOB = "/run/luo-job"
#: Set to 1 (CI): a test that needs the VM fails instead of skipping without it.
REQUIRE_VM_ENV = "LIVEUPDATE_REQUIRE_VM"


def vm_missing(kexec: bool = False) -> str | None:
    """Why the kernel VM cannot run here (``kexec``: a run that kexecs), or ``None``."""
    if os.environ.get("LUO_STAGE"):
        return "already running inside the LUO test VM"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    for path in (RUN_IN_VM, KERNEL_VM / "bzImage"):
        if not path.exists():
            return f"{path} is missing (see {KERNEL_VM / 'README.md'})"
    if kexec and shutil.which("kexec") is None and not Path("/usr/sbin/kexec").exists():
        return "kexec-tools is not installed"
    return None


def require_vm(kexec: bool = False) -> None:
    """Skip the calling test when the VM cannot run here; fail it instead
    with ``LIVEUPDATE_REQUIRE_VM=1`` (CI), where a skip would hide a gap."""
    import pytest

    reason = vm_missing(kexec)
    if reason is None:
        return
    if os.environ.get(REQUIRE_VM_ENV) == "1":
        pytest.fail(f"{REQUIRE_VM_ENV}=1 but {reason}")
    pytest.skip(reason)


def guest_bytecode(job: Path, imports: str) -> dict[str, str]:
    """Compile what the guest will import (the Python statement ``imports``)
    into ``job/pycache``; the environment that has the guest read it there.

    The guest's root file system is the host's, read-only, and the sources
    have no ``__pycache__`` when the host runs with PYTHONDONTWRITEBYTECODE:
    compiling ``liveupdate`` at each boot costs seconds under TCG. The guest
    reads the host's bytecode through ``PYTHONPYCACHEPREFIX`` and never
    writes. (Stale or missing bytecode only costs time: Python checks the
    sources' mtimes.)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(job / "pycache")
    subprocess.run([sys.executable, "-c", imports], env=env, check=True, timeout=60)
    return {"PYTHONPYCACHEPREFIX": f"{GUEST_JOB}/pycache"}


def kernel_device() -> str | None:
    """The real LUO device under test, when the suite runs against a kernel."""
    return os.environ.get(TEST_DEVICE_ENV) or None


#: ``linux``: the library-level conformance tests run against ``luod
#: --compat=linux`` and expect Linux's answers, as against a kernel.
TEST_COMPAT_ENV = "LIVEUPDATE_TEST_COMPAT"


def linux_exact_luod() -> bool:
    """Whether the suite runs against luod in Linux-exact mode (``TEST_COMPAT_ENV``)."""
    return os.environ.get(TEST_COMPAT_ENV) == "linux"


@dataclass
class Luod:
    """A running luod child process."""

    socket: str
    state_dir: Path
    log: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    #: ``--log-format`` given to luod unless ``args`` names one: JSON, so that
    #: :func:`events` can read the log.
    log_format: str = "json"

    @property
    def pid(self) -> int:
        """The serving luod's pid. A live update moves it to the successor
        (the next generation, a child of the old one), which writes its pid
        into the state directory's lock file."""
        assert self.proc is not None
        current = self._lock_pid()
        if current is not None and current != self.proc.pid and running(current):
            return current
        return self.proc.pid

    def _lock_pid(self) -> int | None:
        state_dir = self.state_dir
        if "--state-dir" in self.args:
            state_dir = Path(self.args[self.args.index("--state-dir") + 1])
        try:
            return int((state_dir / "luod.lock").read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def start(self, wait: bool = True) -> Luod:
        logf = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        fmt = [] if "--log-format" in self.args else ["--log-format", self.log_format]
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "liveupdate.server.luod",
                "--socket",
                self.socket,
                *fmt,
                *self.args,
            ],
            stdout=logf,
            stderr=logf,
            env=self.env,
            close_fds=True,
        )
        logf.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Wait for the ``serving`` event, proof that the socket listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "serving" in self.log.read_text(errors="replace"):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"luod exited {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.01)
        raise TimeoutError(f"luod did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def fd_count(self) -> int:
        """How many fds the daemon holds now (``/proc/PID/fd``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def open(self, timeout: float = 5.0) -> liveupdate.Device:
        return liveupdate.open_device(self.socket, timeout=timeout)

    def alive(self) -> bool:
        if self.proc is None:
            return False
        return self.proc.poll() is None or (self.pid != self.proc.pid and running(self.pid))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the serving luod; its exit status (0 for a successor that exited
        after ``sig``: not our child, its status is not ours to read)."""
        assert self.proc is not None
        current = self.pid
        if current != self.proc.pid:
            try:  # the old generation, exiting after the hand-over
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.kill(current, sig)
            deadline = time.monotonic() + timeout
            while running(current) and time.monotonic() < deadline:
                time.sleep(0.01)
            if running(current):
                os.kill(current, signal.SIGKILL)
                self._no_keeper_left(clean=False)
                return -signal.SIGKILL
            if sig != signal.SIGKILL:  # a SIGKILL is a crash: the keeper outlives it
                self._no_keeper_left(clean=sig == signal.SIGTERM)
            return 0 if sig == signal.SIGTERM else -sig
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if sig != signal.SIGKILL:
            # A SIGKILL is a crash: the keeper outlives it, for a luod started
            # again to get its sessions back; the fixture's last stop ends it.
            self._no_keeper_left(clean=sig == signal.SIGTERM and self.proc.returncode == 0)
        return self.proc.returncode

    def keeper_pids(self) -> list[int]:
        """The keepers this luod started (``copies`` events with a pid)."""
        known: list[int] = self.extra.setdefault("keepers", [])  # type: ignore[assignment]
        if self.log.exists():
            known.extend(e["keeper_pid"] for e in events(self, "copies") if e.get("keeper_pid"))
        return sorted(set(known))

    def _no_keeper_left(self, clean: bool) -> None:
        """A clean stop ends the keeper; after any other stop the test ends it."""
        for pid in self.keeper_pids():
            deadline = time.monotonic() + 10.0
            while clean and running(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if running(pid):
                os.kill(pid, signal.SIGKILL)
                assert not clean, f"luod stopped cleanly but left its keeper {pid} running"


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


#: luoctl as a real command, with this interpreter.
LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]


def luoctl(
    socket: str, *args: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``luoctl --socket SOCKET ARGS`` as a command, bounded by ``timeout``.

    ``COLUMNS`` is wide so that rich never wraps a one-line report.
    """
    return subprocess.run(
        [*LUOCTL, "--socket", socket, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**(os.environ if env is None else env), "COLUMNS": "200"},
        check=False,
    )


_REBOOTED = re.compile(r"generation (\d+) -> (\d+)")


def luoctl_reboot(daemon: Luod, *args: str, wait: float | None = 20.0) -> tuple[int, int]:
    """``luoctl reboot [--wait WAIT] ARGS``: must succeed; returns (old, new) generation.

    The new generation must be the old one plus one. ``wait=None``: luoctl's
    own default.
    """
    waiting = [] if wait is None else ["--wait", str(wait)]
    result = luoctl(daemon.socket, "reboot", *waiting, *args)
    assert result.returncode == 0, (
        f"luoctl reboot rc={result.returncode}\nstdout: {result.stdout}\n"
        f"stderr: {result.stderr}\nluod log:\n{daemon.log_text()[-4000:]}"
    )
    match = _REBOOTED.search(result.stdout)
    assert match, result.stdout
    old, new = int(match.group(1)), int(match.group(2))
    assert new == old + 1, result.stdout
    return old, new


# -- luod's events ------------------------------------------------------------------------


class Logged(Protocol):
    """Anything with luod's log file: :class:`Luod`, or a test's own wrapper of it."""

    log: Path


def events(
    daemon: Logged | Path, name: str | None = None, **fields: object
) -> list[dict[str, Any]]:
    """The JSON events of ``daemon``'s log (or of a log file), oldest first.

    Only the events called ``name``, when given, and only those whose fields
    equal ``fields``. Lines that are not JSON objects (a traceback, luod's
    ``luod: ...`` startup error) are skipped. The log must be written with
    ``--log-format json``, :class:`Luod`'s default.
    """
    path = daemon if isinstance(daemon, Path) else daemon.log
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line luod is still writing
        if name is not None and obj.get("event") != name:
            continue
        if all(obj.get(k) == v for k, v in fields.items()):
            found.append(obj)
    return found


def event_names(daemon: Logged | Path) -> list[str]:
    """The names of ``daemon``'s events, oldest first."""
    return [e["event"] for e in events(daemon)]


# -- waiting ------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def wait_for(
    predicate: Callable[[], bool],
    what: str = "",
    timeout: float = 10.0,
    daemon: Luod | None = None,
) -> None:
    """Poll ``predicate`` until it holds; fail the test, saying ``what``, after ``timeout``.

    ``daemon``: show the end of its log in the failure.
    """
    if wait_until(predicate, timeout):
        return
    log = f"\nluod log:\n{daemon.log_text()[-4000:]}" if daemon is not None else ""
    raise AssertionError(f"timed out waiting for {what or predicate}{log}")


# -- files --------------------------------------------------------------------------------


def memfd(data: bytes = b"", name: str = "luodtest") -> int:
    """A new close-on-exec memfd holding ``data``."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
    return fd


def errno_of(fn: Callable[[], object]) -> int:
    """Run ``fn``: 0, or the errno of the :class:`OSError` it raised."""
    try:
        fn()
    except OSError as exc:
        assert exc.errno is not None, exc
        return exc.errno
    return 0


def read_all(fd: int) -> bytes:
    """The whole content of the regular file ``fd``, without moving its position."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# -- a running daemon ---------------------------------------------------------------------


def preserved_session(daemon: Luod, name: str, data: bytes, token: int = 1) -> liveupdate.Session:
    """A new outgoing session ``name`` holding one memfd with ``data`` under ``token``.

    The test's own fd to the memfd is closed: luod's is the only reference.
    """
    with daemon.open() as dev:
        session = dev.create_session(name)
    fd = memfd(data)
    try:
        session.preserve(fd, token)
    finally:
        os.close(fd)
    return session


def assert_retrieves(session: liveupdate.Session, token: int, data: bytes) -> None:
    """RETRIEVE_FD of ``token`` gives a file holding exactly ``data``."""
    fd = session.retrieve(token)
    try:
        assert read_all(fd) == data
    finally:
        os.close(fd)


def state(daemon: Luod) -> liveupdate.StateInfo:
    """GET_STATE through a fresh device connection."""
    with daemon.open() as dev:
        return dev.get_state()


def sessions(daemon: Luod) -> list[tuple[str, str]]:
    """Every session luod holds, as sorted (name, ``outgoing``/``incoming``) pairs."""
    with daemon.open() as dev:
        listing = dev.list_sessions()
    return sorted((s.name, s.direction.name.lower()) for s in listing.sessions)


def fds_settle(daemon: Luod, baseline: int, timeout: float = 5.0) -> None:
    """The daemon's fd count comes back to ``baseline`` (closes are asynchronous)."""
    if wait_until(lambda: daemon.fd_count() == baseline, timeout):
        return
    fds = {
        f: os.readlink(f"/proc/{daemon.pid}/fd/{f}") for f in os.listdir(f"/proc/{daemon.pid}/fd")
    }
    raise AssertionError(f"luod holds {daemon.fd_count()} fds, baseline {baseline}: {fds}")


def raw_send(
    session: liveupdate.Session, cmd: int, arg: bytes, fds: list[int] | None = None
) -> None:
    """Send one request on ``session``'s fd without reading the reply."""
    sock = socketlib.socket(fileno=os.dup(session.fileno()))
    try:
        wire.send_message(sock, wire.encode_request(cmd, arg), fds or [])
    finally:
        sock.close()


def can_connect(path: str) -> bool:
    """Whether a SOCK_SEQPACKET connect to ``path`` succeeds now."""
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def copies_settled(dev: liveupdate.Device) -> None:
    """Return once luod's crash copies hold every change made so far.

    luod sends a change to its copies on an idle turn of its loop, at most
    ``fdstore.COALESCE`` after the last one: past that, the turn before it
    serves one more call has sent it.
    """
    from liveupdate.server import fdstore

    time.sleep(fdstore.COALESCE * 5)
    dev.get_state()
