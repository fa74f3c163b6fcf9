"""luod runs only installed code, and never writes through a path another user controls.

* Its children (the pre-flight ``--check-image`` and the re-exec of a live
  update) run with ``-P`` in ``/`` with an environment luod builds: a
  ``liveupdate/`` package planted in the directory luod was started from is
  never imported.
* Its files are reached through directories checked once from ``/``
  (``liveupdate.server.safefs``): a state directory or a ``--state-file``
  under a directory another uid owns or may write is refused at start with
  one line, and a link inside the state directory is replaced, never
  followed. The other uid is real (``setpriv``), like in
  ``tests/test_owner_checks.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import liveupdate
from luodtest import Luod, luoctl

pytestmark = pytest.mark.luod_only

SETPRIV = shutil.which("setpriv")
UID_A = 60001
GID_A = 61001
#: The installed console script: it puts its own directory on sys.path, not the cwd.
LUOD_SCRIPT = Path(sys.executable).parent / "luod"

needs_other_uid = pytest.mark.skipif(
    os.geteuid() != 0 or SETPRIV is None,
    reason="needs root and setpriv (util-linux) to act as another uid",
)


def as_uid_a(*argv: str) -> None:
    """Run ``argv`` as the other user (uid 60001, gid 61001, no groups)."""
    assert SETPRIV is not None
    subprocess.run(
        [SETPRIV, f"--reuid={UID_A}", f"--regid={GID_A}", "--clear-groups", *argv],
        check=True,
        capture_output=True,
        cwd="/",
    )


def secret_file(path: Path, text: str = "root's secret\n") -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def run_luod(*args: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    """luod expected to refuse to start (bounded: it must not serve)."""
    return subprocess.run(
        [str(LUOD_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def one_line_refusal(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("luod: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def private_tmp(tmp_path: Path) -> Path:
    """``tmp_path`` traversable (o+x) by the other uid, still root's and not writable by it."""
    root = Path(tempfile.gettempdir()).resolve()
    for path in (tmp_path, *tmp_path.parents):
        if path == root or path == Path("/"):
            break
        path.chmod(stat.S_IMODE(path.stat().st_mode) | 0o011)
    return tmp_path


# -- code from the working directory ------------------------------------------------------


