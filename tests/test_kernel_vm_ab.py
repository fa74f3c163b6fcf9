"""Conformance sections A and B against the real LUO kernel, in a QEMU VM.

Boots ``shared/kernel-vm``'s Linux 7.3 kernel (LUO + KHO) with
``run-in-vm.sh`` and runs ``tests/conformance`` inside it with
``LIVEUPDATE_TEST_DEVICE=/dev/liveupdate``: the very same library-level tests
that run against luod here then run against the kernel's device. The guest
sees this machine's root filesystem read-only, so the repository and its
virtualenv are used in place; pytest is told not to write anything there
(no cache provider, no bytecode, hypothesis' database under ``/run``), and
its JUnit report goes to the job directory shared with the host, which is
parsed here.

Skipped when QEMU is not installed, unless ``LIVEUPDATE_REQUIRE_VM=1`` (CI),
which turns that into a failure. Takes about a minute (TCG, no KVM).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import pytest

from luodtest import REPO, RUN_IN_VM, require_vm

VM_TIMEOUT = 900  # seconds QEMU may run (run-in-vm.sh --timeout)

#: Library-level tests that must have *passed* against the kernel (every
#: parametrized case of each). Together they cover A1-A10, A13, A15, A16 and
#: B1-B8, B10, B12-B15.
MUST_PASS = {
    "test_a1_open_and_close",
    "test_a2_second_open_is_ebusy",
    "test_a3_duplicate_name_is_eexist",
    "test_a4_two_distinct_names",
    "test_a5_bad_names_are_einval",
    "test_a6_63_byte_name_round_trips",
    "test_a6_names_are_raw_bytes",
    "test_a6_get_name_reply_is_nul_terminated_whatever_the_buffer_held",
    "test_a7_unsupported_numbers",
    "test_a8_size_below_minimum_is_einval",
    "test_a9_bigger_struct_with_zero_tail_acts_like_sizeof",
    "test_a9_bigger_create_session_returns_a_working_session",
    "test_a10_non_zero_tail_is_e2big",
    "test_a13_reserved_not_zero_is_einval",
    "test_a15_reply_covers_exactly_min_size_sizeof",
    "test_a16_close_then_open_from_another_process_is_never_ebusy",
    "test_b1_preserved_memfd_keeps_its_data",
    "test_b2_two_memfds_in_one_session",
    "test_b3_two_sessions_with_data_and_empty_memfds",
    "test_b4_dev_null_has_no_handler",
    "test_b5_a_file_is_preserved_once",
    "test_b5_closing_a_session_releases_its_file_and_name_at_once",
    "test_b6_duplicate_token_in_a_session_is_eexist",
    "test_b7_same_token_in_two_sessions",
    "test_b8_extreme_tokens",
    "test_b10_retrieve_or_finish_on_an_outgoing_session_is_einval",
    "test_b12_two_thousand_sessions",
    "test_b13_five_hundred_memfds_in_one_session",
    "test_b14_o_path_fd_is_ebadf",
    "test_b15_pipe_ends_are_two_files",
}

#: Tests marked ``luod_only``: the only ones allowed to be skipped in the VM.
LUOD_ONLY = {
    "test_a8_incoming_size_below_minimum_is_einval",
    "test_a9_incoming_bigger_struct_with_zero_tail",
    "test_a10_incoming_non_zero_tail_is_e2big",
    "test_a11_short_argument_is_efault",
    "test_a12_argument_over_64k_is_e2big",
    "test_a13_finish_reserved_on_an_incoming_session",
    "test_a14_preserve_fd_needs_exactly_one_fd",
    "test_a15_wire_out_len_is_min_size_sizeof",
    "test_a17_malformed_frames_are_efault_and_harmless",
    "test_b5_luod_name_is_free_right_after_close",
    "test_b5_luod_file_is_free_right_after_close",
    "test_b9_orchestrator_holds_its_own_reference",
    "test_b11_session_file_limit_is_enospc",
}


def _guest_command(python: Path) -> str:
    """The shell command run in the VM (``$LUO_JOB`` is expanded there)."""
    env = {
        "LIVEUPDATE_TEST_DEVICE": "/dev/liveupdate",
        "PYTHONDONTWRITEBYTECODE": "1",  # the repository is read-only in the guest
        "HYPOTHESIS_STORAGE_DIRECTORY": "/run/tmp/hyp",
    }
    pytest_args = [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",  # no .pytest_cache in the read-only checkout
        "-q",
        "-rfEsxX",
        "tests/conformance",
        "-m",
        "not vm",
        "-o",
        "addopts=",
    ]
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    args = " ".join(shlex.quote(a) for a in pytest_args)
    return (
        f"cd {shlex.quote(str(REPO))} && exec env {assignments} "
        f'{shlex.quote(str(python))} {args} --junitxml="$LUO_JOB/junit.xml"'
    )


def _outcomes(junit: Path) -> dict[str, list[tuple[str, str]]]:
    """Function name -> [(outcome, test id)] from a JUnit XML report."""
    result: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.attrib["name"]
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = tag
                break
        result[name.split("[", 1)[0]].append((outcome, name))
    return result


@pytest.mark.vm
@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_conformance_a_b_pass_against_the_kernel(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    require_vm()
    python = REPO / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    job = tmp_path / "job"
    command = [
        str(RUN_IN_VM),
        "--out",
        str(job),
        "--timeout",
        str(VM_TIMEOUT),
        "--",
        "sh",
        "-c",
        _guest_command(python),
    ]
    started = time.monotonic()
    proc = subprocess.run(
        command,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=VM_TIMEOUT + 60,
    )
    elapsed = time.monotonic() - started
    request.node.user_properties.append(("vm_seconds", round(elapsed, 1)))
    print(f"kernel VM run: {elapsed:.1f} s")
    console = proc.stdout + proc.stderr
    (tmp_path / "console.log").write_text(console)
    tail = "\n".join(console.splitlines()[-60:])

    junit = job / "junit.xml"
    assert junit.exists(), f"no JUnit report (run-in-vm.sh rc={proc.returncode}):\n{tail}"
    outcomes = _outcomes(junit)
    bad = [
        test_id
        for cases in outcomes.values()
        for outcome, test_id in cases
        if outcome in ("failure", "error")
    ]
    assert not bad, f"failed in the VM: {bad}\n{tail}"
    assert proc.returncode == 0, f"run-in-vm.sh rc={proc.returncode}\n{tail}"

    not_passed = {
        name: [c for c in outcomes.get(name, []) if c[0] != "passed"] or "not run"
        for name in MUST_PASS
        if not outcomes.get(name) or any(o != "passed" for o, _ in outcomes[name])
    }
    assert not not_passed, f"expected to pass against the kernel: {not_passed}"
    skipped = {name for name, cases in outcomes.items() if any(o == "skipped" for o, _ in cases)}
    assert skipped <= LUOD_ONLY, f"skipped in the VM but not luod_only: {skipped - LUOD_ONLY}"
    unknown = {n for n in outcomes if re.match(r"test_[ab]\d+_", n)} - MUST_PASS - LUOD_ONLY
    assert not unknown, f"new A/B tests: add them to MUST_PASS or LUOD_ONLY: {unknown}"
