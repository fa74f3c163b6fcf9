"""How luod prints its events: one line per event, human or JSON.

Every part of luod, core and server alike, records what happens as a
structured *event* with :func:`liveupdate.events.event`: a short name and
key/value fields. This module only formats them, chosen by ``--log-format``:
the human format reads ``event key=value ...``; the JSON format writes one
object per line for log shippers (``event``, ``level``, ``ts``, ``pid`` and
the fields). Levels are explained in :mod:`liveupdate.events`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["setup_logging"]


def _fmt_value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


class HumanFormatter(logging.Formatter):
    """``2026-11-26T19:40:00.123Z luod[123] INFO session-created name=x``"""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"{stamp}.{int(record.msecs):03d}Z",
            f"luod[{record.process}]",
            record.levelname,
            record.getMessage(),
        ]
        parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``event``, ``pid`` and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "pid": record.process,
        }
        for key, value in getattr(record, "fields", {}).items():
            # An event's fields never hide the record's own keys.
            obj[f"{key}_" if key in obj else key] = value
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup_logging(fmt: str = "human", level: str = "info") -> None:
    """Log to stderr in ``fmt`` (``human`` or ``json``) from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
