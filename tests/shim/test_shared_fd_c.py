"""Eight C processes sharing one session fd under the shim: every reply to its caller.

``shared_fd.c`` runs forked children, exec'd children (which know nothing
of the parent), a child with four threads, and the parent, all calling on
one session fd at once; each checks that every answer is its own. Without
channels (wire 1.1) replies go to whichever process reads first, and the
program reports the first mix-up.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import liveupdate
from luodtest import Luod, copies_settled, fds_settle

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).parent


def test_eight_c_processes_on_one_session_fd_each_get_their_own_replies(
    luod: Luod, build_c: Callable[[Path], Path], shim_env: dict[str, str]
) -> None:
    program = build_c(HERE / "shared_fd.c")
    with liveupdate.open_device(luod.socket) as dev:
        copies_settled(dev)
        baseline = luod.fd_count() - 1  # without this device connection
    proc = subprocess.run(
        [str(program), "8", "1000"], env=shim_env, capture_output=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"ok 8 1000\n"
    # Every channel, the device and the session ended with their processes.
    fds_settle(luod, baseline)
