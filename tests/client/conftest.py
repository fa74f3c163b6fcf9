"""Fixtures of the client library's tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from scripted_server import Answer, ScriptedServer


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def make(hello: bytes | None, answer: Answer | None = None) -> ScriptedServer:
        server = ScriptedServer(tmp_path / f"scripted{len(servers)}", hello, answer)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
