"""Every refusal of luod's directory checks, on real directories, links and uids.

:mod:`liveupdate.server.safefs` is what stands between luod (root) and a path
another user controls. These tests build each unsafe chain for real (a
directory ``chown``'ed to another uid, group/other-writable modes, sticky
bits, symbolic links owned by another uid, link loops) and check that it is
refused with one line naming the directory and why, and that the safe
variants (a sticky ``/tmp``-like ancestor, a root-owned ``/var/run -> /run``
style link) are accepted. The last tests pin how a checked
:class:`~liveupdate.server.safefs.StateDir` treats what others may have
planted inside it: links are refused or replaced, never followed.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from liveupdate.server.safefs import StateDir, UnsafePathError, open_checked_dir

pytestmark = pytest.mark.luod_only

OTHER_UID = 60001
OTHER_GID = 61001

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another uid")


def opened(path: Path, **kwargs: int | None) -> Path:
    """Open ``path`` through the checks; the directory it really is."""
    fd = open_checked_dir(str(path), **kwargs)
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)


def refusal(path: Path | str, **kwargs: int | None) -> str:
    with pytest.raises(UnsafePathError) as info:
        open_checked_dir(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A private (0700, root's) directory to build chains in."""
    path = tmp_path / "base"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    assert set(os.listdir("/proc/self/fd")) == before


# -- the chain from / ------------------------------------------------------------------------


def test_a_relative_path_is_refused() -> None:
    assert "is not an absolute path" in refusal("var/lib/luod")


@pytest.mark.usefixtures("no_fd_leak")
def test_a_private_chain_is_accepted_and_dot_components_resolve(base: Path) -> None:
    (base / "a" / "b").mkdir(parents=True, mode=0o700)
    assert opened(base / "a" / "b") == base / "a" / "b"
    assert opened(Path(f"{base}/./a/../a/b/.")) == base / "a" / "b"
    # ".." at the root stays at the root, like the kernel's lookup.
    assert opened(Path(f"/../..{base}")) == base


@needs_root
@pytest.mark.usefixtures("no_fd_leak")
def test_a_directory_owned_by_another_uid_is_refused_on_the_way_and_at_the_end(
    base: Path,
) -> None:
    theirs = base / "theirs"
    (theirs / "ours").mkdir(parents=True, mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_GID)

    for path in (theirs, theirs / "ours"):
        message = refusal(path)
        assert f"{theirs} is owned by uid {OTHER_UID}" in message, message
        assert "refusing to keep files under it" in message


@pytest.mark.usefixtures("no_fd_leak")
def test_a_group_writable_ancestor_is_refused_unless_sticky(base: Path) -> None:
    shared = base / "shared"
    (shared / "luod").mkdir(parents=True, mode=0o700)
    shared.chmod(0o775)
    message = refusal(shared / "luod")
    assert f"{shared} is writable by group or others (mode 0775)" in message, message
    assert "only a sticky ancestor may be" in message

    # Sticky like /tmp: only an entry's owner (root, checked next) may rename it.
    shared.chmod(0o1777)
    assert opened(shared / "luod") == shared / "luod"


@pytest.mark.usefixtures("no_fd_leak")
@pytest.mark.parametrize("mode", [0o1777, 0o770, 0o702])
def test_the_directory_itself_is_refused_when_others_may_write_it_sticky_or_not(
    base: Path, mode: int
) -> None:
    state = base / "state"
    state.mkdir()
    state.chmod(mode)
    message = refusal(state)
    assert f"{state} is writable by group or others (mode {mode:04o})" in message, message
    assert message.endswith("refusing to keep files in it")


@pytest.mark.usefixtures("no_fd_leak")
def test_missing_directories_are_refused_or_created_private(base: Path) -> None:
    wanted = base / "new" / "state"
    assert f"{base / 'new'} does not exist" in refusal(wanted)
    assert not (base / "new").exists()

    assert opened(wanted, create_mode=0o700) == wanted
    for path in (base / "new", wanted):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert path.stat().st_uid == os.geteuid()


