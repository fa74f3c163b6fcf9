"""What a shell sees of ``luoctl``: its documented exit statuses and its completion.

The exit statuses are read from the guide's table and produced by real
``luoctl`` processes; completion runs the script ``luoctl`` prints inside a
real ``bash``, as a user's shell would after ``eval``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from luodtest import LUOCTL, REPO, Luod, luoctl

GUIDE = REPO / "docs" / "guides" / "luoctl.md"


# -- exit statuses ------------------------------------------------------------------------


def documented_statuses() -> dict[str, str]:
    """The guide's exit status table: status -> when."""
    text = GUIDE.read_text(encoding="utf-8")
    table = text.split("### Exit status", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", table, re.MULTILINE)
    return {status: when for status, when in rows if status not in ("status", "---")}


def test_the_guide_documents_each_exit_status() -> None:
    assert set(documented_statuses()) == {"0", "1", "2", "3", "126, 127", "other"}


@pytest.mark.luod_only
def test_exit_statuses_0_1_and_2(luod: Luod) -> None:
    assert luoctl(luod.socket, "state").returncode == 0
    failed = luoctl(luod.socket, "cancel")  # not prepared: EINVAL
    assert failed.returncode == 1
    assert failed.stderr.startswith("luoctl: ") and "(EINVAL)" in failed.stderr
    usage = luoctl(luod.socket, "reboot", "--no-such-option")
    assert usage.returncode == 2
    assert "No such option" in usage.stderr and "--no-such-option" in usage.stderr
    assert usage.stderr.startswith("Usage: luoctl reboot")
    negative = luoctl(luod.socket, "reboot", "--wait", "-1")
    assert negative.returncode == 2


def test_exit_status_3_is_status_of_a_luod_not_running(tmp_path: Path) -> None:
    assert luoctl(str(tmp_path / "none"), "status").returncode == 3
    # Only status says "not running" with 3; the other commands fail with 1.
    assert luoctl(str(tmp_path / "none"), "state").returncode == 1


@pytest.mark.luod_only
def test_exit_statuses_of_run(luod: Luod, tmp_path: Path) -> None:
    missing = luoctl(luod.socket, "run", "--session", "a", "--", str(tmp_path / "nothing"))
    assert missing.returncode == 127, missing.stderr
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    refused = luoctl(luod.socket, "run", "--session", "b", "--", str(script))
    assert refused.returncode == 126, refused.stderr
    own = luoctl(
        luod.socket, "run", "--session", "c", "--restart", "no", "--", "sh", "-c", "exit 7"
    )
    assert own.returncode == 7, own.stderr
    killed = luoctl(
        luod.socket, "run", "--session", "d", "--restart", "no", "--", "sh", "-c", "kill -9 $$"
    )
    assert killed.returncode == 128 + 9, killed.stderr


# -- shell completion ---------------------------------------------------------------------


@pytest.fixture(name="path_with_luoctl")
def path_with_luoctl_fixture(tmp_path: Path) -> str:
    """A PATH whose ``luoctl`` is this checkout's (``python -m liveupdate.cli.luoctl``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "luoctl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m liveupdate.cli.luoctl "$@"\n')
    wrapper.chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"


def complete(path: str, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` after ``eval "$(... bash_source luoctl)"``."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    line = " ".join(f"'{w}'" for w in ("luoctl", *words))
    script = (
        'eval "$(_LUOCTL_COMPLETE=bash_source luoctl)"\n'
        f"COMP_WORDS=({line})\n"
        f"COMP_CWORD={len(words)}\n"
        "_luoctl_completion luoctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": path},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completion_offers_commands_options_and_choices(path_with_luoctl: str) -> None:
    assert complete(path_with_luoctl, "sta") == ["state", "status"]
    assert complete(path_with_luoctl, "install") == ["install-units"]
    assert {"--no-exec", "--wait"} <= set(complete(path_with_luoctl, "reboot", "--"))
    assert {"--watch", "--interval"} <= set(complete(path_with_luoctl, "state", "--"))
    assert complete(path_with_luoctl, "run", "--restart", "") == ["on-failure", "no"]


@pytest.mark.luod_only
def test_bash_completion_offers_the_session_names_luod_lists(
    luod: Luod, path_with_luoctl: str
) -> None:
    with luod.open() as dev:
        sessions = [dev.create_session(n) for n in ("vm-memory", "vm-disk", "web")]
    try:
        words = ("--socket", luod.socket)
        assert complete(path_with_luoctl, *words, "sessions", "vm") == ["vm-disk", "vm-memory"]
        assert complete(path_with_luoctl, *words, "update", "w") == ["web"]
        assert complete(path_with_luoctl, *words, "run", "--session", "") == [
            "vm-disk",
            "vm-memory",
            "web",
        ]
    finally:
        for session in sessions:
            session.close()


def test_bash_completion_offers_no_session_without_luod(
    path_with_luoctl: str, tmp_path: Path
) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(tmp_path / "stale"))  # nothing listens: a luod that was killed
    stale.close()
    for device in (tmp_path / "none", tmp_path / "stale"):
        assert complete(path_with_luoctl, "--socket", str(device), "sessions", "") == []


@pytest.mark.parametrize(
    ("shell", "marker"),
    [
        ("bash", "complete -o nosort -F _luoctl_completion luoctl"),
        ("zsh", "#compdef luoctl"),
        ("fish", "complete --no-files --command luoctl"),
    ],
)
def test_each_shells_completion_script_is_printed(shell: str, marker: str) -> None:
    result = subprocess.run(
        LUOCTL,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "_LUOCTL_COMPLETE": f"{shell}_source"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout
    bash = shutil.which("bash")
    if shell == "bash" and bash is not None:
        syntax = subprocess.run(
            [bash, "-n"], input=result.stdout, capture_output=True, text=True, check=False
        )
        assert syntax.returncode == 0, syntax.stderr
