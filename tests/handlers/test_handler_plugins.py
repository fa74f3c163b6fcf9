"""Third-party handlers: entry points ``liveupdate.handlers``, for real.

The example of ``examples/handler-plugin`` is laid out as an installed
distribution (module plus ``*.dist-info`` with its ``entry_points.txt``) in a
temporary directory and put on luod's ``PYTHONPATH``: luod loads it through
``importlib.metadata`` exactly as it would after ``pip install``.

In-process tests cover the loader's rules (order, factories, broken plugins)
with throw-away distributions on ``sys.path``.
"""

from __future__ import annotations

import importlib
import logging
import os
import stat
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from handlerlib import (
    LiveSession,
    luoctl,
    read_exactly,
    state,
    timerfd,
    timerfd_interval_ns,
)

from liveupdate.core.handlers import (
    ENTRY_POINT_GROUP,
    default_registry,
    describe_data,
    load_plugins,
)
from luodtest import events

BUILTINS = ["memfd-v1", "socket-v1", "pipe-v1", "eventfd-v1", "file-v1", "pty-v1", "pidfd-v1"]


def _held_links(pid: int) -> list[str]:
    links = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except OSError:
            pass
    return links


@pytest.mark.luod_only
def test_plugin_handler_preserves_timerfds_across_a_reboot(
    luod_factory: Callable[..., Any],
    live_factory: Callable[..., LiveSession],
    plugin_site: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = luod_factory(env={"PYTHONPATH": str(plugin_site)})
    # The loader says what it added.
    assert events(daemon, "handler-plugin-loaded", compatible="timerfd-v1")
    live = live_factory(daemon)
    live.preserve(timerfd(20_000_000), 0x7F)

    live.reboot()

    fd = live.retrieve(0x7F)
    assert timerfd_interval_ns(fd) == 20_000_000
    expirations = int.from_bytes(read_exactly(fd, 8), sys.byteorder)
    assert expirations >= 1  # still armed, still counting
    # The data the plugin wrote, decoded by the plugin itself.
    monkeypatch.syspath_prepend(str(plugin_site))
    plugin = importlib.import_module("luo_timerfd")
    image = (daemon.state_dir / "last-handover.dtb").read_bytes()
    from liveupdate.handover_codec import decode_image

    record = decode_image(image).sessions[0].files[0]
    assert record.compatible == "timerfd-v1"
    data = plugin.TimerfdHandler.describe_data(record.data)
    assert data["clockid"] == 1 and data["interval"] == [0, 20_000_000]
    # luod's own registry without the plugin cannot decode it.
    assert describe_data("timerfd-v1", record.data, default_registry(plugins=False)) is None


@pytest.mark.luod_only
def test_preflight_fails_when_the_next_luod_lacks_the_plugin(
    luod_factory: Callable[..., Any],
    live_factory: Callable[..., LiveSession],
    plugin_site: Path,
    tmp_path: Path,
) -> None:
    # The "installed" luod that would run next: same code, no plugin.
    next_luod = tmp_path / "luod-without-plugin"
    next_luod.write_text(
        f'#!/bin/sh\nexec env -u PYTHONPATH "{sys.executable}" -m liveupdate.server.luod "$@"\n'
    )
    next_luod.chmod(next_luod.stat().st_mode | stat.S_IXUSR)
    daemon = luod_factory("--exec", str(next_luod), env={"PYTHONPATH": str(plugin_site)})
    live = live_factory(daemon)
    live.preserve(timerfd(10**9), 0x1)
    memfd = os.memfd_create("kept")
    os.write(memfd, b"still here")
    live.preserve(memfd, 0x2)
    before = state(daemon)

    for command in ("prepare", "reboot"):
        proc = luoctl(daemon, command, check=False)
        assert proc.returncode != 0, proc.stdout
        message = " ".join(proc.stderr.split())  # luoctl wraps long lines
        assert "handler(s) timerfd-v1 unknown" in message, proc.stderr

    after = state(daemon)
    assert after["state"] == "normal"
    assert after["generation"] == before["generation"]
    assert after["preserved_files"] == 2 and after["outgoing_sessions"] == 1
    assert "timerfd-v1" in after["last_error"]
    assert events(daemon, "preflight-failed")
    # Everything is still held: the session answers, luod keeps both files.
    assert live.outgoing.get_name() == b"handler-test"
    links = _held_links(daemon.pid)
    assert "anon_inode:[timerfd]" in links
    assert any(link.startswith("/memfd:kept") for link in links)

    # Installing the plugin where the next luod runs fixes the pre-flight.
    next_luod.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m liveupdate.server.luod "$@"\n')
    luoctl(daemon, "prepare")
    assert state(daemon)["state"] == "prepared"


# -- the loader, in process ------------------------------------------------------------


def _distribution(site: Path, name: str, modules: dict[str, str], entry_points: str) -> None:
    """Write an "installed" distribution ``name`` with ``modules`` into ``site``."""
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\n" + textwrap.dedent(entry_points)
    )


