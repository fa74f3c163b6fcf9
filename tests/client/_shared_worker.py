"""One of many processes calling on one shared session fd (imported, or run as a script).

Each call's answer must be the answer to *this* process's request: SYNC
echoes a cookie made of the process's index and the call's number, GET_NAME
the session's name, PRESERVE_FD + UNPRESERVE_FD a token only this process
uses, and RETRIEVE_FD on an outgoing session fails with this call's EINVAL.
A reply taken from another process shows as a wrong cookie, a wrong name, a
wrong errno or a token that is not there.

As a script: ``_shared_worker.py FD INDEX CALLS`` adopts the inherited fd
with :meth:`liveupdate.Session.from_fd` (the exec'd case) and exits 0 when
every answer was its own, 1 with the first mix-up on stderr.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

import liveupdate
from liveupdate import uapi


def hammer(session: liveupdate.Session, index: int, calls: int, name: bytes) -> str | None:
    """Make ``calls`` calls on ``session``; the first mix-up seen, or None."""
    memfd = os.memfd_create("shared-worker", os.MFD_CLOEXEC)
    try:
        for i in range(calls):
            cookie = (index << 32) | i
            arg = uapi.luod_session_sync(size=ctypes.sizeof(uapi.luod_session_sync), cookie=cookie)
            session.ioctl(uapi.LUOD_SESSION_SYNC, arg)
            if arg.cookie != cookie:
                return f"call {i}: SYNC cookie {arg.cookie:#x}, sent {cookie:#x}"
            if i % 5 == 1 and session.get_name() != name:
                return f"call {i}: GET_NAME answered another name"
            if i % 10 == 2:
                token = (index << 32) | i
                session.preserve(memfd, token)
                session.unpreserve(token)
            if i % 7 == 3:
                try:
                    os.close(session.retrieve(1))
                except liveupdate.LiveUpdateError as exc:
                    if exc.errno != errno.EINVAL:
                        return f"call {i}: RETRIEVE_FD gave {errno.errorcode[exc.errno]}"
                else:
                    return f"call {i}: RETRIEVE_FD on an outgoing session succeeded"
    except liveupdate.LiveUpdateError as exc:
        return f"{exc}"
    finally:
        os.close(memfd)
    return None


def main() -> int:
    fd, index, calls = (int(a) for a in sys.argv[1:4])
    session = liveupdate.Session.from_fd(fd, uapi.SessionDirection.OUTGOING)
    problem = hammer(session, index, calls, session.get_name())
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
