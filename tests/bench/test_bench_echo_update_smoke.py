"""``bench/echo_update.py --quick`` runs and writes its results in bench/report.py's shape.

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


def test_echo_update_bench_quick_measures_both_ways(tmp_path: Path) -> None:
    out = tmp_path / "echo_update.json"
    result = subprocess.run(
        [sys.executable, "bench/echo_update.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["name"] == "echo_update"
    (table,) = data["tables"]
    assert [row[0] for row in table["rows"]] == ["pre-started", "stop, then start"]
    assert all(row[1] == 3 for row in table["rows"])  # every update was seen by the client
