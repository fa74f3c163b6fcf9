"""RETRIEVE_SESSION from a client whose own fd table is full.

The reply carries the session's fd; a client that cannot receive it must
fail with EMFILE before anything is lost, and may retry once it has room.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from luodtest import Luod, luoctl_reboot, preserved_session

pytestmark = pytest.mark.luod_only

_FULL_FD_TABLE_CHILD = textwrap.dedent(
    """
    import errno, os, resource, sys
    import liveupdate

    dev = liveupdate.open_device(sys.argv[1], timeout=5)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    try:
        dev.retrieve_session("full-table")
    except liveupdate.OutOfResourcesError as exc:
        print("first", exc.errno == errno.EMFILE, flush=True)
    except OSError as exc:
        print("first other", exc, flush=True)
    else:
        print("first succeeded", flush=True)
    for fd in filler:
        os.close(fd)
    session = dev.retrieve_session("full-table")
    fd = session.retrieve(1)
    print("second", os.pread(fd, 100, 0).decode(), flush=True)
    """
)


def test_retrieve_session_with_a_full_fd_table_fails_cleanly_and_can_be_retried(
    luod: Luod,
) -> None:
    """EMFILE, and the request was never sent: the session is retrieved on a retry.

    Broke once (review finding H3): with the caller's fd table full, the
    session's fd was lost on the way and the session was finished implicitly.
    """
    session = preserved_session(luod, "full-table", b"precious")
    luoctl_reboot(luod)
    session.close()

    child = subprocess.run(
        [sys.executable, "-c", _FULL_FD_TABLE_CHILD, luod.socket],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert child.returncode == 0, f"{child.stdout}\n{child.stderr}\n{luod.log_text()[-3000:]}"
    lines = child.stdout.splitlines()
    # EMFILE, and the request was never sent: no fd lost on the way, no
    # implicit FINISH of the session.
    assert lines == ["first True", "second precious"], child.stdout
