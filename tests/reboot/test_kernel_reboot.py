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
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from scenarios import SCENARIOS, Obs, diff, kernel_scenarios, stage_count

from luodtest import REPO, SHARED

pytestmark = pytest.mark.vm

HERE = Path(__file__).resolve().parent
KIT = SHARED / "kernel-vm"
RUN_IN_VM = KIT / "run-in-vm.sh"
VM_STAGE = HERE / "vm_stage.py"
REQUIRE_ENV = "LIVEUPDATE_REQUIRE_VM"
#: The job directory as the guest sees it (``run-in-vm.sh --out``).
GUEST_JOB = "/run/luo-job"
KERNEL_IDS = [s.id for s in kernel_scenarios()]


def missing_requirement() -> str | None:
    """Why the VM cannot run here, or ``None``."""
    if os.environ.get("LUO_STAGE"):
        return "already running inside the LUO test VM"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    for path in (RUN_IN_VM, KIT / "bzImage"):
        if not path.exists():
            return f"{path} is missing (see {KIT / 'README.md'})"
    if shutil.which("kexec") is None and not Path("/usr/sbin/kexec").exists():
        return "kexec-tools is not installed"
    return None


@dataclass
class VmRun:
    observed: dict[str, Obs] = field(default_factory=dict)
    stage_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    console: str = ""


def _precompile(job: Path) -> dict[str, str]:
    """Bytecode for everything ``vm_stage.py`` imports, in ``job/pycache``.

    The guest's root file system is the host's, read-only, and the sources
    have no ``__pycache__`` when the host runs with PYTHONDONTWRITEBYTECODE:
    compiling ``liveupdate`` at each of the three boots costs seconds under
    TCG. The host writes the bytecode once into the job directory; the guest
    reads it through ``PYTHONPYCACHEPREFIX`` and never writes. (Stale or
    missing bytecode only costs time: Python checks the sources' mtimes.)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(job / "pycache")
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import vm_stage"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    return {"PYTHONPYCACHEPREFIX": f"{GUEST_JOB}/pycache"}


@pytest.fixture(scope="module")
def vm_run(tmp_path_factory: pytest.TempPathFactory) -> VmRun:
    """Boot the VM once: stage 1, kexec, stage 2, kexec, stage 3."""
    reason = missing_requirement()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    job = tmp_path_factory.mktemp("kernel-vm-job")
    stages = stage_count(kernel_scenarios())
    guest_env = {"PYTHONDONTWRITEBYTECODE": "1", **_precompile(job)}
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
