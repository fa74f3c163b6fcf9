"""``bench/reboot.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.luod_only


def test_reboot_bench_quick_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "reboot.json"
    result = subprocess.run(
        [sys.executable, "bench/reboot.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
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
