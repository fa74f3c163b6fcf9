"""liveupdate: the Linux Live Update Orchestrator (LUO), in userspace.

``import liveupdate`` gives the client library: one API over two transports,
the daemon ``luod``'s Unix socket or a real kernel's ``/dev/liveupdate``::

    import liveupdate
    with liveupdate.open_device() as dev:
        session = dev.create_session("my-service")

See :func:`open_device`, :class:`Device` and :class:`Session`. The ABI itself
is in :mod:`liveupdate.uapi`.
"""

from liveupdate.client.device import Device, Session, StateInfo, open_device
from liveupdate.client.errors import (
    AlreadyExistsError,
    BadFileError,
    DeviceBusyError,
    InvalidArgumentError,
    LiveUpdateError,
    NoSpaceError,
    NotFoundError,
    NotSupportedError,
    OutOfResourcesError,
    PermissionDeniedError,
    RestoreFailedError,
    StaleGenerationError,
    StructTooBigError,
)
from liveupdate.client.service import InheritedSession, inherited_session

__version__ = "0.1.0"

__all__ = [
    "AlreadyExistsError",
    "BadFileError",
    "Device",
    "DeviceBusyError",
    "InheritedSession",
    "InvalidArgumentError",
    "LiveUpdateError",
    "NoSpaceError",
    "NotFoundError",
    "NotSupportedError",
    "OutOfResourcesError",
    "PermissionDeniedError",
    "RestoreFailedError",
    "Session",
    "StaleGenerationError",
    "StateInfo",
    "StructTooBigError",
    "inherited_session",
    "open_device",
]