def test_a_directory_that_cannot_be_created_is_one_line() -> None:
    # /proc takes no new directories, whoever asks.
    message = refusal("/proc/luod-state-never-here", create_mode=0o700)
    assert message.startswith("cannot create /proc/luod-state-never-here: "), message


@pytest.mark.usefixtures("no_fd_leak")
def test_a_file_on_the_way_is_not_a_directory(base: Path) -> None:
    (base / "file").write_text("not a directory\n")
    assert f"{base / 'file'} is not a directory" in refusal(base / "file" / "state")
    assert f"{base / 'file'} is not a directory" in refusal(base / "file")


@pytest.mark.usefixtures("no_fd_leak")
def test_a_name_longer_than_the_filesystem_allows_is_one_line(base: Path) -> None:
    message = refusal(base / ("x" * 300), create_mode=0o700)
    assert message.startswith(f"cannot open {base}/xxx"), message
    assert "too long" in message


# -- symbolic links on the way ---------------------------------------------------------------


@pytest.mark.usefixtures("no_fd_leak")
def test_links_of_root_are_followed_relative_or_absolute(base: Path) -> None:
    (base / "run" / "luod").mkdir(parents=True, mode=0o700)
    os.symlink("run", base / "var-run")  # like /var/run -> /run
    os.symlink(str(base / "run"), base / "abs-run")
    os.symlink("../run/luod", base / "run" / "again")

    assert opened(base / "var-run" / "luod") == base / "run" / "luod"
    assert opened(base / "abs-run" / "luod") == base / "run" / "luod"
    assert opened(base / "run" / "again") == base / "run" / "luod"


@needs_root
@pytest.mark.usefixtures("no_fd_leak")
def test_a_link_owned_by_another_uid_is_never_followed(base: Path) -> None:
    (base / "target").mkdir(mode=0o700)
    link = base / "planted"
    os.symlink(str(base / "target"), link)
    os.lchown(link, OTHER_UID, OTHER_GID)

    message = refusal(link / "state", create_mode=0o700)
    assert f"{link} is a symbolic link owned by uid {OTHER_UID}; not following it" in message
    assert list((base / "target").iterdir()) == []


@needs_root
@pytest.mark.usefixtures("no_fd_leak")
def test_a_link_of_root_into_a_directory_another_uid_owns_is_refused_there(
    base: Path,
) -> None:
    theirs = base / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_GID)
    os.symlink(str(theirs), base / "link")

    assert f"{theirs} is owned by uid {OTHER_UID}" in refusal(base / "link")


@pytest.mark.usefixtures("no_fd_leak")
def test_a_link_loop_is_refused(base: Path) -> None:
    os.symlink("b", base / "a")
    os.symlink("a", base / "b")
    message = refusal(base / "a" / "state")
    assert message == f"too many symbolic links on the way to {base / 'a' / 'state'}"


# -- inside a checked directory --------------------------------------------------------------


@pytest.fixture
def state_dir(base: Path) -> Iterator[StateDir]:
    sd = StateDir(str(base / "state"), create_mode=0o700)
    yield sd
    sd.close()
    sd.close()  # closing twice is harmless (a failed start closes what it opened)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc/passwd"])
def test_names_are_single_components(state_dir: StateDir, name: str) -> None:
    with pytest.raises(ValueError, match="is not a file name"):
        state_dir.exists(name)
    with pytest.raises(ValueError, match="is not a file name"):
        state_dir.write_atomic(name, b"x")


def test_reading_a_link_or_a_directory_is_refused(state_dir: StateDir, base: Path) -> None:
    secret = base / "secret"
    secret.write_text("root's secret\n")
    os.symlink(secret, base / "state" / "state")
    (base / "state" / "journal.dtb").mkdir()

    with pytest.raises(OSError) as info:
        state_dir.read("state")
    assert info.value.errno == errno.ELOOP
    with pytest.raises(OSError) as info:
        state_dir.read("journal.dtb")
    assert info.value.errno == errno.EINVAL
    assert "is not a regular file" in str(info.value)


