"""liveupdate: the Linux Live Update Orchestrator (LUO), in userspace.

``import liveupdate`` gives the client library: one API over two transports,
the daemon ``luod``'s Unix socket or a real kernel's ``/dev/liveupdate``::

    import liveupdate
    with liveupdate.open_device() as dev:
        session = dev.create_session("my-service")

See :func:`open_device`, :class:`Device` and :class:`Session`. The ABI itself
is in :mod:`liveupdate.uapi`.

The client names are loaded on first use, so that processes which only need
another part of the package (``luod`` re-executing during a live update,
above all) do not pay for importing the client library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from liveupdate.version import __version__ as __version__

#: Public name -> module that defines it.
_EXPORTS = {
    "Device": "liveupdate.client.device",
    "Session": "liveupdate.client.device",
    "StateInfo": "liveupdate.client.device",
    "open_device": "liveupdate.client.device",
    "FileInfo": "liveupdate.client.listing",
    "ServiceInfo": "liveupdate.client.listing",
    "SessionInfo": "liveupdate.client.listing",
    "SessionListing": "liveupdate.client.listing",
    "InheritedSession": "liveupdate.client.service",
    "Participant": "liveupdate.client.participant",
    "ParticipantClosedError": "liveupdate.client.participant",
    "ParticipantEvent": "liveupdate.client.participant",
    "ParticipantInfo": "liveupdate.client.listing",
    "register_participant": "liveupdate.client.participant",
    "inherited_session": "liveupdate.client.service",
    **{
        name: "liveupdate.client.errors"
        for name in (
            "AlreadyExistsError",
            "BadFileError",
            "DeviceBusyError",
            "InvalidArgumentError",
            "LiveUpdateError",
            "NoSpaceError",
            "NotFoundError",
            "NotSupportedError",
            "OutOfResourcesError",
            "OrchestratorIOError",
            "PermissionDeniedError",
            "StaleGenerationError",
            "StructTooBigError",
        )
    },
}

__all__ = [
    "AlreadyExistsError",
    "BadFileError",
    "Device",
    "DeviceBusyError",
    "FileInfo",
    "InheritedSession",
    "InvalidArgumentError",
    "LiveUpdateError",
    "NoSpaceError",
    "NotFoundError",
    "NotSupportedError",
    "OrchestratorIOError",
    "OutOfResourcesError",
    "Participant",
    "ParticipantClosedError",
    "ParticipantEvent",
    "ParticipantInfo",
    "PermissionDeniedError",
    "ServiceInfo",
    "Session",
    "SessionInfo",
    "SessionListing",
    "StaleGenerationError",
    "StateInfo",
    "StructTooBigError",
    "inherited_session",
    "open_device",
    "register_participant",
]

assert sorted(_EXPORTS) == __all__, "every export is listed once"


#: Old names, still importable (with a DeprecationWarning), from this module.
_DEPRECATED = {"RestoreFailedError": "liveupdate.client.errors"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        return getattr(importlib.import_module(_DEPRECATED[name]), name)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'liveupdate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
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
        OrchestratorIOError,
        OutOfResourcesError,
        PermissionDeniedError,
        StaleGenerationError,
        StructTooBigError,
    )
    from liveupdate.client.errors import RestoreFailedError as RestoreFailedError
    from liveupdate.client.listing import (
        FileInfo,
        ParticipantInfo,
        ServiceInfo,
        SessionInfo,
        SessionListing,
    )
    from liveupdate.client.participant import (
        Participant,
        ParticipantClosedError,
        ParticipantEvent,
        register_participant,
    )
    from liveupdate.client.service import InheritedSession, inherited_session
