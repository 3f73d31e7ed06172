"""bench/operator_scale.py runs end to end and prints its table (the figures are not checked: they
are the bench's output, and a loaded host moves them; the one exact count is lorakube's pod DELETEs
per gang restart, one per pod)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]


def test_operator_scale_bench_prints_a_row_per_system(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "operator_scale.py"), "--jobs", "10",
         "--failures", "2", "--timeout", "300", "--json", str(tmp_path / "rows.json")],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| system |"))
    assert "created p50/p99 s" in header and "API req/job" in header and "pod DELETEs/restart" in header
    column = [cell.strip() for cell in header.strip("|").split("|")].index("pod DELETEs/restart")
    rows = [line for line in lines if line.startswith("| lorakube ") or line.startswith("| indexed Job ")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[1] == "10 x 4"
        # Every job got its pods and a figure (a '-' means none was measured).
        assert cells[2] != "-" and cells[3] != "-" and "never" not in cells[3], row
    # A gang restart deletes each of the failed attempt's 4 pods once (audit log, 2 crashed jobs).
    lorakube = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert lorakube[0] == "lorakube" and lorakube[column] == "4.0", rows[0]
    saved = {row["system"]: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert (saved["lorakube"]["restart_deletes"], saved["lorakube"]["crashes"]) == (8, 2)
