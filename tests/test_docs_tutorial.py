"""The upgrade tutorial's service code, run as the page tells, upgraded under a client's nose.

``docs/guides/tutorial-upgrade.md`` shows one ``python`` block: the whole
service. It is extracted verbatim, run under ``luoctl run`` against a real
luod, and upgraded to ``v2`` (the page's edit, ``VERSION = b"v2"``) with
``luoctl update`` while one client sends lines back to back and another
holds an idle connection. Nothing may drop: every line gets its answer, in
order, ``v1`` ones then ``v2`` ones, and the idle connection is served by
``v2`` afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from luodtest import LUOCTL, Luod, luoctl, wait_for

pytestmark = pytest.mark.luod_only

PAGE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "tutorial-upgrade.md"
_PYTHON_RE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def tutorial_code() -> str:
    (code,) = _PYTHON_RE.findall(PAGE.read_text(encoding="utf-8"))
    return code


def test_the_tutorial_service_is_about_thirty_lines_and_opts_in() -> None:
    code = tutorial_code()
    lines = [ln for ln in code.splitlines() if ln.strip()]
    assert len(lines) <= 45, len(lines)
    for needle in ('VERSION = b"v1"', "svc.freeze_fd()", "svc.restore()", "svc.frozen()"):
        assert needle in code


class Talker(threading.Thread):
    """Sends numbered lines back to back; every answer must be the line in upper case."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.answers: list[tuple[bytes, int]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        reader = self.sock.makefile("rb")
        try:
            n = 0
            while not self.stop.is_set():
                self.sock.sendall(b"line %d\n" % n)
                answer = reader.readline()
                if not answer.endswith(b"\n"):
                    raise ConnectionError(f"connection dropped after {n} answers")
                version, text = answer.rstrip(b"\n").split(b" ", 1)
                if text != b"LINE %d" % n:
                    raise ValueError(f"{answer!r} for line {n}")
                self.answers.append((version, n))
                n += 1
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_the_tutorial_service_upgrades_without_dropping_a_connection(
    luod: Luod, tmp_path: Path
) -> None:
    code = tutorial_code()
    service = tmp_path / "upper.py"
    service.write_text(code)
    log = tmp_path / "run.log"
    with open(log, "wb") as out:
        run = subprocess.Popen(
            [*LUOCTL, "--socket", luod.socket, "run", "--session", "upper",
             "--", sys.executable, str(service), "0"],
            stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip
    try:
        port_re = re.compile(r"^v1 serving on port (\d+)$", re.MULTILINE)
        wait_for(lambda: port_re.search(log.read_text()), f"not serving:\n{log.read_text()}")
        match = port_re.search(log.read_text())
        assert match is not None
        port = int(match.group(1))
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)
        talker = Talker(port)
        talker.start()
        wait_for(lambda: len(talker.answers) > 20, "no answers before the upgrade")

        service.write_text(code.replace('VERSION = b"v1"', 'VERSION = b"v2"'))
        result = luoctl(luod.socket, "update", "upper", timeout=60)
        assert result.returncode == 0, result.stderr + log.read_text()
        assert "took over" in result.stdout
        wait_for(
            lambda: talker.answers and talker.answers[-1][0] == b"v2",
            "no answer from v2",
        )
        count = len(talker.answers)
        wait_for(lambda: len(talker.answers) > count + 20, "v2 stopped answering")
        talker.stop.set()
        talker.join(30)
        assert talker.error is None, talker.error

        idle.sendall(b"still here\n")
        assert idle.makefile("rb").readline() == b"v2 STILL HERE\n"
        idle.close()
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
            try:
                run.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    # Every line answered once, in order; v1 then v2, never back.
    assert [n for _v, n in talker.answers] == list(range(len(talker.answers)))
    versions = [v for v, _n in talker.answers]
    switch = versions.index(b"v2")
    assert set(versions[:switch]) == {b"v1"} and set(versions[switch:]) == {b"v2"}
    assert "(prestarted)" in log.read_text()  # the new version started first
