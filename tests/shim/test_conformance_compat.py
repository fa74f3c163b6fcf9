"""The C conformance programs against ``luod --compat=linux``, and against Linux.

The same binaries as ``test_conformance_c.py`` (sections A and B) and
``test_conformance_c_reboot.py`` (section C, two stages around a reboot) run
under the shim against a luod in Linux-exact mode. Without a VM, their lines
must be luod's own except exactly where the docs say Linux differs
(docs/guides/linux-mode.md): the mode switches those and nothing else. In
the kernel VM (``../shared/kernel-vm``, marker ``vm``), the same binaries
without the shim print the real kernel's lines, and luod's must equal them
line by line: this mode allows no difference at all in these scenarios.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cprograms import assert_same_lines, lines_of

from luodtest import Luod

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).resolve().parent
#: The ``run_stages`` fixture (tests/shim/conftest.py).
RunStages = Callable[[Path, dict[str, str], Luod], tuple[list[str], list[str]]]

#: The lines luod's own mode answers otherwise than Linux (c-programs.md's
#: table): Linux-exact mode gives Linux's answers there.
SWITCHED = {
    "A7 device-nr-02": "EINVAL",
    "A7 device-nr-7f": "EINVAL",
    "A7 device-session-nr-40": "EINVAL",
    "A7 device-session-nr-43": "EINVAL",
    "A7 session-device-nr-00": "EINVAL",
    "A7 session-device-nr-01": "EINVAL",
    "A7 session-nr-44": "EINVAL",
    "B15 preserve-read-end": "ENOENT",
    "B15 preserve-write-end": "ENOENT",
    "B15 preserve-read-end-again": "ENOENT",
}


@pytest.fixture
def luod(luod_factory: Callable[..., Luod]) -> Luod:
    """This module's luod (what ``shim_env`` connects to): Linux-exact."""
    return luod_factory("--compat", "linux")


def answers(lines: list[str]) -> dict[str, str]:
    """``"<id> <step>" -> result``, in order; each key once."""
    pairs = [line.rsplit(" ", 1) for line in lines]
    result = {key: value for key, value in pairs}
    assert len(result) == len(pairs), "a step printed twice"
    return result


def test_linux_mode_switches_exactly_the_documented_lines(
    luod: Luod,
    luod_factory: Callable[..., Luod],
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
) -> None:
    program = build_c(HERE / "conformance.c")
    own = luod_factory()  # luod's own contract, beside the Linux-exact one
    on_own = answers(lines_of(program, {**shim_env, "LIVEUPDATE_DEVICE": own.socket}, "c"))
    on_linux = answers(lines_of(program, shim_env, "c"))
    assert list(on_linux) == list(on_own)
    changed = {key: value for key, value in on_linux.items() if value != on_own[key]}
    assert changed == SWITCHED
    assert not [key for key, value in on_linux.items() if value == "MISMATCH"]


def test_linux_mode_keeps_section_c_across_a_reboot(
    luod: Luod,
    luod_factory: Callable[..., Luod],
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    run_stages: RunStages,
) -> None:
    """Section C lists no deviation: both modes print the same lines."""
    program = build_c(HERE / "conformance_c.c")
    own = luod_factory()
    on_own = run_stages(program, {**shim_env, "LIVEUPDATE_DEVICE": own.socket}, own)
    on_linux = run_stages(program, shim_env, luod)
    for stage, got, want in zip(("stage1", "stage2"), on_linux, on_own, strict=True):
        assert_same_lines(got, want, stage)


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_sections_a_and_b_in_linux_mode_print_the_kernels_lines(
    luod: Luod,
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    kernel_ab_lines: list[str],
) -> None:
    on_luod = lines_of(build_c(HERE / "conformance.c"), shim_env, "c")
    assert_same_lines(on_luod, kernel_ab_lines, "sections A and B")


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_section_c_in_linux_mode_prints_the_kernels_lines_across_a_kexec(
    luod: Luod,
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    run_stages: RunStages,
    kernel_c_lines: tuple[list[str], list[str]],
) -> None:
    on_luod = run_stages(build_c(HERE / "conformance_c.c"), shim_env, luod)
    for stage, got, want in zip(("stage1", "stage2"), on_luod, kernel_c_lines, strict=True):
        assert_same_lines(got, want, stage)
