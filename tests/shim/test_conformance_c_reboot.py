"""The C conformance program of section C (two generations) against luod.

``tests/shim/conformance_c.c`` runs the scenarios of ``conformance.md``
section C that a C program calling ``ioctl()`` can run, in two stages: stage 1
preserves and keeps its session fds open while ``luoctl reboot`` runs, stage 2
retrieves and checks. Both print one ``<id> <step> <result>`` line per check;
the test pins every line to the answer ``conformance.md`` gives. The same
binary, without the shim, runs in the kernel VM across a real kexec (stage 1
with ``--detach`` hands its session fds to a holder that lives until the
kexec) and must print luod's lines: section C lists no deviation.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from luodtest import SHARED, Luod, luoctl_reboot, sessions

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).resolve().parent
HOLDING = "stage1 holding"

#: conformance.md's answer for every line that is not OK.
EXPECTED_ERRORS = {
    "C8 retrieve-closed-session": "ENOENT",
    "C8 retrieve-unknown-session": "ENOENT",
    "C9 retrieve-again": "EINVAL",
    "C11 retrieve-unknown-token": "ENOENT",
    "C12 retrieve-fd-after-finish": "ENOENT",
    "C14 preserve-on-incoming": "EINVAL",
    "C21 preserve-before-finish": "EBUSY",
}

#: The scenarios a C client cannot run (three generations, daemon internals).
SKIPPED = {"C3", "C16", "C17", "C18", "C19", "C20"}


def run_stages(program: Path, env: dict[str, str], luod: Luod) -> tuple[list[str], list[str]]:
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


def answers(lines: list[str]) -> dict[str, str]:
    """``"<id> <step>" -> result`` of the checked lines; each key once."""
    checked = [line.rsplit(" ", 1) for line in lines if " skip " not in line]
    result = {key: value for key, value in checked}
    assert len(result) == len(checked), "a step printed twice"
    return result


def test_c_program_keeps_and_retrieves_sessions_across_luoctl_reboot(
    luod: Luod, shim_env: dict[str, str], build_c: Callable[[Path], Path]
) -> None:
    program = build_c(HERE / "conformance_c.c")
    first, second = run_stages(program, shim_env, luod)
    stage1, stage2 = answers(first), answers(second)
    assert stage1 and all(value == "OK" for value in stage1.values()), stage1
    # Every check of stage 2 gives conformance.md's answer: the errnos above, OK elsewhere.
    wrong = {key: value for key, value in stage2.items() if value != EXPECTED_ERRORS.get(key, "OK")}
    assert not wrong, wrong
    assert EXPECTED_ERRORS.keys() <= stage2.keys()
    for key in ("C1 data-0x1a", "C4 data-500", "C5 byte-exact", "C6 size-0",
                "C7 data-written-after-preserve", "C10 shared-position",
                "C13 fd-valid-after-finish", "C15 create-named-like-incoming",
                "C21 preserve-after-finish"):  # fmt: skip
        assert stage2.get(key) == "OK", key
    skipped = {line.split(" ", 1)[0] for line in second if " skip " in line}
    assert skipped == SKIPPED
    # Stage 2 finished every session it retrieved, and C8's never came back.
    assert [kind for _name, kind in sessions(luod) if kind == "incoming"] == []


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_the_same_c_binary_across_a_real_kexec_prints_luods_lines(
    luod: Luod, shim_env: dict[str, str], build_c: Callable[[Path], Path], tmp_path: Path
) -> None:
    runner = SHARED / "kernel-vm" / "run-in-vm.sh"
    if shutil.which("qemu-system-x86_64") is None or not runner.is_file():
        why = "kernel VM unavailable"
        if os.environ.get("LIVEUPDATE_REQUIRE_VM") == "1":
            pytest.fail(why + " (LIVEUPDATE_REQUIRE_VM=1)")
        pytest.skip(why)
    program = build_c(HERE / "conformance_c.c")
    on_luod = run_stages(program, shim_env, luod)
    job = tmp_path / "job"
    prog = shlex.quote(str(program))
    guest = (
        'if [ "$LUO_STAGE" = 1 ]; then '
        f'{prog} stage1 c --detach > "$LUO_JOB/stage1.txt" 2> "$LUO_JOB/stderr1.txt"; '
        f'else {prog} stage2 c > "$LUO_JOB/stage2.txt" 2> "$LUO_JOB/stderr2.txt"; fi'
    )
    proc = subprocess.run(
        [str(runner), "--kexec", "--out", str(job), "--timeout", "600", "--", "sh", "-c", guest],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=700,
        check=False,
    )
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    for stage, luod_lines in zip(("stage1", "stage2"), on_luod, strict=True):
        kernel_lines = [
            text for text in (job / f"{stage}.txt").read_text().splitlines() if text != HOLDING
        ]
        # Line by line, so a failure names the first check that differs.
        for luod_line, kernel_line in zip(luod_lines, kernel_lines, strict=False):
            assert kernel_line == luod_line, (stage, tail)
        assert len(kernel_lines) == len(luod_lines), (stage, kernel_lines[-5:], tail)
