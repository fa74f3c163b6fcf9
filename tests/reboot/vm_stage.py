"""The kernel driver's in-VM half: one stage of every kernel scenario per boot.

Runs INSIDE the LUO test VM (``/work/shared/kernel-vm``), once per boot::

    run-in-vm.sh --stages 3 --out DIR -- \\
        /usr/bin/env PYTHONDONTWRITEBYTECODE=1 REPO/.venv/bin/python -B \\
        REPO/tests/reboot/vm_stage.py

(``test_kernel_reboot.py`` builds that command line.) The VM's root file
system is the host's, read-only, so nothing may try to write bytecode next
to the sources. Under TCG compiling ``liveupdate`` at every boot costs
seconds, so the host test may precompile it into ``DIR/pycache`` and pass
``PYTHONPYCACHEPREFIX=/run/luo-job/pycache`` too (read only, never written).

Stage ``N`` (``$LUO_STAGE``) runs stage ``N`` of every ``kernel=True``
scenario of ``scenarios.py`` against ``/dev/liveupdate`` and writes the
observations to ``$LUO_JOB/stageN.json`` as
``{"seconds": ..., "observed": {"C1": {...}, ...}}``; the host test merges
the files and compares them with the scenarios' expectations.
The sessions a stage keeps are handed to a daemonized *holder* process that
keeps their fds open until the kexec (a process that exits closes its
sessions, which unpreserves them).

The exit status is 0 whenever the observations were written, even when they
are not the expected ones: judging them is the host's job, and a non-zero
status would stop the harness from kexec-ing into the next stage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

# ``scenarios.py`` lives next to this file; tests/ is not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scenarios

import liveupdate

DEVICE = os.environ.get("LIVEUPDATE_VM_DEVICE", "/dev/liveupdate")


def hold(sessions: list[liveupdate.Session]) -> None:
    """Fork a daemon that keeps ``sessions`` open until the kexec ends it."""
    if not sessions:
        return
    if os.fork() == 0:
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            while True:
                signal.pause()
        finally:
            os._exit(0)
    # The parent's copies go; the holder's keep the sessions alive.
    for session in sessions:
        session.close()


def main() -> int:
    stage = int(os.environ.get("LUO_STAGE", "1"))
    job = Path(os.environ.get("LUO_JOB", "."))
    selected = scenarios.kernel_scenarios()
    observed: dict[str, scenarios.Obs] = {}
    keep: dict[str, scenarios.Keep] = {}
    start = time.monotonic()
    try:
        scenarios.run_stage(stage, DEVICE, selected, observed, keep)
    except Exception:
        # run_stage records a scenario's own failure; this is a harness bug.
        traceback.print_exc()
        observed["_harness"] = {"error": traceback.format_exc()}
    elapsed = time.monotonic() - start
    out = job / f"stage{stage}.json"
    out.write_text(json.dumps({"seconds": elapsed, "observed": observed}, indent=1))
    kept = [s for sessions in keep.values() for s in sessions]
    print(
        f"vm_stage: stage {stage}: {len(observed)} scenarios in {elapsed:.3f} s, "
        f"{len(kept)} sessions held across the kexec -> {out}",
        flush=True,
    )
    hold(kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
