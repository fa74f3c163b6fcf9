"""The control socket keeps the device's policy (issue 11, item 5).

A control connection is judged by its ``SO_PEERCRED`` exactly as a device
connection is (docs/security.md, "Who may do what"): anyone it admits reads
the state and lists its own sessions (the others counted as hidden);
PREPARE, CANCEL and REBOOT are root's, luod's user's and ``--admin-group``'s
(``EACCES`` otherwise, changing nothing); an unprivileged FINISH finishes
the caller's own incoming sessions only. Clients run as other uids through
``setpriv``, like ``test_owner_policy.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_owner_policy import ADMIN_GID, PYTHON, UID_ADMIN, handed_over, sessions, state
from test_owner_policy import lib_fixture as lib_fixture
from test_owner_policy import start_luod_fixture as start_luod_fixture

import liveupdate
from liveupdate import uapi
from luodtest import Luod
from test_owner_checks import SETPRIV, UID_A, UID_B

pytestmark = [
    pytest.mark.luod_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids"),
    pytest.mark.skipif(SETPRIV is None, reason="needs setpriv (util-linux) to switch uids"),
]

#: Run as another uid: its own session on the device (kept by UPDATE), then
#: every control call, each answer or errno printed as one JSON object.
_CLIENT = """
import json, sys
import liveupdate
from liveupdate import uapi
from liveupdate.client.control import open_control
device, control_path, mine = sys.argv[1:4]
out = {}
with liveupdate.open_device(device, timeout=10) as dev:
    s = dev.create_session(mine)
s.update()
with open_control(control_path) as control:
    out["state"] = control.get_state().state.name.lower()
    listing = control.list_sessions()
    out["listed"] = [x.name for x in listing.sessions]
    out["hidden"] = listing.hidden
    for name in ("prepare", "cancel", "reboot", "finish"):
        try:
            control.set_event(uapi.LuodEvent[name.upper()])
            out[name] = "ok"
        except liveupdate.LiveUpdateError as exc:
            out[name] = exc.errno
print(json.dumps(out))
"""


def as_uid(lib: Path, daemon: Luod, uid: int, name: str, groups: tuple[int, ...] = ()) -> dict:
    assert SETPRIV is not None
    groups_arg = ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    result = subprocess.run(
        [SETPRIV, "--reuid", str(uid), "--regid", str(uid), *groups_arg, PYTHON, "-c", _CLIENT,
         daemon.socket, str(Path(daemon.socket).parent / "control"), name],
        capture_output=True, text=True, timeout=60, cwd=lib, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(lib), "PYTHONDONTWRITEBYTECODE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + daemon.log_text()[-2000:]
    answer: dict = json.loads(result.stdout)
    return answer


def test_state_events_on_the_control_socket_from_another_uid_are_refused(
    start_luod: Callable[..., Luod], lib: Path
) -> None:
    daemon = start_luod("--control-socket-mode", "0666")
    handed_over(daemon, "root-held", b"root's state")
    before = state(daemon)
    answer = as_uid(lib, daemon, UID_B, "b-held")
    assert answer["state"] == "updated"
    for name in ("prepare", "cancel", "reboot"):
        assert answer[name] == 13, name  # EACCES
    # FINISH finished B's own incoming session only.
    assert answer["finish"] == "ok"
    assert sessions(daemon) == {"root-held": (0, "incoming")}
    after = state(daemon)
    assert (after.state, after.generation, after.last_error) == (
        before.state, before.generation, before.last_error
    )  # fmt: skip
    # B listed its own session (before its FINISH) and root's as hidden.
    assert answer["listed"] == ["b-held"] and answer["hidden"] == 1


def test_admin_group_may_prepare_through_the_control_socket(
    start_luod: Callable[..., Luod], lib: Path
) -> None:
    daemon = start_luod("--control-socket-mode", "0666", "--admin-group", str(ADMIN_GID))
    answer = as_uid(lib, daemon, UID_ADMIN, "admin-held", groups=(ADMIN_GID,))
    # PREPARE, CANCEL, then a REBOOT that runs: a member of the admin group
    # drives the state machine through the control socket like root.
    assert (answer["prepare"], answer["cancel"], answer["reboot"]) == ("ok", "ok", "ok"), answer
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with liveupdate.open_device(daemon.socket, timeout=5) as dev:
                if dev.get_state().generation == 2:
                    return
        except liveupdate.LiveUpdateError:
            pass
        time.sleep(0.05)
    raise AssertionError("the admin's reboot did not bring generation 2")


def test_control_socket_mode_0600_keeps_other_uids_out(
    start_luod: Callable[..., Luod], lib: Path
) -> None:
    daemon = start_luod()  # the device is 0666, the control socket keeps its 0600
    with pytest.raises(AssertionError, match=r"EACCES|Permission denied|PermissionDenied"):
        as_uid(lib, daemon, UID_A, "a-held")
    assert uapi.LuodState(state(daemon).state) == uapi.LuodState.UPDATED
