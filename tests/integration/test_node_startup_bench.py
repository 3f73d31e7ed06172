"""bench/node_startup.py runs end to end (its figures are printed, never asserted): slow tier,
since it brings up a cluster of its own (~30 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "node_startup.py"


def test_node_startup_bench_runs_and_reports_every_figure(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--pods", "5", "--nodes", "2", "--pods-per-node", "3",
         "--state-dir", str(tmp_path / "cluster")],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "5 pods on 2 node(s)" in out and "5 Running after" in out
    for figure in ("created->scheduled", "scheduled->started", "started->Running",
                   "created->Running"):
        assert f"  {figure}" in out and "p50" in out.split(figure, 1)[1].splitlines()[0]
    assert "CPU: node daemon" in out
    assert "cluster down left" not in result.stderr
