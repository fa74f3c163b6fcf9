"""Helpers of the handler tests: a session carried across ``luoctl reboot``, I/O with deadlines.

Everything here drives real processes: ``luoctl`` is run as a command
(``python -m liveupdate.cli.luoctl``), the daemon is the ``luod`` of the
``luod``/``luod_factory`` fixtures, and every fd is a real kernel object.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any, Protocol

import liveupdate
from liveupdate.core.handlers import describe_data
from liveupdate.handover_codec import decode_image
from luodtest import REPO, events
from luodtest import luoctl as run_luoctl

EXAMPLE_PLUGIN = REPO / "examples" / "handler-plugin"
TIMEOUT = 10.0


class Daemon(Protocol):
    """What the tests use of the conftest's ``Luod``."""

    socket: str
    state_dir: Path
    log: Path

    @property
    def pid(self) -> int: ...

    def open(self, timeout: float = 5.0) -> liveupdate.Device: ...

    def alive(self) -> bool: ...

    def log_text(self) -> str: ...


def luoctl(
    daemon: Daemon, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``luoctl --socket S ARGS`` as a command; fails the test when it fails and ``check``."""
    proc = run_luoctl(daemon.socket, *args, timeout=180, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"luoctl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}\n"
            f"--- luod log ---\n{daemon.log_text()[-4000:]}"
        )
    return proc


def state(daemon: Daemon) -> dict[str, Any]:
    """``luoctl --json state``."""
    result: dict[str, Any] = json.loads(luoctl(daemon, "--json", "state").stdout)
    return result


def wait_readable(fd: int, timeout: float = TIMEOUT) -> None:
    """Block until ``fd`` is readable, or fail the test."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"fd {fd} not readable within {timeout} s"


def read_exactly(fd: int, size: int, timeout: float = TIMEOUT) -> bytes:
    """Read ``size`` bytes from ``fd`` (blocking or not), within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while len(data) < size:
        wait_readable(fd, max(0.0, deadline - time.monotonic()))
        try:
            chunk = os.read(fd, size - len(data))
        except BlockingIOError:
            continue
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes from a stream socket (its timeout applies to each recv)."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return data


class LiveSession:
    """One outgoing session on a running luod, carried across a real ``luoctl reboot``.

    :meth:`preserve` hands objects to luod (closing the test's own copy by
    default, so only luod keeps them alive); :meth:`reboot` live-updates the
    daemon and retrieves the session in the new generation; :meth:`retrieve`
    takes the files back.
    """

    def __init__(self, daemon: Daemon, name: str = "handler-test") -> None:
        self.daemon = daemon
        self.name = name
        with daemon.open() as dev:
            self.outgoing: liveupdate.Session = dev.create_session(name)
        self.incoming: liveupdate.Session | None = None
        self._fds: list[int] = []

    def preserve(self, obj: int | socket.socket, token: int, close: bool = True) -> None:
        fd = obj if isinstance(obj, int) else obj.fileno()
        self.outgoing.preserve(fd, token)
        if close:
            if isinstance(obj, int):
                os.close(obj)
            else:
                obj.close()

    def reboot(self) -> dict[str, Any]:
        """``luoctl reboot``: the successor luod serves the next generation."""
        pid = self.daemon.pid
        result: dict[str, Any] = json.loads(luoctl(self.daemon, "--json", "reboot").stdout)
        assert result["new_generation"] == result["old_generation"] + 1
        assert self.daemon.alive() and self.daemon.pid != pid  # the handed-over fds
        failed = events(self.daemon, "exec-failed") + events(self.daemon, "restore-failed")
        assert not failed, self.daemon.log_text()[-4000:]
        with self.daemon.open() as dev:
            self.incoming = dev.retrieve_session(self.name)
        return result

    def retrieve(self, token: int) -> int:
        """An fd for ``token`` in the new generation (closed at teardown)."""
        assert self.incoming is not None, "reboot() first"
        fd = self.incoming.retrieve(token)
        self._fds.append(fd)
        return fd

    def retrieve_socket(self, token: int, timeout: float = TIMEOUT) -> socket.socket:
        """:meth:`retrieve` as a socket object (owning its fd)."""
        assert self.incoming is not None, "reboot() first"
        sock = socket.socket(fileno=self.incoming.retrieve(token))
        sock.settimeout(timeout)
        return sock

    def handed_over(self) -> dict[int, tuple[str, dict[str, Any] | None]]:
        """token -> (compatible, decoded data) of this session in the last handover image."""
        image = decode_image((self.daemon.state_dir / "last-handover.dtb").read_bytes())
        session = next(s for s in image.sessions if s.name == self.name.encode())
        return {f.token: (f.compatible, describe_data(f.compatible, f.data)) for f in session.files}

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        if self.incoming is not None:
            try:
                self.incoming.finish()
            except OSError:
                pass
            self.incoming.close()
        self.outgoing.close()


# -- the example plugin, installed the way pip would -----------------------------------


def install_example_plugin(site: Path) -> Path:
    """Lay out ``examples/handler-plugin`` as an installed distribution under ``site``.

    The module is copied and a ``*.dist-info`` written with the entry points
    the example's ``pyproject.toml`` declares: what ``pip install`` produces,
    without a build. Put ``site`` on ``PYTHONPATH`` to use it.
    """
    project = tomllib.loads((EXAMPLE_PLUGIN / "pyproject.toml").read_text())["project"]
    site.mkdir(parents=True, exist_ok=True)
    for package in (EXAMPLE_PLUGIN / "src").iterdir():
        if package.is_dir() and (package / "__init__.py").exists():
            shutil.copytree(package, site / package.name, dirs_exist_ok=True)
    dist = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in entries.items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return site


# -- timerfds (os.timerfd_create is Python 3.13+) ----------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLOCK_MONOTONIC = 1
TFD_CLOEXEC = 0o2000000


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def timerfd(interval_ns: int) -> int:
    """A ``CLOCK_MONOTONIC`` timerfd firing every ``interval_ns``."""
    fd = int(_libc.timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "timerfd_create")
    period = _Timespec(interval_ns // 10**9, interval_ns % 10**9)
    spec = _Itimerspec(period, period)
    if _libc.timerfd_settime(fd, 0, ctypes.byref(spec), None) != 0:
        os.close(fd)
        raise OSError(ctypes.get_errno(), "timerfd_settime")
    return fd


def timerfd_interval_ns(fd: int) -> int:
    """The interval a timerfd is armed with (``timerfd_gettime``)."""
    spec = _Itimerspec()
    if _libc.timerfd_gettime(fd, ctypes.byref(spec)) != 0:
        raise OSError(ctypes.get_errno(), "timerfd_gettime")
    return int(spec.it_interval.tv_sec) * 10**9 + int(spec.it_interval.tv_nsec)
