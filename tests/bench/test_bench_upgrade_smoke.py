"""``bench/upgrade.py --quick`` runs every way of upgrading a cache and writes its results.

No timing is asserted: only that the benchmark cannot rot, and the counts
that are not times where they have to be what they are: no way loses an
item, kvcache with liveupdate neither fails a request nor drops a
connection, a listener hand-off refuses no connection, and memcached's
warm restart drops every connection (which shows the count counts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from benchrun import run_quick

pytestmark = pytest.mark.luod_only

WAYS = [
    "memcached warm restart",
    "restart, state in a file",
    "listener hand-off, state in a file",
    "kvcache with liveupdate",
]


def test_upgrade_bench_quick_measures_every_way_and_loses_no_item(tmp_path: Path) -> None:
    data = run_quick("upgrade", tmp_path, plots=True)
    assert data["name"] == "upgrade"
    blackout, unmaps, rates = data["tables"]
    assert [row[0] for row in unmaps["rows"]] == [1, 4]
    assert all(len(row) == len(blackout["columns"]) for row in blackout["rows"])
    rows = {(row[0], row[1]): dict(zip(blackout["columns"], row, strict=True))
            for row in blackout["rows"]}  # fmt: skip
    # Every way measured at both quick sizes, none left as "not measured".
    assert set(rows) == {(way, size) for way in WAYS for size in (1, 4)}
    dropped = "dropped connections (of 101)"
    for (way, _size), row in rows.items():
        assert row["items"] > 0
        assert row["items lost"] == 0, row
        if way == "kvcache with liveupdate":
            assert (row["failed requests"], row["refused connects"], row[dropped]) == (0, 0, 0)
        if way == "listener hand-off, state in a file":
            assert row["refused connects"] == 0, row
        if way == "memcached warm restart":
            assert row[dropped] == 101, row
    assert [row[0] for row in rates["rows"]] == ["memcached 1.6.18 (4 threads)",
                                                 "kvcache under luoctl run"]  # fmt: skip
    assert all(isinstance(v, int) and v > 0 for row in rates["rows"] for v in row[1:3])
    assert [g["measured"] for g in data["goals"][:3]] == ["0", "0", "0"]
    assert (tmp_path / "upgrade.png").exists()
