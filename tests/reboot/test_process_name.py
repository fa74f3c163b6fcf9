"""luod keeps its name across live updates: ``pgrep luod`` finds the generation serving.

Each generation is a new ``python`` process (the successor); luod names
itself with ``prctl(PR_SET_NAME)`` at the start of every generation, so
``/proc/PID/comm`` says ``luod`` whatever interpreter runs it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from luodtest import Luod, luoctl, luoctl_reboot

pytestmark = pytest.mark.luod_only


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_process_is_named_luod_at_a_cold_start(luod: Luod) -> None:
    assert comm(luod.pid) == "luod"


def test_process_is_still_named_luod_after_live_updates(luod: Luod) -> None:
    first = luod.pid
    luoctl_reboot(luod)  # cold: the successor starts inside the reboot
    assert luod.pid != first  # a new process serves: the successor
    assert comm(luod.pid) == "luod"
    assert luoctl(luod.socket, "prepare").returncode == 0
    luoctl_reboot(luod)  # prepared: the successor was waiting
    assert comm(luod.pid) == "luod"


def test_waiting_successor_is_named_luod(luod: Luod) -> None:
    assert luoctl(luod.socket, "prepare").returncode == 0
    serving = luod.pid
    children = Path(f"/proc/{serving}/task/{serving}/children").read_text().split()
    keepers = {str(pid) for pid in luod.keeper_pids()}  # named luo-keeper
    children = [child for child in children if child not in keepers]
    assert children, "PREPARE starts the successor as a child of the serving luod"
    assert [comm(int(child)) for child in children] == ["luod"] * len(children)
