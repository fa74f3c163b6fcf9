"""How the benchmarks' smoke tests run one: ``bench/NAME.py --quick``, its result read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def run_quick(name: str, tmp_path: Path, plots: bool = False) -> dict[str, Any]:
    """Run ``bench/NAME.py --quick`` writing its result into ``tmp_path`` (and
    its plot too, with ``plots``); the result document, once it exited 0."""
    out = tmp_path / f"{name}.json"
    argv = [sys.executable, f"bench/{name}.py", "--quick", "--out", str(out)]
    if plots:
        argv += ["--plots", str(tmp_path)]
    result = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data
