"""Another process using the client library, driven line by line over stdin.

Run as ``python _peer.py DEVICE``. Commands (one per line), answers on stdout:

* ``open``  -> ``0`` or the errno of ``open_device(DEVICE, timeout=0)``;
* ``close`` -> ``0`` after closing the device (``-1`` when it was not open);
* ``exit``  -> the process ends.

The device fd is close-on-exec and the process is spawned (not forked), so it
never shares an open file with the test process.
"""

from __future__ import annotations

import sys

import liveupdate


def main() -> None:
    path = sys.argv[1]
    dev: liveupdate.Device | None = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "open":
            try:
                dev = liveupdate.open_device(path, timeout=0)
                answer = 0
            except OSError as exc:
                answer = exc.errno or -1
        elif cmd == "close":
            answer = -1 if dev is None else 0
            if dev is not None:
                dev.close()
                dev = None
        elif cmd == "exit":
            break
        else:
            answer = -2
        print(answer, flush=True)
    if dev is not None:
        dev.close()


if __name__ == "__main__":
    main()
