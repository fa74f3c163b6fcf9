"""``bench/supervised.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot, and what it
counts that is not a time (the service is never restarted by luod's reboots).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import run_quick

pytestmark = pytest.mark.luod_only


def test_supervised_bench_quick_writes_its_results(tmp_path: Path) -> None:
    data = run_quick("supervised", tmp_path, plots=True)
    assert data["name"] == "supervised"
    (table,) = data["tables"]
    cases = [row[0] for row in table["rows"]]
    assert cases == ["one connection", "one connection + new connections"]
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    # No connection was refused, and no luod reboot restarted the service.
    assert all(row[-1] == 0 for row in table["rows"])
    restarts = [g for g in data["goals"] if g["goal"].startswith("restarts")]
    assert restarts and restarts[0]["measured"] == "0" and restarts[0]["met"] is True
    assert (tmp_path / "supervised.png").exists()
