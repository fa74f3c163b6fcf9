"""Conformance section C against a real LUO kernel: the reboot is a kexec.

The host half of the kernel driver. It boots the LUO test VM of
``../shared/kernel-vm`` once, for as many stages as the scenarios need
(three: C16 and C21 look at a third generation), and runs ``vm_stage.py``
in each boot: stage ``N`` of every ``kernel=True`` scenario of
``scenarios.py`` against ``/dev/liveupdate``, with a holder process keeping
the sessions open until the kexec. The observations come back as JSON in the
job directory and must equal the expectations stated once in
``scenarios.py``: the same the luod driver checks.

Skipped when QEMU or the VM kit is missing, unless ``LIVEUPDATE_REQUIRE_VM=1``
(then it fails). ``LIVEUPDATE_VM_ARGS`` adds options to ``run-in-vm.sh``
(e.g. ``--tcg``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scenarios import SCENARIOS, Obs, diff, kernel_scenarios, stage_count

from luodtest import REPO, RUN_IN_VM, guest_bytecode, require_vm

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent
VM_STAGE = HERE / "vm_stage.py"
KERNEL_IDS = [s.id for s in kernel_scenarios()]


@dataclass
class VmRun:
    observed: dict[str, Obs] = field(default_factory=dict)
    stage_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    console: str = ""


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    """Boot the VM once: stage 1, kexec, stage 2, kexec, stage 3."""
    require_vm(kexec=True)
    job = tmp_path_factory.mktemp("kernel-vm-job")
    stages = stage_count(kernel_scenarios())
    imports = f"import sys; sys.path.insert(0, {str(HERE)!r}); import vm_stage"
    guest_env = {"PYTHONDONTWRITEBYTECODE": "1", **guest_bytecode(job, imports)}
    command = [
        str(RUN_IN_VM),
        "--stages",
        str(stages),
        "--out",
        str(job),
        *shlex.split(os.environ.get("LIVEUPDATE_VM_ARGS", "")),
        "--",
        "/usr/bin/env",
        *(f"{k}={v}" for k, v in guest_env.items()),
        sys.executable,
        "-B",
        str(VM_STAGE),
    ]
    start = time.monotonic()
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=280, cwd=REPO, check=False
    )
    run = VmRun(seconds=time.monotonic() - start, console=proc.stdout + proc.stderr)
    assert proc.returncode == 0, (
        f"run-in-vm.sh exited {proc.returncode} after {run.seconds:.1f} s:\n{run.console[-6000:]}"
    )
    for n in range(1, stages + 1):
        data: dict[str, Any] = json.loads((job / f"stage{n}.json").read_text())
        run.stage_seconds.append(data["seconds"])
        harness = data["observed"].pop("_harness", None)
        assert harness is None, f"stage {n}: {harness}"
        for sid, obs in data["observed"].items():
            run.observed.setdefault(sid, {}).update(obs)
    print(f"kernel VM: {stages} boots in {run.seconds:.1f} s, stages {run.stage_seconds}")
    return run


@pytest.mark.parametrize("sid", KERNEL_IDS)
def test_kernel_scenario(vm_run: VmRun, sid: str) -> None:
    """On the kernel, the scenario's observations are the very expectations luod meets."""
    scenario = SCENARIOS[sid]
    problems = diff(scenario.expected, vm_run.observed.get(sid, {}))
    assert not problems, f"{sid} ({scenario.title}) on the kernel:\n  " + "\n  ".join(problems)


def test_kernel_scenario_set() -> None:
    """The kernel driver covers C1, C2, C5-C16 and C21, the scenarios checked on Linux."""
    wanted = {"C1", "C2", *(f"C{i}" for i in range(5, 17)), "C21"}
    assert set(KERNEL_IDS) == wanted
