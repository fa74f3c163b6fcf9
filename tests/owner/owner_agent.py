"""A client of luod run under another uid, driven by JSON lines on stdin.

Run as ``python3 owner_agent.py DEVICE CHANNEL_FD`` (``tests/test_owner_checks.py``
starts it through ``setpriv`` with a copy of the client library on
``PYTHONPATH``). It needs only the standard library and ``liveupdate``'s
client. Each request is one JSON object ``{"op": ..., ...}``; each answer is
one JSON line: ``{"ok": true, ...}`` or ``{"ok": false, "errno": "EACCES",
"error": "PermissionDeniedError"}``. Sessions stay open in this process,
under a key (their name unless told otherwise), until ``close`` or ``exit``.

``CHANNEL_FD`` is an inherited ``AF_UNIX`` stream socket on which ``send``
and ``recv`` pass session fds (``SCM_RIGHTS``) to and from the test.

Ops: ``whoami``, ``create`` (name, data, token), ``update``, ``set_flags``
(flags), ``keep_on_close``, ``get_name``, ``retrieve`` (name, token, key),
``finish``, ``close``, ``list`` (name), ``send``, ``recv`` (key), ``preserve``
(name, token, size), ``unpreserve`` (name, token), ``event`` (event),
``state``, ``exit``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from typing import Any

import liveupdate
from liveupdate import uapi

_READ_MAX = 1 << 16


class Agent:
    def __init__(self, device: str, channel_fd: int) -> None:
        self.device = device
        self.channel = socket.socket(fileno=channel_fd)
        self.sessions: dict[str, liveupdate.Session] = {}

    def _open(self) -> liveupdate.Device:
        # One opener at a time: the device is closed after every request.
        return liveupdate.open_device(self.device, timeout=10.0)

    def op_whoami(self) -> dict[str, Any]:
        return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "pid": os.getpid()}

    def op_create(self, name: str, data: str | None = None, token: int = 1) -> dict[str, Any]:
        with self._open() as dev:
            session = dev.create_session(name)
        self.sessions[name] = session
        if data is not None:
            mfd = os.memfd_create(f"owner-{name}")
            try:
                os.write(mfd, data.encode())
                session.preserve(mfd, token)
            finally:
                os.close(mfd)
        return {}

    def op_update(self, name: str) -> dict[str, Any]:
        self.sessions[name].update()
        return {}

    def op_set_flags(self, name: str, flags: int) -> dict[str, Any]:
        return {"old_flags": self.sessions[name].set_flags(flags)}

    def op_keep_on_close(self, name: str) -> dict[str, Any]:
        self.sessions[name].keep_on_close()
        return {}

    def op_get_name(self, name: str) -> dict[str, Any]:
        return {"name": self.sessions[name].get_name().decode()}

    def op_retrieve(
        self, name: str, token: int | None = None, key: str | None = None
    ) -> dict[str, Any]:
        with self._open() as dev:
            session = dev.retrieve_session(name)
        self.sessions[key or name] = session
        if token is None:
            return {}
        fd = session.retrieve(token)
        try:
            return {"data": os.pread(fd, _READ_MAX, 0).decode()}
        finally:
            os.close(fd)

    def op_finish(self, name: str) -> dict[str, Any]:
        self.sessions[name].finish()
        return {}

    def op_close(self, name: str) -> dict[str, Any]:
        self.sessions.pop(name).close()
        return {}

    def op_list(self, name: str | None = None) -> dict[str, Any]:
        with self._open() as dev:
            listing = dev.list_sessions(name, files=False)
        sessions = [
            {"name": s.name, "uid": s.uid, "direction": s.direction.name.lower()}
            for s in listing.sessions
        ]
        return {"sessions": sessions, "hidden": listing.hidden, "generation": listing.generation}

    def op_preserve(self, name: str, token: int, size: int = 0) -> dict[str, Any]:
        """A new memfd of ``size`` bytes into the open session ``name``."""
        mfd = os.memfd_create(f"owner-{name}-{token}")
        try:
            os.ftruncate(mfd, size)
            self.sessions[name].preserve(mfd, token)
        finally:
            os.close(mfd)
        return {}

    def op_unpreserve(self, name: str, token: int) -> dict[str, Any]:
        self.sessions[name].unpreserve(token)
        return {}

    def op_event(self, event: str) -> dict[str, Any]:
        """SET_EVENT ``event`` (prepare, cancel, reboot, finish) on a fresh device fd."""
        with self._open() as dev:
            return {"generation": dev.set_event(uapi.LuodEvent[event.upper()])}

    def op_state(self) -> dict[str, Any]:
        with self._open() as dev:
            info = dev.get_state()
        return {"state": info.state.name.lower(), "generation": info.generation}

    def op_send(self, name: str) -> dict[str, Any]:
        socket.send_fds(self.channel, [b"S"], [self.sessions[name].fileno()])
        return {}

    def op_recv(self, key: str) -> dict[str, Any]:
        _msg, fds, _flags, _addr = socket.recv_fds(self.channel, 1, 1)
        if len(fds) != 1:
            raise RuntimeError(f"expected one fd, got {fds}")
        self.sessions[key] = liveupdate.Session.from_fd(fds[0])
        return {}


def main() -> None:
    agent = Agent(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        if op == "exit":
            break
        try:
            answer = {"ok": True, **getattr(agent, f"op_{op}")(**request)}
        except OSError as exc:
            code = exc.errno or 0
            answer = {
                "ok": False,
                "errno": errno.errorcode.get(code, str(code)),
                "error": type(exc).__name__,
                "message": str(exc),
            }
        print(json.dumps(answer), flush=True)
    for session in agent.sessions.values():
        session.close()


if __name__ == "__main__":
    main()
