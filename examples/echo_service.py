#!/usr/bin/env python3
"""A line echo server whose listener and connections survive updates and crashes.

Run it under ``luoctl run --session echo --keep-on-close -- python echo_service.py PORT``.
It keeps its listening socket under token 1 and every client connection under
its own token in the session it inherits, so the next instance (after
``luoctl update echo``, or after a crash) takes them over: clients keep their
connections and nothing they sent is lost.

Crash safety of the data: a chunk is only consumed from the socket (``recv``)
after its echo was sent (it is first read with ``MSG_PEEK``), so a crash at
any point can repeat an echo but never lose one.

Updates are pre-started: the service watches ``svc.freeze_fd()``, so
``luoctl update echo`` starts the next instance first (it waits in
``svc.restore()`` until the hand-over) and asks this one to freeze only once
that one is ready. Freezing is immediate here: every echo is finished before
the loop turns, and every connection is already in the session.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys

import liveupdate

LISTENER = 1


def main() -> int:
    svc = liveupdate.inherited_session()
    if svc is None:
        print("echo_service: run me under `luoctl run`", file=sys.stderr)
        return 2
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    fds = svc.restore()
    if LISTENER in fds:
        listener = socket.socket(fileno=fds.pop(LISTENER))
    else:
        listener = socket.create_server(("127.0.0.1", port), backlog=512)
        svc.preserve(listener, LISTENER)
    port_file = os.environ.get("ECHO_PORT_FILE")
    if port_file:
        with open(port_file + ".tmp", "w") as f:
            f.write(str(listener.getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
    conns = {token: socket.socket(fileno=fd) for token, fd in fds.items()}
    next_token = max([LISTENER, *conns]) + 1

    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    # Opting in to pre-started updates: readable when asked to freeze.
    sel.register(svc.freeze_fd(), selectors.EVENT_READ, "freeze")
    for token, conn in conns.items():
        sel.register(conn, selectors.EVENT_READ, token)
    print(f"echo_service pid {os.getpid()}: {svc.state}, {len(conns)} connections", flush=True)
    while not stopping:
        for key, _mask in sel.select(timeout=0.2):
            if key.data == "freeze" and svc.freeze_requested():
                # Nothing in flight, everything preserved: hand over and go.
                svc.frozen()
                return 0
            if key.data == "freeze":
                continue
            if key.data is None:
                try:
                    conn, _addr = listener.accept()
                except BlockingIOError:
                    continue
                token, next_token = next_token, next_token + 1
                # svc.preserve, not svc.outgoing.preserve: it follows luod
                # across its live updates and restarts (with the supervisor).
                svc.preserve(conn, token)
                conns[token] = conn
                sel.register(conn, selectors.EVENT_READ, token)
                continue
            token = key.data
            conn = conns[token]
            data = conn.recv(65536, socket.MSG_PEEK)
            if not data:
                sel.unregister(conn)
                svc.unpreserve(token)  # out of the session first, then closed
                conn.close()
                del conns[token]
                continue
            conn.sendall(data)
            conn.recv(len(data))  # consumed only once echoed
    return 0


if __name__ == "__main__":
    sys.exit(main())
