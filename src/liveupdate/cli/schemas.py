"""The JSON documents ``luoctl --json`` prints, described once.

Each command's output is described here, rendered into
``docs/guides/luoctl.md`` by :func:`render` (``python -m
liveupdate.cli.schemas COMMAND`` prints the block to paste), and checked
against real outputs by :func:`validate` in the tests, so that the code, the
documentation and what scripts receive cannot drift apart.

The notation is plain Python data, read as a JSON value's type:

* ``"int"``, ``"float"`` (any JSON number), ``"str"``, ``"bool"``,
  ``"object"`` (any JSON object), ``"any"``; ``"float|null"``: either;
* a tuple of strings: one of these strings (``("normal", "prepared")``);
* a dict: an object with exactly these keys; a key ending in ``?`` may be
  absent; the key ``*`` stands for any other key, with that type (a map,
  or an object open to a handler's own keys);
* a one-element list: an array of that type.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["SCHEMAS", "Schema", "render", "render_block", "validate"]

#: A type in the notation above.
Schema = str | tuple[str, ...] | dict[str, Any] | list[Any]

STATE_NAMES = ("normal", "prepared", "frozen", "updated")
COPIES = ("off", "keeper", "fdstore")

#: ``luoctl state``: the fields of :class:`~liveupdate.StateInfo`, as
#: ``LUOD_IOCTL_GET_STATE`` reports them (times in Unix seconds, 0: none yet;
#: errnos as their names, "": none).
STATE: dict[str, Schema] = {
    "state": STATE_NAMES,
    "generation": "int",
    "pid": "int",
    "started": "float",
    "cold_started": "float",
    "outgoing_sessions": "int",
    "incoming_sessions": "int",
    "preserved_files": "int",
    "max_sessions": "int",
    "max_files": "int",
    "fd_limit": "int",
    "fds_open": "int",
    "fd_reserve": "int",
    "fds_per_file": "int",
    "lost_sessions": "int",
    "lost_incomplete": "bool",
    "recovered_sessions": "int",
    "recovered_files": "int",
    "copies": COPIES,
    "copies_error": "str",
    "journal_error": "str",
    "last_reboot": "float",
    "last_reboot_blackout": "float",
    "last_reboot_error": "str",
    "last_error": "str",
}

#: ``luoctl state`` also shows the participants (``docs/concepts/participants.md``):
#: absent when there are none (or luod lists none: an older luod, a kernel).
STATE_WITH_PARTICIPANTS: dict[str, Schema] = {
    **STATE,
    "participants?": [
        {
            "name": "str",
            "pid": "int",
            "phase": ("idle", "prepared", "frozen", "waiting"),
            "last": "object|null",
        }
    ],
}

#: ``luoctl --json state --watch``: one line per change.
WATCH: dict[str, Schema] = {"time": "float", **STATE}

SERVICE: dict[str, Schema] = {"pid": "int", "restarts": "int", "last_exit": "int"}

#: ``luoctl status``: the interpreted view (times in Unix seconds, null: unknown or none).
STATUS: dict[str, Schema] = {
    "health": ("ok", "degraded", "failing"),
    "problems": ["str"],
    "device": "str",
    "control_socket": "str|null",
    "pid": "int|null",
    "state": STATE_NAMES,
    "generation": "int",
    "started": "float|null",
    "cold_started": "float|null",
    "uptime": "float|null",
    "sessions": {
        "outgoing": "int",
        "incoming": "int",
        "hidden": "int",
        "recovered": "int",
        "lost": "int",
        "lost_incomplete": "bool",
    },
    "files": {"preserved": "int", "recovered": "int", "by_handler": {"*": "int"}},
    "limits": {"max_sessions": "int", "max_files": "int"},
    "fds": {"limit": "int", "open": "int", "reserve": "int", "per_file": "int", "room": "int|null"},
    "last_reboot": {"ended": "float|null", "blackout": "float|null", "error": "str"},
    "last_error": "str",
    "journal": {"ok": "bool", "error": "str"},
    "copies": {"mode": COPIES, "ok": "bool", "error": "str"},
    "services": [
        {
            "session": "str",
            "supervisor": "int",
            "pid": "int",
            "restarts": "int",
            "last_exit": "int",
        }
    ],
}

#: ``luoctl sessions``: LUOD_IOCTL_LIST_SESSIONS' document, plus ``hidden``.
SESSIONS: dict[str, Schema] = {
    "generation": "int",
    "state": STATE_NAMES,
    "hidden": "int",
    "sessions": [
        {
            "name": "str",
            "direction": ("outgoing", "incoming"),
            "uid": "int",
            "gid": "int",
            "pid": "int",
            "created": "float",
            "flags": "int",
            "keep_on_close": "bool",
            "retrieved": "bool",
            "finished": "bool",
            "nfiles": "int",
            "files": [{"token": "int", "handler": "str", "type?": "str", "*": "any"}],
            "service?": SERVICE,
        }
    ],
    # Absent from the listing of one named session.
    "participants?": [
        {
            "name": "str",
            "uid": "int",
            "gid": "int",
            "pid": "int",
            "registered": "float|null",
            "phase": ("idle", "prepared", "frozen", "waiting"),
            "data_len": "int",
            "carried": "int",
            "last": "object|null",
        }
    ],
    "hidden_participants?": "int",
}

#: ``luoctl inspect``: the handover image, decoded.
INSPECT: dict[str, Schema] = {
    "compatible": "str",
    "version": "int",
    "liveupdate_number": "int",
    "writer": "str",
    # When the line of generations cold-started, the live update began and
    # its freeze began (ns since the epoch; 0: not recorded by the writer).
    "cold_started_ns": "int",
    "reboot_started_ns": "int",
    "frozen_ns": "int",
    "sessions": [
        {
            "name": "str",
            "name_encoding": ("utf-8", "hex"),
            "uid": "int",
            "gid": "int",
            "pid": "int",
            "created": "float",
            "flags": "int",
            "files": [
                {
                    "token": "int",
                    "compatible": "str",
                    "fd": "int",
                    "size": "int",
                    "data": "str",
                    "decoded": "object|null",
                }
            ],
        }
    ],
    # Only in an image that carries participants (docs/concepts/participants.md).
    "participants?": [
        {
            "name": "str",
            "name_encoding": ("utf-8", "hex"),
            "uid": "int",
            "gid": "int",
            "pid": "int",
            "size": "int",
            "data": "str",
        }
    ],
}

#: Each command's ``--json`` output; ``None``: the command prints no JSON.
SCHEMAS: dict[str, Schema | None] = {
    "state": STATE_WITH_PARTICIPANTS,
    "state --watch": WATCH,
    "status": STATUS,
    "prepare": {"event": ("prepare",), "generation": "int"},
    "cancel": {"event": ("cancel",), "generation": "int"},
    "finish": {"event": ("finish",), "generation": "int"},
    "reboot": {
        "old_generation": "int",
        "new_generation": "int",
        "seconds": "float",
        "state": STATE_NAMES,
        "incoming_sessions": "int",
    },
    "sessions": SESSIONS,
    "update": {"session": "str", "supervisor": "int"},
    "inspect": INSPECT,
    "install-units": {
        "dry_run": "bool",
        "units": [
            {
                "path": "str",
                "action": ("would write", "wrote", "replaced", "unchanged"),
                "content": "str",
            }
        ],
    },
    # The supervisor's lines are text on stderr; stdout is the service's own.
    "run": None,
}


# -- checking ---------------------------------------------------------------------------


def _scalar_ok(kind: str, value: object) -> bool:
    if kind == "any":
        return True
    if kind == "null":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # bool is an int to Python, never to JSON
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float))
    if kind == "str":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    raise ValueError(f"unknown type {kind!r} in a schema")


def validate(doc: object, schema: Schema, where: str = "$") -> list[str]:
    """What in ``doc`` does not match ``schema``, one line each (empty: it matches)."""
    if isinstance(schema, str):
        if any(_scalar_ok(kind, doc) for kind in schema.split("|")):
            return []
        return [f"{where}: {doc!r} is not {schema}"]
    if isinstance(schema, tuple):
        return [] if doc in schema else [f"{where}: {doc!r} is not one of {schema}"]
    if isinstance(schema, list):
        if not isinstance(doc, list):
            return [f"{where}: {doc!r} is not an array"]
        return [p for i, item in enumerate(doc) for p in validate(item, schema[0], f"{where}[{i}]")]
    if not isinstance(doc, dict):
        return [f"{where}: {doc!r} is not an object"]
    problems: list[str] = []
    known: set[str] = set()
    for key, kind in schema.items():
        if key == "*":
            continue
        name = key.removesuffix("?")
        known.add(name)
        if name in doc:
            problems += validate(doc[name], kind, f"{where}.{name}")
        elif not key.endswith("?"):
            problems.append(f"{where}: {name!r} is missing")
    for name in doc.keys() - known:
        if "*" in schema:
            problems += validate(doc[name], schema["*"], f"{where}.{name}")
        else:
            problems.append(f"{where}: {name!r} is not documented")
    return problems


# -- rendering --------------------------------------------------------------------------


def _type_text(kind: str | tuple[str, ...]) -> str:
    if isinstance(kind, tuple):
        return " | ".join(json.dumps(value) for value in kind)
    return " | ".join(kind.split("|"))


def render(schema: Schema, indent: int = 0) -> str:
    """``schema`` as the documentation shows it: JSON with types for values."""
    pad = "  " * indent
    if isinstance(schema, (str, tuple)):
        return _type_text(schema)
    if isinstance(schema, list):
        if isinstance(schema[0], (str, tuple)):
            return f"[{render(schema[0])}]"
        return "[\n" + f"{pad}  " + render(schema[0], indent + 1) + f"\n{pad}]"
    lines = []
    for key, kind in schema.items():
        shown = '"*"' if key == "*" else json.dumps(key.removesuffix("?"))
        if key.endswith("?"):
            shown += " (optional)"
        lines.append(f"{pad}  {shown}: {render(kind, indent + 1)}")
    return "{\n" + ",\n".join(lines) + f"\n{pad}}}"


def render_block(command: str) -> str:
    """The fenced block documenting ``luoctl --json COMMAND`` in ``luoctl.md``."""
    schema = SCHEMAS[command]
    if schema is None:
        raise KeyError(f"luoctl {command} prints no JSON")
    return f"```text\n{render(schema)}\n```"


if __name__ == "__main__":
    for name in sys.argv[1:] or [n for n, s in SCHEMAS.items() if s is not None]:
        print(f"luoctl --json {name}:\n{render_block(name)}\n")
