"""``bench/echo_update.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import run_quick

pytestmark = pytest.mark.luod_only


def test_echo_update_bench_quick_measures_both_ways(tmp_path: Path) -> None:
    data = run_quick("echo_update", tmp_path)
    assert data["name"] == "echo_update"
    (table,) = data["tables"]
    assert [row[0] for row in table["rows"]] == ["pre-started", "stop, then start"]
    assert all(row[1] == 3 for row in table["rows"])  # every update was seen by the client
