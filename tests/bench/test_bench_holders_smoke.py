"""``bench/holders.py --quick`` runs and writes its results in bench/report.py's shape.

No timing is asserted: only that the benchmark cannot rot, that every way
it compares is in the table, and that every fd came back through each of
them with its content (the benchmark checks each fd against its name).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import run_quick

# Not skipped without s6: CI installs it, and a skip would let the benchmark rot.
pytestmark = pytest.mark.luod_only


def test_holders_bench_quick_brings_every_fd_back_with_its_content(tmp_path: Path) -> None:
    data = run_quick("holders", tmp_path, plots=True)
    assert data["name"] == "holders"
    (table,) = data["tables"]
    columns = table["columns"]
    rows = {row[0]: dict(zip(columns, row, strict=True)) for row in table["rows"]}
    assert list(rows) == [
        "floor: socket pair to a running process",
        "floor: start a process with the fds",
        "s6-fdholder: one tool run per fd",
        "s6-fdholder: bulk store (setdump)",
        "systemd fd store protocol (own peer)",
        "luod: one generation",
        "luod: across a luod reboot",
        "luod: one generation, --keeper off",
    ]
    # --quick moves 100 fds; each came back intact in every repetition.
    assert all(row["fds back intact"] == 100 for row in rows.values())
    assert all(g["met"] is True for g in data["goals"]) and len(data["goals"]) == len(rows)
    # What each way costs in process starts is counted, not timed.
    assert rows["s6-fdholder: one tool run per fd"]["process starts"] == 200
    assert rows["systemd fd store protocol (own peer)"]["process starts"] == 1
    assert rows["luod: one generation"]["process starts"] == 0
    # Only the luod rows hand the session over between store and retrieve.
    assert [name for name, row in rows.items() if row["hand-over ms"] != "-"] == [
        "luod: one generation",
        "luod: across a luod reboot",
        "luod: one generation, --keeper off",
    ]
    assert (tmp_path / "holders.png").exists()
