"""File handlers shipped with liveupdate, third-party handlers, and the default registry.

Built-in handlers, in the order they are asked (the first that accepts a
file preserves it):

==============  =========================================================
``memfd-v1``    unlinked shmem files (memfds)
``socket-v1``   TCP/UDP over IPv4/IPv6, Unix stream/dgram/seqpacket
``pipe-v1``     pipe ends and FIFOs
``eventfd-v1``  eventfds
``file-v1``     regular files and directories not taken by memfd
``pty-v1``      PTY masters
``pidfd-v1``    pidfds
==============  =========================================================

Third-party handlers come after them: every entry point of the group
``liveupdate.handlers`` names a :class:`~liveupdate.core.file.FileHandler`
subclass (or a callable returning a handler instance). They are loaded in
the order of their entry-point names; one that fails to load, is not a
handler or reuses a compatible string is logged on the
``liveupdate.handlers`` logger and skipped.

Finding them costs nothing when there are none: :mod:`importlib.metadata`
(about a fifth of everything luod imports, and each live update starts a
new luod) is imported only when some ``entry_points.txt`` on ``sys.path``
names the group (:func:`plugins_may_be_installed`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from liveupdate.core.file import FileHandler, HandlerRegistry
from liveupdate.core.handlers.eventfd import EventfdHandler
from liveupdate.core.handlers.file import RegularFileHandler
from liveupdate.core.handlers.memfd import MemfdHandler
from liveupdate.core.handlers.pidfd import PidfdHandler
from liveupdate.core.handlers.pipe import PipeHandler
from liveupdate.core.handlers.pty import PtyHandler
from liveupdate.core.handlers.socket import SocketHandler
from liveupdate.events import EVENT_LOGGER, event

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = [
    "ENTRY_POINT_GROUP",
    "builtin_handlers",
    "default_registry",
    "describe_data",
    "load_plugins",
    "plugin_entry_points",
    "plugins_may_be_installed",
]

#: The entry-point group third-party handlers register under.
ENTRY_POINT_GROUP = "liveupdate.handlers"


def builtin_handlers() -> list[FileHandler]:
    """A fresh instance of every built-in handler, in the order they are asked."""
    return [
        MemfdHandler(),
        SocketHandler(),
        PipeHandler(),
        EventfdHandler(),
        RegularFileHandler(),
        PtyHandler(),
        PidfdHandler(),
    ]


def plugins_may_be_installed(path: Iterable[str] | None = None) -> bool:
    """Whether a distribution on ``path`` (``sys.path``) may declare a handler.

    Reads what :mod:`importlib.metadata` would, the ``entry_points.txt`` of
    every ``*.dist-info`` and ``*.egg-info`` directory, looking only for the
    group's name; ``True`` as soon as one names it (then importlib.metadata
    reads them properly). A path entry that is a file (a zip archive: only
    importlib.metadata reads those) also counts as "may".
    """
    group = ENTRY_POINT_GROUP.encode()
    for entry in sys.path if path is None else path:
        directory = entry or "."  # importlib.metadata's reading of ""
        try:
            with os.scandir(directory) as listing:
                found = [
                    e.name for e in listing if e.name.lower().endswith((".dist-info", ".egg-info"))
                ]
        except NotADirectoryError:
            return True
        except OSError:
            continue  # missing or unreadable: importlib.metadata finds nothing there either
        for name in found:
            try:
                with open(os.path.join(directory, name, "entry_points.txt"), "rb") as text:
                    if group in text.read():
                        return True
            except OSError:
                continue
    return False


def plugin_entry_points() -> list[EntryPoint]:
    """The ``liveupdate.handlers`` entry points, sorted by name (then value)."""
    if not plugins_may_be_installed():
        return []
    from importlib.metadata import entry_points  # costly: only when a plugin may exist

    unique: dict[tuple[str, str], EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        unique.setdefault((ep.name, ep.value), ep)
    return sorted(unique.values(), key=lambda ep: (ep.name, ep.value))


def _instantiate(obj: object) -> FileHandler:
    """A handler from what an entry point names: a class, a factory or an instance."""
    if isinstance(obj, FileHandler):
        return obj
    if isinstance(obj, type) and not issubclass(obj, FileHandler):
        raise TypeError(f"{obj.__qualname__} is not a FileHandler subclass")
    if not callable(obj):
        raise TypeError(f"{obj!r} is neither a FileHandler subclass nor a factory")
    handler = obj()
    if not isinstance(handler, FileHandler):
        raise TypeError(f"the factory returned {type(handler).__qualname__}, not a FileHandler")
    return handler


def load_plugins(registry: HandlerRegistry) -> list[str]:
    """Register every third-party handler; returns the compatibles added.

    A plugin that cannot be loaded or registered is logged and skipped:
    luod must start (and restore what it can) whatever a plugin does.
    """
    added: list[str] = []
    for ep in plugin_entry_points():
        origin = ep.dist.name if ep.dist is not None else "unknown distribution"
        try:
            handler = _instantiate(ep.load())
            registry.register(handler)
        except (Exception, SystemExit) as exc:
            event(
                "handler-plugin-skipped",
                logging.ERROR,
                exc_info=logging.getLogger(EVENT_LOGGER).isEnabledFor(logging.DEBUG),
                entry_point=ep.name,
                value=ep.value,
                distribution=origin,
                error=f"{type(exc).__name__}: {exc}",
            )
            continue
        event(
            "handler-plugin-loaded",
            entry_point=ep.name,
            value=ep.value,
            distribution=origin,
            compatible=handler.compatible,
        )
        added.append(handler.compatible)
    return added


def default_registry(plugins: bool = True) -> HandlerRegistry:
    """The built-in handlers then, unless ``plugins`` is false, the third-party ones."""
    registry = HandlerRegistry(builtin_handlers())
    if plugins:
        load_plugins(registry)
    return registry


def describe_data(
    compatible: str, data: bytes, registry: HandlerRegistry | None = None
) -> dict[str, Any] | None:
    """Decode a file's handler data from a handover image with its handler.

    Unlike :func:`liveupdate.handler_abi.describe_data` (the built-in layouts
    alone, what ``luoctl inspect`` shows) this asks the registry's handlers,
    third-party ones included. ``None`` when no handler of that compatible
    is known or it has no ``describe_data``; ``{"error": reason}`` when the
    data is malformed.
    """
    handler = (registry or default_registry()).by_compatible(compatible)
    if handler is None:
        return None
    try:
        result = handler.describe_data(data)
    except Exception as exc:  # a plugin's decoder must not break an inspection
        return {"error": f"{type(exc).__name__}: {exc}"}
    if result is None or isinstance(result, dict):
        return result
    # A plugin may return any JSON-friendly value, whatever its annotation says.
    return {"value": result}