@pytest.fixture
def planted_cwd(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A working directory holding a ``liveupdate`` package that leaves a marker if imported."""
    cwd = tmp_path / "cwd"
    (cwd / "liveupdate").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (cwd / "liveupdate" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'a').write('imported\\n')\n"
        "raise SystemExit('planted liveupdate package imported')\n"
    )
    yield cwd, marker


def _wait_generation(socket: str, generation: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with liveupdate.open_device(socket, timeout=1.0) as dev:
                if dev.get_state().generation == generation:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"generation {generation} never served")


@pytest.mark.skipif(not LUOD_SCRIPT.exists(), reason="needs the installed luod script")
def test_prepare_and_reboot_never_run_code_from_the_working_directory(
    tmp_path: Path, planted_cwd: tuple[Path, Path]
) -> None:
    cwd, marker = planted_cwd
    state = tmp_path / "state"
    log = tmp_path / "luod.log"
    env = {**os.environ, "LUOD_TEST_CANARY": "caller's", "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    daemon = Luod(str(state / "device"), state, log, [], env)
    with open(log, "ab") as logf:
        daemon.proc = subprocess.Popen(
            [str(LUOD_SCRIPT), "--socket", daemon.socket, "--journal-interval", "0"],
            stdout=logf,
            stderr=logf,
            env=env,
            cwd=cwd,
        )
    try:
        daemon.wait_serving()
        assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"  # luod left the cwd itself
        with daemon.open() as dev:
            session = dev.create_session("kept")
        fd = os.memfd_create("kept")
        os.write(fd, b"survives the reboot")
        session.preserve(fd, 7)
        os.close(fd)

        prepared = luoctl(daemon.socket, "prepare")
        assert prepared.returncode == 0, prepared.stderr
        rebooted = luoctl(daemon.socket, "reboot")
        assert rebooted.returncode == 0, rebooted.stderr
        _wait_generation(daemon.socket, 2)

        assert not marker.exists(), marker.read_text()
        assert daemon.alive()
        # The re-exec'd luod (same pid) runs in / with luod's environment, not the caller's.
        assert os.readlink(f"/proc/{daemon.pid}/cwd") == "/"
        environ = Path(f"/proc/{daemon.pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if v.startswith(b"LUOD_TEST_CANARY=")]
        cmdline = Path(f"/proc/{daemon.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-P" in cmdline
        with daemon.open() as dev:
            incoming = dev.retrieve_session("kept")
        with incoming:
            data_fd = incoming.retrieve(7)
            assert os.pread(data_fd, 64, 0) == b"survives the reboot"
            os.close(data_fd)
            incoming.finish()
    finally:
        daemon.stop()
    assert not marker.exists()


# -- directories another user controls -----------------------------------------------------


@pytest.mark.parametrize("option", ["--state-file", "--state-dir"])
@needs_other_uid
@pytest.mark.usefixtures("private_tmp")
@pytest.mark.skipif(not LUOD_SCRIPT.exists(), reason="needs the installed luod script")
def test_state_paths_in_a_directory_another_uid_owns_are_refused_at_start(
    tmp_path: Path, option: str
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, UID_A, GID_A)
    target = secret_file(tmp_path / "root-only")
    target_dir = tmp_path / "root-dir"
    target_dir.mkdir(mode=0o700)
    # The other user plants links where luod would write.
    if option == "--state-file":
        as_uid_a("ln", "-s", str(target), str(theirs / "state"))
        for pid_guess in range(os.getpid(), os.getpid() + 50):
            as_uid_a("ln", "-sf", str(target), str(theirs / f"state.tmp{pid_guess}"))
        value = str(theirs / "state")
    else:
        as_uid_a("ln", "-s", str(target_dir), str(theirs / "state"))
        value = str(theirs / "state")
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir(mode=0o700)

    result = run_luod("--socket", str(sock_dir / "device"), option, value)

    line = one_line_refusal(result)
    assert str(theirs) in line and f"uid {UID_A}" in line, line
    assert target.read_text() == "root's secret\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert list(target_dir.iterdir()) == []


@needs_other_uid
@pytest.mark.usefixtures("private_tmp")
@pytest.mark.skipif(not LUOD_SCRIPT.exists(), reason="needs the installed luod script")
def test_a_state_dir_another_uid_may_write_is_refused_and_its_links_untouched(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, 0, GID_A)
    state.chmod(0o770)  # root's, but the other user's group may write
    targets = {name: secret_file(tmp_path / f"target-{name}") for name in ("lock", "j", "s")}
    as_uid_a("ln", "-s", str(targets["lock"]), str(state / "luod.lock"))
    as_uid_a("ln", "-s", str(targets["j"]), str(state / "journal.dtb"))
    as_uid_a("ln", "-s", str(targets["s"]), str(state / "state"))

    result = run_luod("--socket", str(state / "device"))

    line = one_line_refusal(result)
    assert "writable by group or others" in line and str(state) in line, line
    for target in targets.values():
        assert target.read_text() == "root's secret\n"
    assert not (state / "device").exists()


@pytest.mark.skipif(not LUOD_SCRIPT.exists(), reason="needs the installed luod script")
def test_links_left_in_the_state_dir_are_replaced_never_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    lock_target = secret_file(tmp_path / "lock-target")
    os.symlink(lock_target, state / "luod.lock")

    refused = run_luod("--socket", str(state / "device"))
    line = one_line_refusal(refused)
    assert "luod.lock is a symbolic link" in line, line
    assert lock_target.read_text() == "root's secret\n"

    (state / "luod.lock").unlink()
    targets = {name: secret_file(tmp_path / f"target-{name}") for name in ("state", "journal")}
    os.symlink(targets["state"], state / "state")
    os.symlink(targets["journal"], state / "journal.dtb")
    log = tmp_path / "luod.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    daemon = Luod(str(state / "device"), state, log, ["--journal-interval", "0.05"], env)
    daemon.proc = subprocess.Popen(
        [str(LUOD_SCRIPT), "--socket", daemon.socket, *daemon.args],
        stdout=open(log, "ab"),  # noqa: SIM115 - handed to the child
        stderr=subprocess.STDOUT,
        env=env,
        cwd="/",
    )
    try:
        daemon.wait_serving()
        # Yesterday's predictable temporary names, planted now that the pid is known.
        tmp_targets = {}
        for name in (f"state.tmp{daemon.pid}", f".journal.dtb.{daemon.pid}.tmp"):
            tmp_targets[name] = secret_file(tmp_path / f"target{name}")
            os.symlink(tmp_targets[name], state / name)
        with daemon.open() as dev:
            session = dev.create_session("journaled")
        fd = os.memfd_create("j")
        session.preserve(fd, 1)
        os.close(fd)
        deadline = time.monotonic() + 20
        while not (state / "journal.dtb").is_file() or (state / "journal.dtb").is_symlink():
            assert time.monotonic() < deadline, daemon.log_text()
            time.sleep(0.05)
        assert luoctl(daemon.socket, "prepare").returncode == 0
        assert not (state / "state").is_symlink()
        assert (state / "state").read_text() == "prepared\n"
        assert stat.S_IMODE((state / "state").stat().st_mode) == 0o644
        assert stat.S_IMODE((state / "journal.dtb").stat().st_mode) == 0o600
        assert stat.S_IMODE((state / "luod.lock").stat().st_mode) == 0o600
        session.close()
    finally:
        daemon.stop(signal.SIGTERM)
    for target in [*targets.values(), *tmp_targets.values()]:
        assert target.read_text() == "root's secret\n", target
