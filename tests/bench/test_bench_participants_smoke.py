"""``bench/participants.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import run_quick

pytestmark = pytest.mark.luod_only


def test_participants_bench_quick_writes_its_results(tmp_path: Path) -> None:
    data = run_quick("participants", tmp_path)
    assert data["name"] == "participants"
    (table,) = data["tables"]
    assert [row[0] for row in table["rows"]] == [0, 1, 4]
    assert all(len(row) == len(table["columns"]) for row in table["rows"])
    assert {"goal", "measured", "met", "why"} <= set(data["goals"][0])
