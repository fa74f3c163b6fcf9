"""A live update of luod into a *new version* of the package.

The running luod (this checkout, from the test venv) is started with
``--exec`` naming the ``luod`` of a second venv holding a modified copy of
the package: the same source with a bumped version string, installed by pip
from a wheel. ``luoctl reboot`` must run the pre-flight with the new code,
re-execute into it, and hand every session over intact.

The wheel is assembled by the test (a wheel is a zip with a ``.dist-info``),
so nothing is downloaded and no build backend plugin (``wheel``) is needed;
pip installs it like any wheel, console scripts included. The second venv
reaches the dependencies (libfdt, click, rich) through a ``.pth`` line naming
this venv's site-packages, added after the install: a plain path line adds
that directory only at the end of ``sys.path``, after the second venv's own
site-packages, and does not process its ``.pth`` files, so this checkout's
editable install is not even visible there.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from liveupdate.server import luod as luod_module
from luodtest import Luod, events

pytestmark = pytest.mark.luod_only

NEW_VERSION = "0.99.0"
LUOCTL = [sys.executable, "-m", "liveupdate.cli.luoctl"]
#: This venv's pip, run for another interpreter (``--python``).
PIP_FOR = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python"]
SRC = Path(liveupdate.__file__).resolve().parent  # .../src/liveupdate


def _bump(path: Path, pattern: str, new: str) -> None:
    text = path.read_text()
    bumped, count = re.subn(pattern, new, text, count=1, flags=re.MULTILINE)
    assert count == 1, f"no version string to bump in {path}"
    path.write_text(bumped)


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def entry_points_txt(pyproject: Path) -> bytes:
    """The project's console scripts and entry points, as a wheel's ``entry_points.txt``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    lines = []
    for group, entries in groups.items():
        if entries:
            lines.append(f"[{group}]")
            lines += [f"{name} = {value}" for name, value in entries.items()]
    return ("\n".join(lines) + "\n").encode()


def build_wheel(tree: Path, version: str, out: Path) -> Path:
    """A pure-Python wheel of ``tree``: ``src/liveupdate`` plus the metadata pip needs."""
    dist_info = f"liveupdate-{version}.dist-info"
    files: dict[str, bytes] = {}
    package = tree / "src"
    for path in sorted((package / "liveupdate").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            files[path.relative_to(package).as_posix()] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: liveupdate\nVersion: {version}\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tests/test_new_version.py\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{dist_info}/entry_points.txt"] = entry_points_txt(tree / "pyproject.toml")
    record = "".join(f"{name},{_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    wheel = out / f"liveupdate-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel


def new_version_venv(tmp_path: Path, version: str) -> Path:
    """A venv with ``version`` of this package installed; returns its directory."""
    tree = tmp_path / "liveupdate-new"
    shutil.copytree(SRC, tree / "src" / "liveupdate", ignore=shutil.ignore_patterns("__pycache__"))
    root = SRC.parents[1]
    shutil.copy(root / "pyproject.toml", tree / "pyproject.toml")
    # The one version string (pyproject.toml reads it, luod imports it).
    init = tree / "src" / "liveupdate" / "version.py"
    _bump(init, r'^__version__ = "[^"]+"', f'__version__ = "{version}"')
    wheel = build_wheel(tree, version, tmp_path)

    venv = tmp_path / "venv2"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The new venv has no pip of its own (--without-pip: faster, and offline).
    subprocess.run(
        [*PIP_FOR, str(python), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "zz-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_reboot_into_a_new_version(luod_factory: Callable[..., Luod], tmp_path: Path) -> None:
    old_version = luod_module.__version__
    assert old_version != NEW_VERSION
    venv = new_version_venv(tmp_path, NEW_VERSION)
    new_luod = venv / "bin" / "luod"
    assert new_luod.exists()

    # The new venv imports the new copy, not this checkout.
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import liveupdate, liveupdate.server.luod as l, libfdt, click, rich;"
            "print(liveupdate.__version__, l.__version__, liveupdate.__file__)",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    version, luod_version, where = probe.stdout.split()
    assert (version, luod_version) == (NEW_VERSION, NEW_VERSION)
    assert Path(where).is_relative_to(venv)

    daemon = luod_factory("--exec", str(new_luod))
    assert events(daemon, "started", version=old_version)
    payload = {
        ("vm-memory", 0x1A): os.urandom(4096),
        ("vm-memory", 2**64 - 1): b"last token",
        ("cache", 0): b"cache page" * 1000,
    }
    ours: dict[tuple[str, int], int] = {}
    with contextlib.ExitStack() as stack:
        with daemon.open() as dev:
            sessions = {
                name: stack.enter_context(dev.create_session(name))
                for name in dict.fromkeys(name for name, _ in payload)
            }
        for (name, token), data in payload.items():
            fd = os.memfd_create(f"{name}-{token}", os.MFD_CLOEXEC)
            stack.callback(os.close, fd)
            os.write(fd, data)
            sessions[name].preserve(fd, token)
            ours[name, token] = fd

        result = subprocess.run(
            [*LUOCTL, "--socket", daemon.socket, "--json", "reboot", "--wait", "20"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr + daemon.log_text()
        # The next generation is the successor luod started: the new code.
        (execd,) = events(daemon, "successor-started")
        assert execd["argv"].startswith(f"{new_luod} "), execd
        assert events(daemon, "started", version=NEW_VERSION, restored=True)
        assert daemon.alive()

        # Data written by the holder after the update reaches the same memory.
        os.pwrite(ours["cache", 0], b"CACHE", 0)
        with daemon.open() as dev:
            info = dev.get_state()
            assert info.generation == 2
            assert info.incoming_sessions == 2
            assert info.preserved_files == len(payload)
            for name in sessions:
                with dev.retrieve_session(name) as session:
                    for (owner, token), data in payload.items():
                        if owner != name:
                            continue
                        fd = session.retrieve(token)
                        try:
                            expected = b"CACHE" + data[5:] if name == "cache" else data
                            assert os.pread(fd, len(data) + 1, 0) == expected
                            assert os.fstat(fd).st_ino == os.fstat(ours[name, token]).st_ino
                        finally:
                            os.close(fd)
                    session.finish()
            assert dev.get_state().state == liveupdate.uapi.LuodState.NORMAL
    assert daemon.stop() == 0