def test_a_write_over_a_planted_directory_fails_and_leaves_nothing(
    state_dir: StateDir, base: Path
) -> None:
    (base / "state" / "image.dtb").mkdir()
    with pytest.raises(OSError):
        state_dir.write_atomic("image.dtb", b"handover image")
    assert sorted(os.listdir(base / "state")) == ["image.dtb"]  # no temporary left
    assert (base / "state" / "image.dtb").is_dir()


def test_a_write_replaces_a_planted_link_without_following_it(
    state_dir: StateDir, base: Path
) -> None:
    secret = base / "secret"
    secret.write_text("root's secret\n")
    os.symlink(secret, base / "state" / "state")
    state_dir.write_atomic("state", b"prepared\n", mode=0o644)
    assert secret.read_text() == "root's secret\n"
    assert not (base / "state" / "state").is_symlink()
    assert state_dir.read("state") == b"prepared\n"
    assert stat.S_IMODE((base / "state" / "state").stat().st_mode) == 0o644


def test_the_lock_file_must_be_ours_alone(state_dir: StateDir, base: Path) -> None:
    lock = base / "state" / "luod.lock"
    secret = base / "secret"
    secret.write_text("root's secret\n")
    os.symlink(secret, lock)
    with pytest.raises(UnsafePathError, match="is a symbolic link; not following it"):
        state_dir.open_lock("luod.lock")
    lock.unlink()

    # A second name for the lock file (a hard link someone made) could be
    # swapped for another file under luod: refused.
    fd = state_dir.open_lock("luod.lock")
    os.close(fd)
    os.link(lock, base / "lock-alias")
    with pytest.raises(UnsafePathError, match="with one link"):
        state_dir.open_lock("luod.lock")
    (base / "lock-alias").unlink()
    lock.unlink()

    (base / "state" / "luod.lock").mkdir()
    with pytest.raises((UnsafePathError, IsADirectoryError)):
        state_dir.open_lock("luod.lock")
    assert secret.read_text() == "root's secret\n"


@needs_root
def test_a_lock_file_of_another_uid_is_refused(state_dir: StateDir, base: Path) -> None:
    lock = base / "state" / "luod.lock"
    lock.touch(mode=0o600)
    os.chown(lock, OTHER_UID, OTHER_GID)
    with pytest.raises(UnsafePathError, match=f"not a regular file of uid {os.geteuid()}"):
        state_dir.open_lock("luod.lock")


def test_markers_and_links_never_follow_or_overwrite(state_dir: StateDir, base: Path) -> None:
    state_dir.create_empty("reboot-intent")
    (base / "state" / "reboot-intent").write_bytes(b"kept")
    state_dir.create_empty("reboot-intent")  # already there: left as it is
    assert (base / "state" / "reboot-intent").read_bytes() == b"kept"

    os.symlink("/nonexistent", base / "state" / "dangling")
    assert state_dir.exists("dangling")  # a link exists, though it leads nowhere
    assert not state_dir.exists("missing")

    state_dir.link("reboot-intent", "second-name")
    assert (base / "state" / "second-name").read_bytes() == b"kept"
    with pytest.raises(FileExistsError):
        state_dir.link("reboot-intent", "dangling")

    state_dir.rename("dangling", "second-name")  # the link is moved, not followed
    assert os.readlink(base / "state" / "second-name") == "/nonexistent"
    state_dir.unlink("second-name")
    state_dir.unlink("second-name")  # gone already: nothing to do
    assert sorted(os.listdir(base / "state")) == ["reboot-intent"]


# -- at luod's start -------------------------------------------------------------------------


def test_luod_refuses_a_state_dir_under_a_non_sticky_shared_directory(base: Path) -> None:
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "liveupdate.server.luod",
            "--socket",
            str(base / "device"),
            "--state-dir",
            str(shared / "luod"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("luod: ")]
    assert len(lines) == 1, result.stderr
    assert f"{shared} is writable by group or others (mode 0777)" in lines[0]
    assert not (shared / "luod").exists()
    assert not (base / "device").exists()