_HANDLER = """
    import os
    from liveupdate.core.file import FileHandler

    class Handler(FileHandler):
        compatible = "{compatible}"

        def can_preserve(self, fd: int, st: os.stat_result) -> bool:
            return False

    def factory():
        return Handler()

    instance = Handler()
"""


def test_plugins_load_in_name_order_and_broken_ones_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    good, other, bad = f"good_{tag}", f"other_{tag}", f"bad_{tag}"
    _distribution(
        tmp_path,
        f"plugins_{tag}",
        {
            good: _HANDLER.format(compatible="zzz-v1"),
            other: _HANDLER.format(compatible="aaa-v1"),
            bad: """
                import os
                from liveupdate.core.file import FileHandler

                class Abstract(FileHandler):
                    compatible = "abstract-v1"

                class Duplicate(FileHandler):
                    compatible = "pipe-v1"

                    def can_preserve(self, fd: int, st: os.stat_result) -> bool:
                        return True

                def not_a_handler():
                    return 42

                def explodes():
                    raise RuntimeError("plugin bug")

                class NotAHandler:
                    pass
            """,
        },
        f"""
        b-first = {good}:Handler
        a-class = {other}:Handler
        c-factory = {good}:factory
        d-instance = {other}:instance
        e-missing-module = no_such_module_{tag}:Handler
        f-missing-attr = {good}:Nope
        g-abstract = {bad}:Abstract
        h-duplicate = {bad}:Duplicate
        i-not-a-handler = {bad}:not_a_handler
        j-explodes = {bad}:explodes
        k-plain-class = {bad}:NotAHandler
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.INFO, logger="liveupdate"):
        registry = default_registry()
    # Built-ins first, then plugins by entry-point name: a-class (aaa-v1) before
    # b-first (zzz-v1); c-factory and d-instance repeat a compatible and are skipped.
    assert registry.compatibles == [*BUILTINS, "aaa-v1", "zzz-v1"]
    skipped = [r for r in caplog.records if r.getMessage() == "handler-plugin-skipped"]
    assert all(r.levelno == logging.ERROR for r in skipped)
    errors = [r.fields["entry_point"] for r in skipped]
    for name in (
        "c-factory",
        "d-instance",
        "e-missing-module",
        "f-missing-attr",
        "g-abstract",
        "h-duplicate",
        "i-not-a-handler",
        "j-explodes",
        "k-plain-class",
    ):
        assert errors.count(name) == 1, (name, errors)
    assert any("plugin bug" in r.fields["error"] for r in skipped)
    loaded = [r.fields for r in caplog.records if r.getMessage() == "handler-plugin-loaded"]
    assert [(f["entry_point"], f["compatible"]) for f in loaded] == [
        ("a-class", "aaa-v1"),
        ("b-first", "zzz-v1"),
    ]


def test_plugin_factories_and_instances_are_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tag = uuid.uuid4().hex[:8]
    _distribution(
        tmp_path,
        f"factories_{tag}",
        {
            f"f_{tag}": _HANDLER.format(compatible="from-factory-v1"),
            f"i_{tag}": _HANDLER.format(compatible="from-instance-v1"),
        },
        f"""
        one = f_{tag}:factory
        two = i_{tag}:instance
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = default_registry(plugins=False)
    assert load_plugins(registry) == ["from-factory-v1", "from-instance-v1"]
    assert registry.compatibles[-2:] == ["from-factory-v1", "from-instance-v1"]


def test_the_example_plugin_loads_through_its_entry_point(
    plugin_site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(plugin_site))
    registry = default_registry()
    assert registry.compatibles == [*BUILTINS, "timerfd-v1"]
    fd = timerfd(5_000_000)
    try:
        handler = registry.find(fd, os.fstat(fd))
        assert handler.compatible == "timerfd-v1"
    finally:
        os.close(fd)


def test_without_plugins_only_builtins() -> None:
    assert default_registry(plugins=False).compatibles == BUILTINS
