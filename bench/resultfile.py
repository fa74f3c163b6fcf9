"""The result file every benchmark writes, and where its plots go.

A benchmark writes one JSON document to ``bench/results/<name>.json``::

    {"name": str, "title": str, "command": str, "machine": str, "date": str,
     "tables": [{"caption": str, "columns": [str], "rows": [[str | number]]}],
     "goals": [{"goal": str, "measured": str, "met": bool, "why": str}],
     "plots": ["docs/_static/bench/<name>.png"]}

and draws its plots (matplotlib, Agg backend) into ``docs/_static/bench/``.
``bench/report.py`` turns every result file into the generated blocks of
``docs/performance.md``. A ``--quick`` run writes under ``quick/`` in both
directories instead, which the report never reads: a smoke run cannot
replace the recorded numbers.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "docs" / "_static" / "bench"

Row = list[str | int | float]


def table(caption: str, columns: list[str], rows: list[Row]) -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": rows}


def goal(text: str, measured: str, met: bool, why: str = "") -> dict[str, Any]:
    return {"goal": text, "measured": measured, "met": met, "why": why}


def output_dirs(quick: bool, out: str | None, plots: str | None) -> tuple[Path, Path]:
    """Where results and plots go: the recorded places, ``quick/`` under them
    for a smoke run, or the directories given."""
    results_dir = Path(out) if out else RESULTS / "quick" if quick else RESULTS
    plots_dir = Path(plots) if plots else PLOTS / "quick" if quick else PLOTS
    results_dir.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    return results_dir, plots_dir


def destination(
    quick: bool, out: str | None, plots: str | None, name: str
) -> tuple[Path, str, Path]:
    """Where a benchmark given ``--out FILE`` (``None``: the recorded place)
    and ``--plots DIR`` writes: its results' directory, the result file's
    stem (``name`` by default), and its plots' directory."""
    results_dir, plots_dir = output_dirs(quick, os.path.dirname(out) if out else None, plots)
    if out:
        return Path(out).parent, Path(out).stem, plots_dir
    return results_dir, name, plots_dir


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the docs refer to it)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path.resolve())


def command_line() -> str:
    """How this benchmark was started, as one would type it at the repository root."""
    return shlex.join([shown_path(Path(sys.argv[0])), *sys.argv[1:]])


def machine() -> str:
    """Cores, memory, distribution, interpreter and load: what the numbers depend on."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    distro = platform.system()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} cores, {mem:.0f} GiB, {distro}, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"load average {load:.1f} at the start"
    )


def write(
    results_dir: Path,
    name: str,
    title: str,
    machine_text: str,
    tables: list[dict[str, Any]],
    goals: list[dict[str, Any]],
    plots: list[Path],
) -> Path:
    """Write ``<results_dir>/<name>.json``; returns its path."""
    doc = {
        "name": name,
        "title": title,
        "command": command_line(),
        "machine": machine_text,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "tables": tables,
        "goals": goals,
        "plots": [shown_path(p) for p in plots],
    }
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
