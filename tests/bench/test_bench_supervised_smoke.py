"""``bench/supervised.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot, and what it
counts that is not a time (the service is never restarted by luod's reboots).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.luod_only


def test_supervised_bench_quick_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "supervised.json"
    result = subprocess.run(
        [sys.executable, "bench/supervised.py", "--quick", "--out", str(out),
         "--plots", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
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
