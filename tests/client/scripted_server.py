"""A listener in the test process that answers like a broken, foreign or older server.

It speaks over a real ``SOCK_SEQPACKET`` socket: the client library under
test cannot tell it from luod until it answers. Received fds are closed at
once, as a luod that does not expect them would.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from liveupdate import wire

#: What the scripted server does with one request: reply bytes and fds to send.
Answer = Callable[[wire.Message], tuple[bytes, list[int]]]


class ScriptedServer:
    """A listener that sends ``hello`` to one client, then answers each request with ``answer``.

    ``hello=None``: close the connection at once, before any hello.
    """

    def __init__(self, path: Path, hello: bytes | None, answer: Answer | None = None) -> None:
        self.path = str(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.hello = hello
        self.answer = answer
        self.requests: list[wire.Message] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            if self.hello is None:
                return
            conn.send(self.hello)
            while True:
                msg = wire.recv_message(conn, 1 << 17)
                wire.close_fds(msg.fds)
                if msg.length == 0 or self.answer is None:
                    return
                self.requests.append(msg)
                reply, fds = self.answer(msg)
                wire.send_message(conn, reply, fds)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)
