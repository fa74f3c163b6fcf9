"""Which device the library opens when the caller names none.

The order (``paths.resolve_device``): the path given, else
``$LIVEUPDATE_DEVICE``, else a real ``/dev/liveupdate`` (a character device),
else luod's default socket: ``/run/liveupdate/device`` for root, under
``$XDG_RUNTIME_DIR`` (or ``/tmp/liveupdate-UID``) for anyone else.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import liveupdate
from liveupdate import paths
from luodtest import Luod

pytestmark = pytest.mark.luod_only

KERNEL_PRESENT = os.path.exists(paths.KERNEL_DEVICE) and stat.S_ISCHR(
    os.stat(paths.KERNEL_DEVICE).st_mode
)


def test_a_path_given_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DEVICE_ENV, "/from/the/environment")
    assert paths.resolve_device("/given") == "/given"
    assert paths.resolve_device(Path("/given/as/path")) == "/given/as/path"
    assert paths.resolve_device() == "/from/the/environment"


def test_an_empty_environment_variable_is_no_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DEVICE_ENV, "")
    expected = paths.KERNEL_DEVICE if KERNEL_PRESENT else paths.default_socket_path()
    assert paths.resolve_device() == expected


@pytest.mark.skipif(KERNEL_PRESENT, reason="a real /dev/liveupdate is present")
@pytest.mark.skipif(os.geteuid() != 0, reason="root's default socket")
def test_without_a_kernel_root_gets_the_system_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.DEVICE_ENV, raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/0")  # root ignores it
    assert paths.resolve_device() == paths.SYSTEM_SOCKET == "/run/liveupdate/device"


def test_open_device_follows_the_environment(luod: Luod, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DEVICE_ENV, luod.socket)
    with liveupdate.open_device() as dev:
        assert dev.path == luod.socket
        assert dev.transport.name == "socket"
        assert dev.get_state().generation == 1
