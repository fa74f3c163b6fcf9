"""Where the device lives: shared by the daemon and the client library."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = [
    "CONTROL_NAME",
    "DEVICE_ENV",
    "KERNEL_DEVICE",
    "SYSTEM_SOCKET",
    "control_path_for",
    "default_socket_path",
    "resolve_device",
]

#: The environment variable naming the device (a socket or a character device).
DEVICE_ENV = "LIVEUPDATE_DEVICE"
#: The real kernel's device node.
KERNEL_DEVICE = "/dev/liveupdate"
#: luod's socket when it runs as root (``wire.md``).
SYSTEM_SOCKET = "/run/liveupdate/device"
#: The control socket's name, next to the device socket (``luod --control-socket``).
CONTROL_NAME = "control"


def default_socket_path() -> str:
    """luod's default socket: the system path for root, else one needing no root.

    A user's daemon lives under ``$XDG_RUNTIME_DIR/liveupdate/device`` (or
    ``/tmp/liveupdate-UID/liveupdate/device`` without it), so starting it needs no
    privilege and never collides with the system daemon.
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path(f"/tmp/liveupdate-{os.geteuid()}")
    return str(base / "liveupdate" / "device")


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def resolve_device(path: str | os.PathLike[str] | None = None) -> str:
    """The device to open: ``path``, else ``$LIVEUPDATE_DEVICE``, else a real
    ``/dev/liveupdate`` when it exists, else luod's default socket."""
    if path is not None:
        return os.fspath(path)
    env = os.environ.get(DEVICE_ENV)
    if env:
        return env
    if _is_char_device(KERNEL_DEVICE):
        return KERNEL_DEVICE
    return default_socket_path()


def control_path_for(device_path: str) -> str:
    """luod's control socket by default: ``control`` next to the device socket."""
    return os.path.join(os.path.dirname(os.path.abspath(device_path)), CONTROL_NAME)
