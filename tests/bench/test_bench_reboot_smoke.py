"""``bench/reboot.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import REPO, run_quick

pytestmark = pytest.mark.luod_only


def test_reboot_bench_quick_writes_its_results(tmp_path: Path) -> None:
    data = run_quick("reboot", tmp_path)
    assert {"name", "title", "command", "machine", "date", "tables", "goals", "plots"} <= set(data)
    assert data["name"] == "reboot"
    (table,) = data["tables"]
    assert {"caption", "columns", "rows"} <= set(table)
    assert table["rows"] and all(len(row) == len(table["columns"]) for row in table["rows"])
    assert data["goals"]
    for goal in data["goals"]:
        assert {"goal", "measured", "met", "why"} <= set(goal)
        assert isinstance(goal["met"], bool)
    assert all((REPO / plot).exists() for plot in data["plots"])
