"""Fixtures of the C shim's tests: the built shim, C programs built with gcc."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from liveupdate import shim
from luodtest import REPO, Luod

pytestmark = pytest.mark.luod_only

CFLAGS = ["-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wextra", "-Werror"]


@pytest.fixture(scope="session")
def shim_so() -> Path:
    """libluoshim.so, (re)built by scripts/build-shim as the set-up does."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    subprocess.run([str(REPO / "scripts" / "build-shim")], check=True)
    return shim.shim_path()


@pytest.fixture(scope="session")
def build_c(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Path]:
    """Compile one C file against the installed header; the program's path."""
    out_dir = tmp_path_factory.mktemp("c-programs")

    def build(source: Path) -> Path:
        if shutil.which("gcc") is None:
            pytest.skip("no C compiler")
        program = out_dir / source.stem
        if not program.exists():
            cmd = ["gcc", *CFLAGS, f"-I{shim.include_dir()}", "-o", str(program), str(source)]
            subprocess.run(cmd, check=True)
        return program

    return build


@pytest.fixture
def shim_env(luod: Luod, shim_so: Path) -> dict[str, str]:
    """The environment of a C program using the test's luod through the shim."""
    return {**os.environ, "LD_PRELOAD": str(shim_so), "LIVEUPDATE_DEVICE": luod.socket}
