"""A client process of the stress tests (spawned with the device path and a mode).

``python _worker.py PATH hold WID N``: wait for ``go`` on stdin, open the
device with ``open_device(timeout=30)`` (EBUSY retried), create N sessions
named ``w{WID}-{i}``, close the device, preserve one memfd in each session,
print the names (one line, space separated) and keep everything open until
stdin says ``exit`` (or closes).

``python _worker.py PATH churn WID``: create/preserve/close sessions in a loop
forever, printing ``looping`` once started (the test SIGKILLs it).

``python _worker.py PATH flood WID``: send CREATE_SESSION requests without
reading any reply until the socket is full, print ``flooded``, then exit.
"""

from __future__ import annotations

import os
import socket
import sys

import liveupdate
from liveupdate import uapi, wire


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("stress", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def hold(path: str, wid: str, count: int) -> None:
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    with liveupdate.open_device(path, timeout=30) as dev:
        sessions = [dev.create_session(f"w{wid}-{i}") for i in range(count)]
    for i, session in enumerate(sessions):
        fd = _memfd(b"worker %s file %d" % (wid.encode(), i))
        session.preserve(fd, i)
        os.close(fd)
    print(" ".join(s.name for s in sessions), flush=True)
    sys.stdin.readline()  # "exit" or EOF
    for session in sessions:
        session.close()


def churn(path: str, wid: str) -> None:
    with liveupdate.open_device(path, timeout=30) as dev:
        n = 0
        while True:
            with dev.create_session(f"churn{wid}-{n}") as session:
                fd = _memfd(b"churn")
                session.preserve(fd, n)
                os.close(fd)
            n += 1
            if n == 20:
                print("looping", flush=True)


def flood(path: str, wid: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(path)
    assert wire.decode_hello(sock.recv(64)) == 0
    sock.setblocking(False)
    n = 0
    try:
        while n < 100000:
            arg = uapi.liveupdate_ioctl_create_session(size=72, fd=-1)
            raw = f"flood{wid}-{n}".encode()
            arg.name[: len(raw)] = raw  # type: ignore[index]
            sock.send(wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, bytes(arg)))
            n += 1
    except BlockingIOError:
        pass
    print(f"flooded {n}", flush=True)
    os._exit(0)  # no cleanup: the process just goes


def main() -> None:
    path, mode, wid = sys.argv[1:4]
    if mode == "hold":
        hold(path, wid, int(sys.argv[4]))
    elif mode == "churn":
        churn(path, wid)
    elif mode == "flood":
        flood(path, wid)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
