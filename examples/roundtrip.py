#!/usr/bin/env python3
"""Preserve a memfd, live-update luod, and read the memfd back: the README's round trip.

Run it with a luod running (``luod`` in another terminal, or ``./scripts/luod``)::

    .venv/bin/python examples/roundtrip.py            # $LIVEUPDATE_DEVICE or the default
    .venv/bin/python examples/roundtrip.py /tmp/lu/device

It does, in one process, what a service and an operator do around a live
update: create a session and preserve a memfd in it, ask luod to reboot itself
(``LUOD_IOCTL_SET_EVENT`` with ``REBOOT``: what ``luoctl reboot`` sends), wait
for the next generation to serve, then retrieve the session there, check the
memfd's bytes and finish the session. It exits 0 and prints what it saw, or
exits 1 with the error.
"""

from __future__ import annotations

import os
import sys
import time

import liveupdate
from liveupdate import uapi

NAME = "vm-memory"
TOKEN = 0x1A
CONTENT = b"hello liveupdate"


def wait_for_generation(path: str | None, generation: int, timeout: float = 60.0) -> None:
    """Open the device until ``generation`` (or a later one) answers.

    The reply to REBOOT comes from the old generation; the next one serves an
    instant later on the same socket (connection attempts wait meanwhile).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with liveupdate.open_device(path, timeout=5.0) as dev:
                if dev.get_state().generation >= generation:
                    return
        except liveupdate.StaleGenerationError:
            pass  # opened just before the old generation closed its connections
        if time.monotonic() > deadline:
            raise TimeoutError(f"generation {generation} did not start serving")
        time.sleep(0.01)


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else None

    # 1. A session, and a memfd preserved in it. Keep `session` open: closing
    #    an outgoing session before the reboot would release its files.
    with liveupdate.open_device(path, timeout=5.0) as dev:
        session = dev.create_session(NAME)
        generation = dev.get_state().generation
    mfd = os.memfd_create("guest-ram")
    os.write(mfd, CONTENT)
    session.preserve(mfd, token=TOKEN)  # luod holds its own reference now
    os.close(mfd)
    print(f"generation {generation}: preserved {CONTENT!r} as {NAME!r} token {TOKEN:#x}")

    # 2. The live update of luod, as `luoctl reboot` does it.
    with liveupdate.open_device(path, timeout=5.0) as dev:
        dev.set_event(uapi.LuodEvent.REBOOT)
    wait_for_generation(path, generation + 1)
    session.close()  # its fd belonged to the old generation (ENODEV from now on)

    # 3. In the next generation: retrieve, check, finish.
    with liveupdate.open_device(path, timeout=5.0) as dev:
        new_generation = dev.get_state().generation
        incoming = dev.retrieve_session(NAME)
    with incoming:
        fd = incoming.retrieve(TOKEN)
        data = os.pread(fd, 64, 0)
        os.close(fd)
        incoming.finish()
    print(f"generation {new_generation}: retrieved {data!r}")
    if data != CONTENT:
        print("roundtrip: content differs", file=sys.stderr)
        return 1
    print("round trip ok")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, TimeoutError) as exc:
        print(f"roundtrip: {exc}", file=sys.stderr)
        sys.exit(1)
