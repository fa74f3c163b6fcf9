"""Running the shim tests' C programs and comparing what they print."""

from __future__ import annotations

import subprocess
from pathlib import Path


def lines_of(program: Path, env: dict[str, str], *args: str, timeout: float = 60) -> list[str]:
    """Run ``program args`` with ``env``; the lines it printed, once it exited 0."""
    result = subprocess.run(
        [str(program), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def assert_same_lines(got: list[str], want: list[str], what: str) -> None:
    """``got == want``, line by line, so that a failure names the first line that differs."""
    for n, (line, wanted) in enumerate(zip(got, want, strict=False)):
        assert line == wanted, f"{what}, line {n + 1}: got {line!r}, wanted {wanted!r}"
    assert len(got) == len(want), (what, got[-3:], want[-3:])
