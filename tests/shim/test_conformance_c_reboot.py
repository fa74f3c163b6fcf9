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

from collections.abc import Callable
from pathlib import Path

import pytest

from luodtest import Luod, sessions

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).resolve().parent
#: The ``run_stages`` fixture (tests/shim/conftest.py).
RunStages = Callable[[Path, dict[str, str], Luod], tuple[list[str], list[str]]]

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


def answers(lines: list[str]) -> dict[str, str]:
    """``"<id> <step>" -> result`` of the checked lines; each key once."""
    checked = [line.rsplit(" ", 1) for line in lines if " skip " not in line]
    result = {key: value for key, value in checked}
    assert len(result) == len(checked), "a step printed twice"
    return result


def test_c_program_keeps_and_retrieves_sessions_across_luoctl_reboot(
    luod: Luod,
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    run_stages: RunStages,
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
    luod: Luod,
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    run_stages: RunStages,
    kernel_c_lines: tuple[list[str], list[str]],
) -> None:
    program = build_c(HERE / "conformance_c.c")
    on_luod = run_stages(program, shim_env, luod)
    for stage, luod_lines, kernel_lines in zip(
        ("stage1", "stage2"), on_luod, kernel_c_lines, strict=True
    ):
        # Line by line, so a failure names the first check that differs.
        for luod_line, kernel_line in zip(luod_lines, kernel_lines, strict=False):
            assert kernel_line == luod_line, stage
        assert len(kernel_lines) == len(luod_lines), (stage, kernel_lines[-5:])
