"""The client library: one API over luod's socket or a kernel's /dev/liveupdate."""

from liveupdate.client.device import Device, Session, open_device
from liveupdate.client.errors import *  # noqa: F403
from liveupdate.client.errors import __all__ as _errors_all
from liveupdate.client.listing import FileInfo, ServiceInfo, SessionInfo, SessionListing

__all__ = [
    "Device",
    "FileInfo",
    "ServiceInfo",
    "Session",
    "SessionInfo",
    "SessionListing",
    "open_device",
    *_errors_all,
]
