"""Structured logging for luod: one line per event, human or JSON.

Every event is logged through :func:`event` with a short name and key/value
fields. The human format reads ``event key=value ...``; the JSON format
writes one object per line for log shippers. Callers' mistakes are logged at
DEBUG (they are answered with an errno, not an operator's problem); what the
orchestrator did is INFO; what went wrong inside it is WARNING or ERROR.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["event", "setup_logging"]

log = logging.getLogger("liveupdate")


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


def event(name: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any) -> None:
    """Log the event ``name`` with ``fields``."""
    log.log(level, name, extra={"fields": fields}, exc_info=exc_info)
