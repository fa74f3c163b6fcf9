"""examples/c/preserve_memfd.c, an unmodified LUO program, across `luoctl reboot` under the shim."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from luodtest import REPO, Luod, luoctl_reboot, sessions

pytestmark = pytest.mark.luod_only


def test_c_example_preserves_a_memfd_across_luoctl_reboot(
    luod: Luod, shim_env: dict[str, str], build_c: Callable[[Path], Path]
) -> None:
    program = build_c(REPO / "examples" / "c" / "preserve_memfd.c")
    text = "kept across a live update"
    stage1 = subprocess.Popen(
        [str(program), "preserve", "c-example", text],
        env=shim_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stage1.stdin is not None and stage1.stdout is not None
    try:
        assert stage1.stdout.readline() == "preserved c-example\n"
        assert ("c-example", "outgoing") in sessions(luod)
        luoctl_reboot(luod)  # stage 1 still holds the session fd open
    finally:
        stage1.stdin.close()
        assert stage1.wait(timeout=30) == 0
    assert ("c-example", "incoming") in sessions(luod)
    stage2 = subprocess.run(
        [str(program), "restore", "c-example"],
        env=shim_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert stage2.returncode == 0, stage2.stderr
    assert stage2.stdout == f"restored c-example: {text}\n"
    assert ("c-example", "incoming") not in sessions(luod)
