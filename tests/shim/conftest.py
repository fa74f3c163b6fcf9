"""Fixtures of the C shim's tests: the built shim, C programs built with gcc,
the C conformance programs' two stages around a luod reboot, and their output
on the real kernel (``../shared/kernel-vm``, run once per test session)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from liveupdate import shim
from luodtest import REPO, RUN_IN_VM, Luod, luoctl_reboot, require_vm

pytestmark = pytest.mark.luod_only

CFLAGS = ["-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wextra", "-Werror"]
HERE = Path(__file__).resolve().parent
#: What stage 1 of conformance_c prints once it holds its session fds.
HOLDING = "stage1 holding"
#: Two stages of a C program around a luod reboot: (program, env, luod) -> lines.
RunStages = Callable[[Path, dict[str, str], Luod], tuple[list[str], list[str]]]


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


def _run_stages(program: Path, env: dict[str, str], luod: Luod) -> tuple[list[str], list[str]]:
    """Stage 1 in the background, ``luoctl reboot`` while it holds its
    session fds, stage 1's exit, stage 2: the two stages' lines."""
    stage1 = subprocess.Popen(
        [str(program), "stage1", "c"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stage1.stdin is not None and stage1.stdout is not None
    first: list[str] = []
    try:
        while (text := stage1.stdout.readline()) not in ("", HOLDING + "\n"):
            first.append(text.rstrip("\n"))
        assert text == HOLDING + "\n", first
        luoctl_reboot(luod)
    finally:
        stage1.stdin.close()
        assert stage1.wait(timeout=30) == 0
    second = subprocess.run(
        [str(program), "stage2", "c"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert second.returncode == 0, second.stderr
    return first, second.stdout.splitlines()


@pytest.fixture(scope="session")
def run_stages() -> RunStages:
    """Runs ``conformance_c``'s two stages against a luod, around its reboot."""
    return _run_stages


def _in_vm(job: Path, guest: str, *options: str) -> str:
    """Run the shell command ``guest`` in the kernel VM; the console's tail."""
    command = [str(RUN_IN_VM), *options, "--out", str(job), "--timeout", "600"]
    proc = subprocess.run(
        [*command, "--", "sh", "-c", guest],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=700,
        check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    return f"rc={proc.returncode}\n{tail}"


@pytest.fixture(scope="session")
def kernel_ab_lines(
    build_c: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """``conformance c``'s lines without the shim, on Linux's /dev/liveupdate."""
    require_vm()
    program = build_c(HERE / "conformance.c")
    job = tmp_path_factory.mktemp("vm-ab") / "job"
    tail = _in_vm(
        job, f'{shlex.quote(str(program))} c > "$LUO_JOB/lines.txt" 2> "$LUO_JOB/stderr.txt"'
    )
    lines = job / "lines.txt"
    assert lines.exists(), f"no output from the VM ({tail})"
    return lines.read_text().splitlines()


@pytest.fixture(scope="session")
def kernel_c_lines(
    build_c: Callable[[Path], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[str], list[str]]:
    """``conformance_c``'s two stages without the shim, across a real kexec."""
    require_vm(kexec=True)
    program = shlex.quote(str(build_c(HERE / "conformance_c.c")))
    job = tmp_path_factory.mktemp("vm-c") / "job"
    guest = (
        'if [ "$LUO_STAGE" = 1 ]; then '
        f'{program} stage1 c --detach > "$LUO_JOB/stage1.txt" 2> "$LUO_JOB/stderr1.txt"; '
        f'else {program} stage2 c > "$LUO_JOB/stage2.txt" 2> "$LUO_JOB/stderr2.txt"; fi'
    )
    tail = _in_vm(job, guest, "--kexec")
    stages = []
    for stage in ("stage1", "stage2"):
        out = job / f"{stage}.txt"
        assert out.exists(), f"no {stage} output from the VM ({tail})"
        stages.append([text for text in out.read_text().splitlines() if text != HOLDING])
    return stages[0], stages[1]
