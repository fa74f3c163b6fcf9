"""Structured events: the one logging style of the whole package.

Everything luod reports (the core's state changes as much as the server's
accepts and reboots) is an *event*: a short kebab-case name saying what
happened (``state-changed``, ``session-kept-on-close``) plus key/value
fields saying to what. The name is fixed text, the fields carry the
variables, so a test or a log shipper matches the name and reads the fields
instead of parsing prose.

This module only records events, on the ``liveupdate`` logger; how they are
printed (one human line or one JSON object) is the server's business
(:func:`liveupdate.server.logs.setup_logging`). It uses the standard library
only, so the core and the server can both depend on it.

Levels: a caller's mistake (answered with an errno) is DEBUG, what the
orchestrator did is INFO, what went wrong inside it is WARNING or ERROR.
"""

from __future__ import annotations

import logging

__all__ = ["EVENT_LOGGER", "event"]

#: The logger every event goes through; formatters find the fields in
#: ``record.fields`` and the event name in ``record.getMessage()``.
EVENT_LOGGER = "liveupdate"

_log = logging.getLogger(EVENT_LOGGER)


def event(
    name: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: object
) -> None:
    """Record the event ``name`` with ``fields``.

    ``exc_info``: attach the exception being handled (for an internal error).
    """
    _log.log(level, name, extra={"fields": fields}, exc_info=exc_info)
